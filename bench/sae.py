"""SAE pipeline throughput: activation harvesting against a plain HF forward, and SAE training
against SAELens (the latter by running bench/sae_train.py).

Harvest: the same token windows go through (a) a plain `model(input_ids)` forward, logits
included, and (b) interplab's harvester reading blocks.L.hook_resid_post, which stops the forward
after block L and drops BOS. Ideally (b) costs (L+1)/n_layers of (a) (it costs less when the
unembedding is a large part of the forward, as it is for small models). Plain forwards and
harvests alternate (P H0 P H7 P ...) and each harvest is timed against the mean of the plain
forwards around it, so that background load hits both alike; ratios are medians over rounds.

    INTERPLAB_CACHE=/tmp/ilcache python bench/sae.py                  # default model, L = 0, 7, 14, 29
    python bench/sae.py --model tinystories-656k --layers 0,1 --no-train
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def windows_for(model, n_contexts: int, context_length: int) -> torch.Tensor:
    import os

    from interplab.sae.store import corpus_windows

    shared = Path(os.environ.get("INTERPLAB_SHARED", BENCH.parent.parent / "shared"))
    return corpus_windows(model, shared / "data" / "tinystories_sample.txt", context_length=context_length,
                          n_contexts=n_contexts)


def time_plain(model, windows: torch.Tensor, batch: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            model.hf(input_ids=windows[i:i + batch], use_cache=False)
    return time.perf_counter() - started


def time_harvest(model, windows: torch.Tensor, batch: int, layer: int) -> tuple[float, int]:
    from interplab.sae.store import Harvester

    harvester = Harvester(model, [f"blocks.{layer}.hook_resid_post"])
    rows = 0
    started = time.perf_counter()
    for i in range(0, windows.shape[0], batch):
        rows += len(harvester.run(windows[i:i + batch], i))
    return time.perf_counter() - started, rows


def time_store(model, windows: torch.Tensor, batch: int, layer: int) -> tuple[float, int]:
    """The whole store (harvest + shuffling buffer) over the same windows' text, for reference."""
    from interplab.sae.store import ActivationStore, StoreConfig

    texts = [model.tokenizer.decode(w[1:]) for w in windows]
    cfg = StoreConfig(sites=(f"blocks.{layer}.hook_resid_post",), context_length=windows.shape[1], batch_size=512,
                      buffer_tokens=4096, model_batch_size=batch)
    started = time.perf_counter()
    rows = sum(len(x) for x in ActivationStore.from_corpus(model, texts, cfg).batches())
    return time.perf_counter() - started, rows


def bench_harvest(args) -> None:
    import interplab

    model = interplab.load(args.model)
    layers = [int(x) % model.n_layers for x in args.layers.split(",")]
    windows = windows_for(model, args.contexts, args.context_length)
    n_tokens = windows.numel()
    print(f"{model.model_id}: {model.n_layers} layers, d_model {model.d_model}, vocab {model.vocab_size}; "
          f"{windows.shape[0]} windows x {windows.shape[1]} tokens, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    time_plain(model, windows[: args.batch], args.batch)  # warm-up
    plain, ratios = [], {layer: [] for layer in layers}
    for _ in range(args.rounds):  # P H0 P H7 P ...: each harvest is compared with the forwards around it
        before = time_plain(model, windows, args.batch)
        plain.append(before)
        for layer in layers:
            seconds = time_harvest(model, windows, args.batch, layer)[0]
            after = time_plain(model, windows, args.batch)
            plain.append(after)
            ratios[layer].append(seconds / ((before + after) / 2))
            before = after
    plain_s = statistics.median(plain)
    print(f"plain HF forward (with logits): {n_tokens / plain_s:,.0f} tokens/s (median of {len(plain)})")
    print(f"{'site':<28}{'tokens/s':>12}{'time ratio':>12}{'ideal':>8}{'ratio/ideal':>13}  within 10%")
    for layer in layers:
        ratio, ideal = statistics.median(ratios[layer]), (layer + 1) / model.n_layers
        ok = "yes" if ratio <= 1.1 * ideal else "NO"
        print(f"{f'blocks.{layer}.hook_resid_post':<28}{n_tokens / (ratio * plain_s):>12,.0f}{ratio:>12.3f}"
              f"{ideal:>8.3f}{ratio / ideal:>13.2f}  {ok}")
    print("time ratio = harvest time / plain forward time, the median over rounds of each harvest against the "
          "mean of the two plain forwards around it; ideal = (L+1)/n_layers")
    layer = layers[0]
    store_s, rows = time_store(model, windows, args.batch, layer)
    print(f"whole store at blocks.{layer} (tokenize + harvest + shuffle buffer): {rows / store_s:,.0f} rows/s")


def bench_training(extra: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("sae_train_bench", BENCH / "sae_train.py")
    if spec is None or not (BENCH / "sae_train.py").is_file():
        print("bench/sae_train.py not found: skipping the training comparison")
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = sys.argv
    sys.argv = [str(BENCH / "sae_train.py"), *extra]
    try:
        print("\n--- training throughput (bench/sae_train.py " + " ".join(extra) + ") ---")
        module.main()
    finally:
        sys.argv = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", default="0,7,14,29", help="comma-separated blocks to harvest at")
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="skip the training comparison")
    parser.add_argument("--train-args", default="--steps 8 --rounds 1",
                        help="arguments passed to bench/sae_train.py")
    args = parser.parse_args()
    bench_harvest(args)
    if not args.no_train:
        bench_training(args.train_args.split())


if __name__ == "__main__":
    main()
