"""Data-parallel SAE training throughput: one process against N torchrun processes (gloo on CPU,
NCCL with --device cuda), the same global batch size, the same synthetic activations.

    python bench/sae_parallel.py                    # 1 process, then 2 under torchrun (CPU, gloo)
    python bench/sae_parallel.py --nproc 4 --device cuda

Each rank trains on its own share (its local batch is global_batch / N rows) and prints its
tokens/s (its own rows) and the job's (all ranks' rows); on a machine with fewer free cores than
processes the total cannot grow, and the point of the CPU figure is honesty, not speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One rank (or the single process): train and report tokens/s."""
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    from bench.sae_train import TimedStream, synthetic_activations
    from interplab.sae import SAEConfig, TrainConfig, train_sae
    from interplab.sae.parallel import init_from_env

    group = init_from_env(args.device)
    local = args.batch // group.world_size
    batches = [x.to(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else "cpu")
               for x in synthetic_activations(4, local, args.d_in, seed=group.rank)]
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, family="topk", k=args.k)
    train_cfg = TrainConfig(n_steps=args.steps, progress=False, tensorboard=False, log_every=10**9,
                            b_dec_init="mean", n_init_batches=1, device=args.device, precision=args.precision)
    stream = TimedStream(batches, args.steps, args.warmup)
    started = time.perf_counter()
    train_sae(cfg, stream, train_cfg)
    mine = stream.tokens_per_s(args.warmup, local)
    rates = group.gather_objects(mine)
    if group.is_writer:
        print(f"per rank: {', '.join(f'{r:,.0f}' for r in rates)} tokens/s; "
              f"total {sum(rates):,.0f} tokens/s (global batch {args.batch}, {time.perf_counter() - started:.1f}s)")


def launch(args) -> None:
    base = [__file__, "--worker", "--d-in", str(args.d_in), "--d-sae", str(args.d_sae), "--k", str(args.k),
            "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--device", args.device, "--precision", args.precision]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    print(f"TopK SAE d_in={args.d_in} d_sae={args.d_sae} k={args.k}, global batch {args.batch}, {args.steps} steps "
          f"({args.warmup} warm-up), device {args.device}, {os.cpu_count()} CPU cores")
    for threads in sorted({os.cpu_count() or 1, int(env["OMP_NUM_THREADS"])}, reverse=True):
        print(f"one process with {threads} thread(s):", end=" ", flush=True)
        subprocess.run([sys.executable, *base], check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    print(f"torchrun, {args.nproc} processes with {env['OMP_NUM_THREADS']} thread(s) each:", end=" ", flush=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                    *base], check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1024, help="global batch (split over the ranks)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    main()
