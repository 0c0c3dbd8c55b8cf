"""TopK SAE training throughput: interplab against SAELens on the same activations.

Both trainers run their full loop (Adam, gradient clipping, dead-latent tracking, decoder-norm
handling) on the same synthetic activations with the same family (TopK), width, k and batch size.
Throughput counts only steps after a warm-up: a wrapper around the activation stream timestamps
each batch the trainer asks for, and both trainers ask for one batch per step. The two trainers
alternate (interplab, SAELens, interplab, ...) so that background load hits both alike.

    python bench/sae_train.py                      # d_in 576, d_sae 4608, k 32, batch 4096
    python bench/sae_train.py --steps 8 --rounds 1  # quicker

It also times one training step with interplab's sparse TopK kernels against its dense reference
path (the choice the SAE makes by default on CPU). SAELens is optional: without it, that half is
skipped with a message.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch


class TimedStream:
    """Yields batches (cycling over a fixed list) and records when each one was asked for."""

    def __init__(self, batches: list[torch.Tensor], n: int) -> None:
        self.batches, self.n, self.times = batches, n, []

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.n):
            self.times.append(time.perf_counter())
            yield self.batches[i % len(self.batches)]

    def tokens_per_s(self, first: int, batch_size: int) -> float:
        """Throughput over the steps between the `first` batch request and the last one."""
        steps = len(self.times) - 1 - first
        if steps < 1:
            raise ValueError(f"need more than {first + 1} steps to measure; raise --steps")
        return steps * batch_size / (self.times[-1] - self.times[first])


def synthetic_activations(n_batches: int, batch: int, d_in: int, seed: int = 0) -> list[torch.Tensor]:
    """Sparse combinations of 4·d_in random directions plus a mean offset, like residual activations."""
    g = torch.Generator().manual_seed(seed)
    n_features = 4 * d_in
    directions = torch.randn(n_features, d_in, generator=g) / d_in**0.5
    offset = torch.randn(d_in, generator=g)
    out = []
    for _ in range(n_batches):
        codes = (torch.rand(batch, n_features, generator=g) < 0.01) * torch.rand(batch, n_features, generator=g)
        out.append(codes @ directions * 10 + offset)
    return out


def run_interplab(batches, args, n_steps: int) -> float:
    from interplab.sae import SAEConfig, TrainConfig, train_sae

    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, family="topk", k=args.k)
    train_cfg = TrainConfig(n_steps=n_steps, lr=args.lr, progress=False, tensorboard=False, log_every=10**9,
                            b_dec_init="mean", n_init_batches=1)
    stream = TimedStream(batches, n_steps)
    train_sae(cfg, stream, train_cfg)
    return stream.tokens_per_s(args.warmup, args.batch)


def run_saelens(batches, args, n_steps: int, *, sparse: bool = False) -> float:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae_cfg = TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, use_sparse_activations=sparse)
    sae = TopKTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(total_training_samples=n_steps * args.batch, train_batch_size_samples=args.batch,
                                   lr=args.lr, lr_end=args.lr)
    stream = TimedStream(batches, n_steps)
    SAETrainer(trainer_cfg, sae, iter(stream)).fit()
    return stream.tokens_per_s(args.warmup, args.batch)


def time_kernels(batches, args) -> tuple[float, float]:
    """Seconds per forward+backward of interplab's TopK SAE: sparse kernels, dense reference."""
    from interplab.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, family="topk", k=args.k))
    x = batches[0]
    result = []
    for sparse in (True, False):
        sae.use_sparse_kernels = sparse
        times = []
        for _ in range(3):
            start = time.perf_counter()
            sae(x).loss.backward()
            times.append(time.perf_counter() - start)
            sae.zero_grad(set_to_none=True)
        result.append(min(times))
    return result[0], result[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12, help="training steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=3, help="steps not timed (must be >= 1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each trainer")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--saelens-sparse", action="store_true",
                        help="also time SAELens with use_sparse_activations=True (its sparse decoder option)")
    args = parser.parse_args()

    print(f"TopK SAE d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch}, "
          f"{args.steps} steps ({args.warmup} warm-up), torch {torch.__version__}, {torch.get_num_threads()} threads")
    batches = synthetic_activations(4, args.batch, args.d_in)

    sparse_s, dense_s = time_kernels(batches, args)
    print(f"interplab forward+backward: sparse TopK kernels {sparse_s * 1e3:.0f} ms, dense reference "
          f"{dense_s * 1e3:.0f} ms -> sparse is {dense_s / sparse_s:.2f}x faster")

    try:
        import sae_lens
    except ImportError:
        sae_lens = None
        print("sae-lens is not installed (pip install sae-lens): timing interplab alone")

    ours, theirs, theirs_sparse = [], [], []
    for _ in range(args.rounds):
        ours.append(run_interplab(batches, args, args.steps))
        print(f"  interplab: {ours[-1]:,.0f} tokens/s")
        if sae_lens is not None:
            theirs.append(run_saelens(batches, args, args.steps))
            print(f"  SAELens {sae_lens.__version__}: {theirs[-1]:,.0f} tokens/s")
        if sae_lens is not None and args.saelens_sparse:
            try:
                theirs_sparse.append(run_saelens(batches, args, args.steps, sparse=True))
            except Exception as error:  # sae-lens 6.54 fails here on CPU (aten::view on a sparse tensor)
                print(f"  SAELens with use_sparse_activations failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:120]}")
                args.saelens_sparse = False
            else:
                print(f"  SAELens {sae_lens.__version__} (use_sparse_activations): {theirs_sparse[-1]:,.0f} tokens/s")

    best_ours = max(ours)
    print(f"interplab: {best_ours:,.0f} tokens/s (best of {len(ours)}; median {statistics.median(ours):,.0f})")
    if theirs:
        best_theirs = max(theirs)
        print(f"SAELens:   {best_theirs:,.0f} tokens/s (best of {len(theirs)}; median {statistics.median(theirs):,.0f})")
        print(f"ratio interplab / SAELens: {best_ours / best_theirs:.2f}x (best), "
              f"{statistics.median(ours) / statistics.median(theirs):.2f}x (median)")
    if theirs_sparse:
        print(f"ratio interplab / SAELens with use_sparse_activations: {best_ours / max(theirs_sparse):.2f}x (best), "
              f"{statistics.median(ours) / statistics.median(theirs_sparse):.2f}x (median)")


if __name__ == "__main__":
    main()
