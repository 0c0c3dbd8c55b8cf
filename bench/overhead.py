"""Overhead of interplab's hooks on the default model, measured against plain Hugging Face.

    python bench/overhead.py [--repeats 7] [--batch 8] [--seq 64] [--new-tokens 32]

Ratios, all measured in this run with interleaved repeats (medians):

- capture of every blocks.{i}.hook_resid_post vs a plain HF forward (target <= 1.05);
  both with logits (capture(..., logits=True)) and with capture's early stop (it skips the
  final norm and unembedding, so it can be cheaper than a forward);
- steered generate (one vector, one layer, KV cache) vs plain generate (target <= 1.03);
- the same figures for nnsight, TransformerLens (its TransformerBridge, which hooks the HF model:
  capture ratio, agreement, and a steered greedy generation compared token by token) and
  steering-vectors when they are importable here and support the model (otherwise the reason
  is printed).

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


def machine_load() -> str:
    """The 1-minute load average against the core count, flagged when the timings are noisy."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"load average {load:.1f} on {cores} cores" + (" (LOADED: times are noisy)" if load > 0.5 * cores else "")


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
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads; {machine_load()}")
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
    """TransformerLens' TransformerBridge (transformer-lens >= 3), which hooks a copy of the same HF
    model: every block's resid_post via run_with_cache, and greedy generation steered by the same
    vector at the same layer through the bridge's hooks."""
    import torch

    import interplab
    import tl_bridge
    from interplab.cache import residual_sites

    bridge = tl_bridge.boot_bridge(model)
    sites = residual_sites(model)

    def bridge_capture():
        with torch.no_grad():
            return bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda name: name in sites)[1]

    def interplab_capture():
        return interplab.capture(model, sites, ids, batch_size=args.batch, logits=True)

    ours, theirs = interplab_capture(), bridge_capture()
    worst = max(float((ours[s] - theirs[s]).abs().max() / theirs[s].abs().max()) for s in sites)
    times = interleaved({"hf": hf_forward, "interplab": interplab_capture, "tl": bridge_capture}, args.repeats)
    print(f"TransformerLens {_version('transformer-lens')} TransformerBridge, every hook_resid_post on "
          f"{args.batch}x{args.seq} tokens (median of {args.repeats}, {args.clock} clock):")
    print(f"  plain HF forward {times['hf'] * 1e3:.1f} ms; interplab capture (logits) ratio "
          f"{times['interplab'] / times['hf']:.3f}; bridge run_with_cache ratio {times['tl'] / times['hf']:.3f}; "
          f"bridge / interplab {times['tl'] / times['interplab']:.3f}")
    print(f"  largest |interplab - bridge| / max|activation| over the layers: {worst:.1e} (the bridge computes "
          f"attention eagerly; load with attn_implementation='eager' for bit-identical numbers)")
    _steering_vs_bridge(model, bridge, vector, layer, args)


def _steering_vs_bridge(model, bridge, vector, layer, args) -> None:
    """Greedy tokens and time of interplab's steered generate (KV cache) and the bridge's."""
    import torch

    import interplab
    import tl_bridge

    ids = model.tokenizer("The weather in California is", return_tensors="pt").input_ids.to(model.device)
    name, scale = f"blocks.{layer}.hook_resid_post", 0.5

    def ours(steer_scale):
        with torch.no_grad(), interplab.intervene(model, {name: interplab.add_vector(vector, scale=steer_scale)}):
            out = model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        return out[0, ids.shape[1]:]

    # the bridge's attention reads its KV cache from a `past_key_values` keyword, which transformers
    # 5.24 passes as `cache`: its cached generate then sees only the newest token. Measure both.
    cached = tl_bridge.steered_tokens(bridge, ids, name, vector, 0.0, args.new_tokens, kv_cache=True)
    plain = ours(0.0)
    same = _same_prefix(cached, plain)
    verdict = "same tokens as HF" if same == len(plain) else f"DIVERGES from HF generate after {same} of {len(plain)} tokens"
    print(f"  bridge generate with its KV cache, unsteered: {verdict}")
    steered = ours(scale)
    theirs = tl_bridge.steered_tokens(bridge, ids, name, vector, scale, args.new_tokens, kv_cache=False)
    same = _same_prefix(theirs, steered)
    print(f"  steered greedy generate ({args.new_tokens} tokens, vector at layer {layer}, scale {scale}): "
          f"{'identical tokens' if same == len(steered) == len(theirs) else f'DIFFERENT tokens from position {same}'}"
          f" (steering changed {int((steered != plain).sum())} of {len(plain)} tokens)")
    times = interleaved({"interplab": lambda: ours(scale),
                         "tl": lambda: tl_bridge.steered_tokens(bridge, ids, name, vector, scale, args.new_tokens,
                                                                kv_cache=False)}, max(1, args.repeats // 2))
    print(f"  time: interplab (KV cache) {times['interplab'] * 1e3:.0f} ms; bridge (no KV cache) "
          f"{times['tl'] * 1e3:.0f} ms, ratio bridge / interplab {times['tl'] / times['interplab']:.2f}")


def _same_prefix(a, b) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a.tolist(), b.tolist()):
        if x != y:
            break
        n += 1
    return n


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


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
