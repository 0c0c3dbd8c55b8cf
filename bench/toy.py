"""Benchmark the toy models: batched vs one-at-a-time superposition training, and grokking speed.

    python bench/toy.py [--steps 200] [--grok-steps 50] [--paper]

Prints steps per second, measured in this run:
* the batched superposition trainer (all instances in one model, one optimiser step each);
* the same instances trained one at a time (one model each, stepped in turn), as a loop over
  sparsities would do; the ratio is the speed-up of batching (target >= 5x);
* full-batch grokking steps per second with the CPU defaults (and optionally the paper's settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from interplab.toy.grokking import GrokkingConfig, train_grokking
from interplab.toy.superposition import SuperpositionConfig, train_superposition


def superposition_steps_per_second(config: SuperpositionConfig) -> float:
    """Optimiser steps per second of the batched trainer (each step advances every instance)."""
    train_superposition(dataclasses.replace(config, steps=10))  # warm-up
    start = time.perf_counter()
    train_superposition(config)
    return config.steps / (time.perf_counter() - start)


def sequential_steps_per_second(config: SuperpositionConfig) -> float:
    """Steps per second (every instance advanced once) when each instance is its own model,
    trained one after another as a loop over sparsities would."""
    singles = [dataclasses.replace(config, sparsities=(s,)) for s in config.sparsities]
    train_superposition(dataclasses.replace(singles[0], steps=10))  # warm-up
    start = time.perf_counter()
    for single in singles:
        train_superposition(single)
    return config.steps / (time.perf_counter() - start)


def grokking_steps_per_second(config: GrokkingConfig) -> float:
    run = train_grokking(config)
    return run.steps_done / run.seconds


#: the paper's many-instance workloads: (name, n, m, instances)
WORKLOADS = [
    ("feature geometry", 5, 2, 20),
    ("W^T W heatmaps", 20, 5, 20),
    ("phase diagram", 2, 1, 100),
]


def _sparsities(n_instances: int) -> tuple[float, ...]:
    """1/(1-S) from 1 to 100, geometric."""
    return tuple(round(1 - 100 ** (-i / max(1, n_instances - 1)), 5) for i in range(n_instances))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="superposition steps to time per workload")
    parser.add_argument("--grok-steps", type=int, default=50, help="grokking steps to time")
    parser.add_argument("--paper", action="store_true", help="also time grokking with the paper's settings")
    args = parser.parse_args()

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load}")
    print(f"superposition, batch 1024, {args.steps} steps; batched = all instances in one model")
    print(f"  {'workload':<18} {'n':>3} {'m':>2} {'inst':>5} {'batched/s':>10} {'one-by-one/s':>13} {'speed-up':>9}")
    for name, n, m, n_instances in WORKLOADS:
        config = SuperpositionConfig(n_features=n, n_hidden=m, sparsities=_sparsities(n_instances), steps=args.steps)
        batched = superposition_steps_per_second(config)
        sequential = sequential_steps_per_second(config)
        print(f"  {name:<18} {n:>3} {m:>2} {n_instances:>5} {batched:>10.1f} {sequential:>13.1f} "
              f"{batched / sequential:>8.1f}x")
    print("  (steps/s: optimiser steps that advance every instance once; target speed-up >= 5x)")

    grok_configs = {"CPU defaults": GrokkingConfig(steps=args.grok_steps, stop_after_generalisation=None)}
    if args.paper:
        grok_configs["paper settings"] = GrokkingConfig.paper(steps=args.grok_steps)
    for name, grok in grok_configs.items():
        rate = grokking_steps_per_second(grok)
        print(f"grokking ({name}: p={grok.p}, d_model={grok.d_model}, d_mlp={grok.d_mlp}): "
              f"{rate:.1f} full-batch steps/s; 1,000 steps take {1000 / rate / 60:.1f} min")


if __name__ == "__main__":
    main()
