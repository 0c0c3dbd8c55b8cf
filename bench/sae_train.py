"""TopK SAE training throughput: interplab against SAELens, sparsify and a plain PyTorch loop.

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

    python bench/sae_train.py --device cuda --d-in 2048 --d-sae 32768 --k 64 --compare-loops

`--compare-loops` prints, side by side in one run, interplab in float32 and under bf16 autocast
(with the FVU each reaches after the same steps on held-out activations), a ten-line plain
PyTorch TopK loop (dense encode, topk, dense decode, Adam) in float32 and bf16, and sparsify's
SparseCoder with its own training step (eai-sparsify, when installed). On CUDA the clock is
synchronised only at the first timed step and at the last one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch


class TimedStream:
    """Yields batches (cycling over a fixed list) and records when each one was asked for."""

    def __init__(self, batches: list[torch.Tensor], n: int, first: int = 0) -> None:
        self.batches, self.n, self.times, self.first = batches, n, [], first

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.n):
            if self.batches[0].is_cuda and i in (self.first, self.n - 1):
                torch.cuda.synchronize()  # only here: the loops must not be forced to sync
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


def run_interplab(batches, args, n_steps: int, precision: str = "float32", held_out=None):
    """tokens/s (and the FVU on `held_out` when given) of interplab's own training loop."""
    from interplab.sae import SAEConfig, TrainConfig, evaluate_sae, train_sae

    cfg = SAEConfig(d_in=args.d_in, d_sae=args.d_sae, family="topk", k=args.k)
    train_cfg = TrainConfig(n_steps=n_steps, lr=args.lr, progress=False, tensorboard=False, log_every=10**9,
                            b_dec_init="mean", n_init_batches=1, device=args.device, precision=precision)
    stream = TimedStream(batches, n_steps, args.warmup)
    sae = train_sae(cfg, stream, train_cfg)
    speed = stream.tokens_per_s(args.warmup, args.batch)
    if held_out is None:
        return speed
    return speed, evaluate_sae(sae, held_out).fvu


def run_plain_loop(batches, args, n_steps: int, bf16: bool) -> float:
    """The ten-line TopK loop of the issue: dense encode, topk, dense decode, MSE, Adam."""
    device, g = batches[0].device, torch.Generator().manual_seed(0)
    W_dec = torch.randn(args.d_sae, args.d_in, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(device).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc, b_dec = torch.zeros(args.d_sae, device=device, requires_grad=True), torch.zeros(args.d_in, device=device, requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=args.lr)
    stream = TimedStream(batches, n_steps, args.warmup)
    for x in stream:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            top = ((x - b_dec) @ W_enc + b_enc).topk(args.k, dim=-1)
            acts = torch.zeros(x.shape[0], args.d_sae, device=device, dtype=top.values.dtype)
            recon = acts.scatter(-1, top.indices, top.values.relu()) @ W_dec + b_dec
            loss = (recon.float() - x).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return stream.tokens_per_s(args.warmup, args.batch)


def run_sparsify(batches, args, n_steps: int) -> float:
    """sparsify's SparseCoder with the step its Trainer takes (bf16 autocast on CUDA, AuxK,
    decoder-parallel gradient removed, unit-norm decoder, dead-latent bookkeeping)."""
    from sparsify import SparseCoder, SparseCoderConfig

    device = batches[0].device
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    since_fired = torch.zeros(args.d_sae, dtype=torch.long, device=device)
    stream = TimedStream(batches, n_steps, args.warmup)
    for x in stream:
        out = sae(x, dead_mask=since_fired > 10_000_000)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()
        since_fired += x.shape[0]
        since_fired[out.latent_indices.flatten()] = 0
    return stream.tokens_per_s(args.warmup, args.batch)


def compare_loops(batches, held_out, args) -> None:
    """interplab (float32, bf16) against the plain loop (float32, bf16) and sparsify, one run."""
    speed32, fvu32 = run_interplab(batches, args, args.steps, "float32", held_out)
    speed16, fvu16 = run_interplab(batches, args, args.steps, "bf16", held_out)
    rows = [("interplab float32", speed32), ("interplab bf16 autocast", speed16),
            ("plain loop float32", run_plain_loop(batches, args, args.steps, False)),
            ("plain loop bf16 autocast", run_plain_loop(batches, args, args.steps, True))]
    try:
        import sparsify  # noqa: F401
    except ImportError:
        print("  sparsify is not installed (pip install eai-sparsify): skipped")
    else:
        rows.append(("sparsify SparseCoder", run_sparsify(batches, args, args.steps)))
    for name, speed in rows:
        print(f"  {name:26s} {speed:12,.0f} tokens/s   ({speed / speed16:.2f}x interplab bf16)")
    print(f"  FVU on held-out activations after {args.steps} steps: float32 {fvu32:.4f}, bf16 {fvu16:.4f}")


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
    parser.add_argument("--device", default="cpu", help="cpu or cuda (activations are put there beforehand)")
    parser.add_argument("--compare-loops", action="store_true",
                        help="interplab float32/bf16 vs a plain PyTorch loop and sparsify (and skip SAELens)")
    args = parser.parse_args()

    print(f"TopK SAE d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch}, "
          f"{args.steps} steps ({args.warmup} warm-up), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    batches = [x.to(args.device) for x in synthetic_activations(4, args.batch, args.d_in)]
    if args.compare_loops:
        held_out = [x.to(args.device) for x in synthetic_activations(2, args.batch, args.d_in, seed=1)]
        compare_loops(batches, held_out, args)
        return

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
