"""Benchmark: a full layer x position residual patching grid on the default model.

    python bench/patching.py [--n 1] [--cells-per-forward 16] [--threads N]

Compares, on the same IOI prompts and in the same run:
  naive      one forward pass per cell: `with intervene(model, {site: patch(clean, positions=p)})`,
             then model(...).logits at the last token (what one writes by hand);
  batched    interplab's engine, several cells per forward (replicas along the batch), prefix
             reuse off;
  interplab  the same with prefix reuse (tokens before the patched position are not recomputed);
  attribution  attribution patching of the same grid (one forward + backward);
  bridge     TransformerLens' TransformerBridge (when importable): the naive loop with the
             bridge's own hooks (run_with_hooks on hook_resid_pre), on a private copy of the model.
Prints seconds, the speed-up ratios, the largest disagreement between the grids and the
attribution estimate's correlation with true patching. `--attn eager` loads interplab's model
with eager attention, the arithmetic the bridge uses, so the two grids can agree bit for bit.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def naive_grid(model, enc, sites):
    import torch

    from interplab import capture, intervene, patch

    clean = capture(model, sites, {"input_ids": enc.clean_ids, "attention_mask": enc.clean_mask})
    width = int(enc.corrupted_mask.sum(-1).max())
    rows, last = torch.arange(len(enc)), enc.last("corrupted")
    out = torch.zeros(len(sites), width)
    with torch.no_grad():
        for i, site in enumerate(sites):
            for p in range(width):
                with intervene(model, {site: patch(clean, positions=p)}):
                    logits = model.hf(input_ids=enc.corrupted_ids, attention_mask=enc.corrupted_mask).logits
                out[i, p] = enc.score(logits[rows, last]).mean()
    return out


def engine_grid(model, enc, sites, cells_per_forward, reuse_prefix):
    import torch

    from interplab.analysis.cells import Target, run_cells
    from interplab.analysis.patching import prepare

    setup = prepare(model, enc, [model.site(s) for s in sites])
    ids, mask, last = setup.ids
    width = int(mask.sum(-1).max())
    cells = [[Target(model.site(s), None, torch.full((len(enc),), p), setup.valid)] for s in sites for p in range(width)]
    metrics = run_cells(model, ids, mask, last, setup.sources, cells, enc.score,
                        cells_per_forward=cells_per_forward, reuse_prefix=reuse_prefix)
    return metrics.view(len(sites), width)  # (cells,) -> (layers, positions)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=1, help="IOI prompt pairs (one template)")
    parser.add_argument("--cells-per-forward", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--attn", default=None, help="attention implementation for interplab's model "
                        "(default: the model's, SDPA; 'eager' is what the TransformerLens bridge computes)")
    args = parser.parse_args()

    import torch

    import interplab
    from interplab.analysis import ioi_task, patch_residual
    from interplab.analysis.attribution import compare_grids
    from interplab.analysis.tasks import IOI_TEMPLATES

    if args.threads:
        torch.set_num_threads(args.threads)
    model = interplab.load(args.model, attn_implementation=args.attn)
    task = ioi_task(args.n, templates=[IOI_TEMPLATES[0]], tokenizer=model.tokenizer)
    enc = task.encode(model)
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(model.n_layers)]
    width = int(enc.corrupted_mask.sum(-1).max())
    print(f"model {model.model_id}: {model.n_layers} layers x {width} positions = {model.n_layers * width} cells, "
          f"{args.n} prompt pair(s), torch threads {torch.get_num_threads()}; {machine_load()}")

    patch_residual(model, task, layers=[0], columns=[0])  # warm-up
    grid = lambda method: patch_residual(model, task, columns=None, method=method,  # noqa: E731
                                         cells_per_forward=args.cells_per_forward)
    exact, t_fast = timed(lambda: grid("patch"))
    batched, t_batched = timed(lambda: engine_grid(model, enc, sites, args.cells_per_forward, False))
    naive, t_naive = timed(lambda: naive_grid(model, enc, sites))
    attribution, t_attr = timed(lambda: grid("attribution"))

    cells = model.n_layers * width
    print(f"naive loop (1 forward per cell)      {t_naive:7.1f} s  ({cells / t_naive:5.2f} cells/s)")
    print(f"batched, no prefix reuse             {t_batched:7.1f} s  ({cells / t_batched:5.2f} cells/s)  "
          f"{t_naive / t_batched:4.2f}x faster than naive")
    print(f"interplab (batched + prefix reuse)   {t_fast:7.1f} s  ({cells / t_fast:5.2f} cells/s)  "
          f"{t_naive / t_fast:4.2f}x faster than naive")
    print(f"attribution patching                 {t_attr:7.1f} s  = {t_attr / t_fast:.3f} of one true grid "
          f"(interplab), {t_attr / t_naive:.3f} of the naive grid")
    print(f"max |metric difference| vs naive: interplab {float((exact.raw - naive).abs().max()):.2e}, "
          f"batched {float((batched - naive).abs().max()):.2e}")
    stats = compare_grids(exact, attribution)
    print(f"attribution vs true patching: pearson r = {stats['pearson']:.3f}, mean |error| = "
          f"{stats['mean_abs_error']:.3f} (recovery units), sign agreement {stats['sign_agreement']:.0%}")
    try:
        bench_bridge(model, enc, sites, {"interplab": exact.raw, "batched": batched}, t_fast, t_naive)
    except ImportError as err:
        print(f"TransformerLens bridge: skipped ({err})")


def bench_bridge(model, enc, sites, grids, t_fast, t_naive) -> None:
    """The same grid through TransformerLens' TransformerBridge hooks, one forward per cell."""
    import tl_bridge

    bridge = tl_bridge.boot_bridge(model)
    grid, seconds = timed(lambda: tl_bridge.patch_grid(bridge, enc, sites))
    diffs = ", ".join(f"{name} {float((ours - grid).abs().max()):.2e}" for name, ours in grids.items())
    print(f"TransformerLens bridge (1 forward per cell) {seconds:7.1f} s  = {seconds / t_fast:.2f}x interplab's time, "
          f"{seconds / t_naive:.2f}x the naive loop's")
    print(f"max |metric difference| vs bridge: {diffs} (largest |metric| {float(grid.abs().max()):.2f}; "
          f"attention {model.hf.config._attn_implementation} here, eager in the bridge)")


def machine_load() -> str:
    """The 1-minute load average against the core count, flagged when the timings are noisy."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return f"load average {load:.1f} on {cores} cores" + (" (LOADED: times are noisy)" if load > 0.5 * cores else "")

if __name__ == "__main__":
    main()
