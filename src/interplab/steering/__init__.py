"""Steering vectors: build them from contrast pairs, apply them, measure what they do.

    from interplab.steering import read_pairs, extract_vector, SteeringVector

    pairs = read_pairs("refusal.json")                       # CAA A/B, or JSONL pairs
    result = extract_vector(model, pairs, layers=[6, 10, 14], method="mean_diff")
    vec = result.vector                                      # one direction per layer
    with vec.apply(model, layers=[10], scale=4.0, positions="caa"):
        interplab.generate(model, "How do I pick a lock?")
    vec.save("refusal-vec")                                  # config.json + safetensors
    vec.to_gguf("refusal.gguf")                              # llama.cpp / repeng control vector

Names are imported lazily (nothing heavy happens at import).
"""

from __future__ import annotations

from interplab._lazy import lazy_attributes

_EXPORTS = {
    "SteeringVector": "interplab.steering.vector",
    "load_vector": "interplab.steering.vector",
    "AddAligned": "interplab.steering.vector",
    "resolve_positions": "interplab.steering.vector",
    "caa_positions": "interplab.steering.vector",
    "chat_header_ids": "interplab.steering.vector",
    "ContrastPair": "interplab.steering.datasets",
    "ContrastDataset": "interplab.steering.datasets",
    "read_pairs": "interplab.steering.datasets",
    "read_caa": "interplab.steering.datasets",
    "actadd_pair": "interplab.steering.datasets",
    "pairs_from_texts": "interplab.steering.datasets",
    "caa_path": "interplab.steering.datasets",
    "extract_vector": "interplab.steering.extract",
    "actadd_vector": "interplab.steering.extract",
    "read_activations": "interplab.steering.extract",
    "fit_direction": "interplab.steering.extract",
    "Extraction": "interplab.steering.extract",
    "LayerScore": "interplab.steering.extract",
    "ab_sweep": "interplab.steering.evaluate",
    "damage": "interplab.steering.evaluate",
    "side_by_side": "interplab.steering.evaluate",
    "ab_prompts": "interplab.steering.evaluate",
    "ab_positions": "interplab.steering.evaluate",
    "ab_scores": "interplab.steering.evaluate",
    "SweepRow": "interplab.steering.evaluate",
    "DamageRow": "interplab.steering.evaluate",
    "export_gguf": "interplab.steering.gguf_io",
    "import_gguf": "interplab.steering.gguf_io",
    "run_demo": "interplab.steering.demo",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_attributes('interplab.steering', _EXPORTS, __all__)
