"""Overhead of interplab's hooks on the default model, measured against plain Hugging Face.

    python bench/overhead.py [--repeats 7] [--batch 8] [--seq 64] [--new-tokens 32]

Ratios, all measured in this run with interleaved repeats (medians):

- capture of every blocks.{i}.hook_resid_post vs a plain HF forward (target <= 1.05);
  both with logits (capture(..., logits=True)) and with capture's early stop (it skips the
  final norm and unembedding, so it can be cheaper than a forward);
- steered generate (one vector, one layer, KV cache) vs plain generate (target <= 1.03);
- the same figures for nnsight, TransformerLens and steering-vectors when they are
  importable here and support the model (otherwise the reason is printed).

Run it with another interpreter (e.g. a transformers-4.x venv) to measure there too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process; steadier on a busy machine)


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each variant, the variants run in turn `repeats` times (after a warm-up)."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: process CPU time (use on a machine shared with other jobs)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch
    import transformers

    import interplab
    from interplab.cache import residual_sites

    model = interplab.load(args.model)
    if model.tokenizer is None:  # transformers 4.x cannot read the tokenizer class a 5.x cache names
        from transformers import PreTrainedTokenizerFast

        model.tokenizer = PreTrainedTokenizerFast.from_pretrained(model.source)
        model.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    print(f"model {model.model_id}: {model.n_layers} layers, d_model {model.d_model}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    ids = torch.randint(100, model.vocab_size - 100, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    sites = residual_sites(model)

    def hf_forward():
        with torch.no_grad():
            model.hf(input_ids=ids, attention_mask=mask, use_cache=False)

    def capture_logits():
        interplab.capture(model, sites, ids, batch_size=args.batch, logits=True)

    def capture_early():
        interplab.capture(model, sites, ids, batch_size=args.batch)

    forward = interleaved({"hf": hf_forward, "capture+logits": capture_logits, "capture": capture_early}, args.repeats)
    print(f"\nforward on {args.batch}x{args.seq} tokens (median of {args.repeats}, {args.clock} clock):")
    print(f"  plain HF forward                        {forward['hf'] * 1e3:8.1f} ms")
    print(f"  capture all {len(sites)} hook_resid_post, logits {forward['capture+logits'] * 1e3:8.1f} ms   "
          f"ratio {forward['capture+logits'] / forward['hf']:.3f}  (target <= 1.05)")
    print(f"  capture all hook_resid_post, early stop {forward['capture'] * 1e3:8.1f} ms   "
          f"ratio {forward['capture'] / forward['hf']:.3f}")

    layer = model.n_layers // 3
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    prompt = "The weather in California is"
    gen_kwargs = dict(max_new_tokens=args.new_tokens, chat=False)

    def plain_generate():
        interplab.generate(model, prompt, **gen_kwargs)

    def steered_generate():
        with interplab.intervene(model, {f"blocks.{layer}.hook_resid_post": interplab.add_vector(vector, scale=0.5)}):
            interplab.generate(model, prompt, **gen_kwargs)

    gen = interleaved({"plain": plain_generate, "steered": steered_generate}, args.repeats)
    print(f"\ngenerate {args.new_tokens} tokens, KV cache (median of {args.repeats}, {args.clock} clock):")
    print(f"  plain generate                          {gen['plain'] * 1e3:8.1f} ms")
    print(f"  steered (1 vector at layer {layer})          {gen['steered'] * 1e3:8.1f} ms   "
          f"ratio {gen['steered'] / gen['plain']:.3f}  (target <= 1.03)")

    for peer in (bench_nnsight, bench_transformer_lens, bench_steering_vectors):
        print()
        try:
            peer(model, ids, mask, hf_forward, vector, layer, args)
        except ImportError as err:
            print(f"{peer.__name__.removeprefix('bench_')}: skipped ({err})")
        except Exception as err:  # a peer that cannot handle this model is reported, not fatal
            print(f"{peer.__name__.removeprefix('bench_')}: skipped ({type(err).__name__}: {str(err)[:160]})")


def bench_nnsight(model, ids, mask, hf_forward, vector, layer, args) -> None:
    import torch
    from nnsight import LanguageModel

    lm = LanguageModel(model.hf, tokenizer=model.tokenizer)
    blocks = lm.model.layers

    def nnsight_capture():
        with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": mask}):
            saved = [block.output[0].save() for block in blocks]  # noqa: F841

    times = interleaved({"hf": hf_forward, "nnsight": nnsight_capture}, args.repeats)
    print(f"nnsight: capture all block outputs ratio {times['nnsight'] / times['hf']:.3f} vs plain HF forward")


def bench_transformer_lens(model, ids, mask, hf_forward, vector, layer, args) -> None:
    import torch
    from transformer_lens import HookedTransformer

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct" if "smollm2" in model.model_id else model.model_id
    tl = HookedTransformer.from_pretrained_no_processing(hub_id, hf_model=model.hf, tokenizer=model.tokenizer,
                                                         device="cpu", dtype=torch.float32)
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.n_layers)]

    def tl_capture():
        with torch.no_grad():
            tl.run_with_cache(ids, names_filter=lambda name: name in names)

    times = interleaved({"hf": hf_forward, "tl": tl_capture}, args.repeats)
    print(f"TransformerLens: run_with_cache(all hook_resid_post) ratio {times['tl'] / times['hf']:.3f} vs plain HF "
          "forward (TL re-implements the model)")


def bench_steering_vectors(model, ids, mask, hf_forward, vector, layer, args) -> None:
    from steering_vectors import SteeringVector

    import interplab

    sv = SteeringVector({layer: vector}, layer_type="decoder_block")
    prompt = "The weather in California is"
    kwargs = dict(max_new_tokens=args.new_tokens, chat=False)

    def plain():
        interplab.generate(model, prompt, **kwargs)

    def steered():
        with sv.apply(model.hf, multiplier=0.5):
            interplab.generate(model, prompt, **kwargs)

    times = interleaved({"plain": plain, "sv": steered}, args.repeats)
    print(f"steering-vectors: steered generate ratio {times['sv'] / times['plain']:.3f} vs plain generate")


if __name__ == "__main__":
    main()
