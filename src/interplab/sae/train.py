"""Training SAEs on a stream of activation batches.

`train_saes` trains one or more SAEs (any mix of sizes and families, all with the same d_in) on one
iterator of (batch, d_in) tensors; `train_sae` is the one-SAE wrapper. Per step and per SAE:

    lr     = base_lr · (linear warm-up over the first lr_warmup_fraction of steps,
                        linear decay to 0 over the last lr_decay_fraction)      (Anthropic, April 2024)
    loss   = sae(x, dead_mask, sparsity_scale).loss   (sparsity_scale: linear warm-up of λ from 0)
    loss.backward(); remove the decoder-parallel gradient; clip the gradient norm; Adam step;
    renormalise the decoder rows / clamp θ ≥ 0; a latent is dead once it has not fired for
    dead_after_tokens tokens (Gao et al. 2024), and dead latents feed TopK's AuxK loss.

With `out_dir`, metrics go to out_dir/log.jsonl (one JSON object per SAE and logging step) and to
TensorBoard when installed; checkpoints go to out_dir/checkpoints/step_XXXXXXXX (written to a
temporary folder, then renamed into place); the trained SAEs to out_dir/<name>/.

Resuming (`resume=True`) loads the newest checkpoint, then consumes and discards the batches that
were already trained on, so give it a stream that yields the same batches in the same order as
the first run: the result then equals an uninterrupted run with the same seed.

Speed (docs/scaling.md): `precision` picks float32, bf16 autocast or TF32 matmuls with float32
master weights; TopK uses the sparse kernels on CPU and CUDA; the hot loop never reads a tensor
back to the host (metrics are read at log steps only; AuxK runs sync-free once a latent may be
dead). Under torchrun the same loop is data parallel (see `interplab.sae.parallel`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from interplab.errors import ArtifactError, UserInputError
from interplab.files import (append_jsonl, atomic_folder, atomic_write, config_field, finite_json, read_json_object,
                             read_jsonl, write_json, write_text)
from interplab.progress import progress_bar
from interplab.sae import parallel
from interplab.sae.config import SAEConfig
from interplab.sae.formats import load_sae, sae_digest, save_sae
from interplab.sae.metrics import evaluate_sae, fraction_of_variance_unexplained
from interplab.sae.model import B_DEC_INITS, SAE, SAEOutput

PRECISIONS = ("float32", "bf16", "tf32")
"""Values of TrainConfig.precision."""
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """How to train (shared by every SAE trained from one stream)."""

    n_steps: int
    """Number of optimiser steps, one per activation batch."""

    lr: float | None = None
    """Adam learning rate; None picks 2e-4 / √(d_sae / 2¹⁴) per SAE (the scaling of Gao et al. 2024,
    as in sparsify)."""

    adam_beta1: float = 0.9
    """Adam β₁."""

    adam_beta2: float = 0.999
    """Adam β₂."""

    lr_warmup_fraction: float = 0.01
    """Fraction of the steps over which the learning rate rises linearly from 0."""

    lr_decay_fraction: float = 0.2
    """Fraction of the steps at the end over which the learning rate falls linearly to 0
    (Anthropic's April 2024 update uses the last 20%)."""

    sparsity_warmup_fraction: float = 0.05
    """Fraction of the steps over which the L1 (relu) or L0 (jumprelu) coefficient rises linearly
    from 0 (Anthropic's April 2024 update uses 5%)."""

    grad_clip_norm: float | None = 1.0
    """Clip the gradient's global norm to this value; None disables clipping."""

    b_dec_init: str = "geometric_median"
    """Decoder bias at the start: 'geometric_median' (Bricken et al. 2023), 'mean' or 'zeros' of
    the first batches (after input normalisation)."""

    n_init_batches: int = 4
    """Batches read ahead to estimate the input scale and b_dec; they are then trained on as usual."""

    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens is dead (Gao et al. use 10M)."""

    dense_threshold: float = 0.1
    """Firing frequency above which evaluation counts a latent as dense."""

    log_every: int = 100
    """Write training metrics every this many steps (and at the last step)."""

    eval_every: int = 0
    """Evaluate on `eval_batches` every this many steps (0: only at the end, if they are given)."""

    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: none); needs an out_dir."""

    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""

    seed: int = 0
    """Seed of the weight initialisation (SAE number i uses seed + i)."""

    device: str = "cpu"
    """Device the SAEs train on ('cpu', 'cuda', 'cuda:1', ...); batches are moved there. Under
    torchrun, 'cuda' means each rank's own GPU (cuda:LOCAL_RANK)."""

    precision: str = "float32"
    """Arithmetic of the forward pass, with float32 master weights and optimiser state throughout:
    'float32'; 'bf16' (matmuls under torch.autocast in bfloat16; the sparse TopK path autocasts
    only the encoder matmul and keeps the decoder and losses in float32); 'tf32' (float32 with
    TensorFloat-32 matmuls on CUDA; the same as 'float32' on a CPU)."""

    progress: bool = False
    """Show a progress bar (the CLI turns it on; library calls stay quiet by default)."""

    tensorboard: bool = False
    """Also write metrics for TensorBoard into out_dir/tensorboard (needs the tensorboard package)."""

    def __post_init__(self) -> None:
        problems = _train_config_problems(self)
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))


_RESUMABLE_CHANGES = {"progress", "tensorboard", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "device"}
"""TrainConfig fields that may differ between a run and its resumption (they do not change results)."""


def default_lr(d_sae: int) -> float:
    """2e-4 / √(d_sae / 2¹⁴): the learning-rate scaling of Gao et al. 2024 (as used by sparsify)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at 0-based `step`: linear warm-up, flat, linear decay to 0."""
    warmup = round(cfg.lr_warmup_fraction * cfg.n_steps)
    decay = round(cfg.lr_decay_fraction * cfg.n_steps)
    if step < warmup:
        return (step + 1) / warmup
    if decay and step >= cfg.n_steps - decay:
        return (cfg.n_steps - step) / decay
    return 1.0


def sparsity_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the L1/L0 coefficient at 0-based `step`: linear warm-up from 0, then 1."""
    warmup = round(cfg.sparsity_warmup_fraction * cfg.n_steps)
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


@dataclass
class _Run:
    """One SAE being trained and its optimiser state."""

    name: str
    sae: SAE
    optimizer: torch.optim.Optimizer
    base_lr: float
    tokens_since_fired: Tensor
    dead_free_until: int = 0
    """Global token count before which no latent can be dead (so AuxK is skipped without asking
    the device); refreshed from tokens_since_fired at log steps."""

    def refresh_dead_horizon(self, tokens: int, cfg: TrainConfig) -> None:
        """Reads the device once: with M = max tokens_since_fired now, nothing is dead before
        tokens + dead_after_tokens − M."""
        self.dead_free_until = tokens + cfg.dead_after_tokens - int(self.tokens_since_fired.max())


def train_sae(
    sae_config: SAEConfig,
    batches: Iterable[Tensor],
    train_config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    eval_batches: Sequence[Tensor] | None = None,
    resume: bool = False,
    group: parallel.Group | None = None,
) -> SAE:
    """Train one SAE on a stream of (batch, d_in) activation tensors; see `train_saes`.
    With out_dir, the trained SAE is saved to out_dir/sae."""
    return train_saes(
        {"sae": sae_config}, batches, train_config, out_dir=out_dir, eval_batches=eval_batches, resume=resume,
        group=group,
    )["sae"]


def train_saes(
    sae_configs: Mapping[str, SAEConfig] | Sequence[SAEConfig],
    batches: Iterable[Tensor],
    train_config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    eval_batches: Sequence[Tensor] | None = None,
    resume: bool = False,
    group: parallel.Group | None = None,
    seed_index: Mapping[str, int] | None = None,
) -> dict[str, SAE]:
    """Train several SAEs on one stream of (batch, d_in) activation tensors; returns them by name.

    sae_configs: {name: SAEConfig}, or a list (named '<family>_<d_sae>').
    batches: any iterable of float tensors (batch, d_in); one batch per step, read once. It may
        also yield {site: tensor} dicts: each SAE then reads the batch of its config's `site`.
    eval_batches: held-out batches for periodic and final evaluation (`evaluate_sae`).
    out_dir: folder for log.jsonl, TensorBoard, checkpoints and the trained SAEs (out_dir/<name>).
    resume: continue from the newest checkpoint in out_dir (see the module docstring); with no
        checkpoint there yet, start from scratch.
    group: the processes training together (default: the torchrun job this process joined, see
        `interplab.sae.parallel`, else this process alone). Each rank passes its own share of
        the batches; the result is that of one process on the ranks' batches concatenated.
    seed_index: {name: i}, so that SAE `name` is initialised with seed + i (default: its position).
    """
    group = group if group is not None else parallel.current()
    train_config = dataclasses.replace(train_config, device=parallel.device_for_rank(train_config.device))
    configs = _named_configs(sae_configs)
    out = _check_train_call(configs, train_config, out_dir, eval_batches, resume)
    writes = out if group.is_writer else None
    checkpoint = _latest_checkpoint(out) if resume and out is not None else None
    stream = iter(batches)
    if checkpoint is not None:
        runs, step, tokens = _resume_runs(checkpoint, configs, train_config, group)
        _skip_batches(stream, step)
    else:
        _refuse_existing_run(out)
        stream, runs = _fresh_runs(configs, stream, train_config, group, seed_index or {})
        step = tokens = 0
    for run in runs:
        run.refresh_dead_horizon(tokens, train_config)
    group.barrier()  # every rank has read what it needs before rank 0 writes
    if writes is not None:
        _write_run_file(writes / RUN_FILE, configs, train_config, group.world_size)
    logger = _MetricsLog(writes, train_config, resume_step=step)
    try:
        _train_loop(runs, stream, train_config, step, tokens, writes, logger,
                    eval_batches if group.is_writer else None, group)
    finally:
        logger.close()
    if writes is not None:
        for run in runs:
            save_sae(run.sae, writes / run.name)
    return {run.name: run.sae for run in runs}


def _train_loop(
    runs: list[_Run], stream: Iterator[Tensor], cfg: TrainConfig, step: int, tokens: int,
    out: Path | None, logger: _MetricsLog, eval_batches: Sequence[Tensor] | None, group: parallel.Group,
) -> None:
    """The loop: one batch per step, every SAE steps on it; log, evaluate and checkpoint on schedule.
    Nothing here reads the device except at log, eval and checkpoint steps."""
    started, start_tokens = time.perf_counter(), tokens
    show = cfg.progress and group.is_writer
    with progress_bar(show, total=cfg.n_steps, initial=step, unit="step", desc="SAE") as bar:
        while step < cfg.n_steps:
            batch = next(stream, None)
            sizes = group.batch_sizes(0 if batch is None else _batch_rows(batch))
            if 0 in sizes:
                warnings.warn(f"the activation stream ended after {step} of {cfg.n_steps} steps", stacklevel=3)
                break
            inputs = {run.name: _run_input(run, batch, step, cfg) for run in runs}
            weight = sizes[group.rank] / sum(sizes)  # local mean loss -> global mean gradient
            outputs = {run.name: _train_step(run, inputs[run.name], step + 1, cfg, tokens, sum(sizes), weight, group)
                       for run in runs}
            step, tokens = step + 1, tokens + sum(sizes)
            speed = (tokens - start_tokens) / max(time.perf_counter() - started, 1e-9)
            if step % cfg.log_every == 0 or step == cfg.n_steps:
                records = [_train_record(run, inputs[run.name], outputs[run.name], step, tokens, cfg) for run in runs]
                for run in runs:
                    run.refresh_dead_horizon(tokens, cfg)
                logger.write([{**r, "tokens_per_s": speed, "world_size": group.world_size} for r in records])
                bar.set_postfix(loss=f"{records[0]['loss']:.4g}", fvu=f"{records[0]['fvu']:.3f}")
            if eval_batches and (step == cfg.n_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                logger.write([_eval_record(run, eval_batches, step, tokens, cfg) for run in runs])
            if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save_checkpoint(out, runs, step, tokens, cfg)
            bar.update(1)


def _batch_rows(batch: Tensor | Mapping[str, Tensor]) -> int:
    first = next(iter(batch.values()), None) if isinstance(batch, Mapping) else batch
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else 1


def _run_input(run: _Run, batch: Tensor | Mapping[str, Tensor], step: int, cfg: TrainConfig) -> Tensor:
    """The SAE's input this step (the batch, or its site's entry of a {site: batch} dict), checked
    and on the training device."""
    x = _site_batch(batch, run.sae.cfg.site, step)
    _check_batch(x, run.sae.cfg.d_in, step)
    return x.to(cfg.device, non_blocking=True)


def _site_batch(batch, site: str, index: int):
    if not isinstance(batch, Mapping):
        return batch
    if site not in batch:
        raise ValueError(f"batch {index} holds sites {sorted(batch)} but an SAE reads {site!r}")
    return batch[site]


def _train_step(run: _Run, x: Tensor, step: int, cfg: TrainConfig, tokens: int, n_global: int,
                weight: float, group: parallel.Group) -> SAEOutput:
    """One optimiser step of one SAE on batch x (step is 1-based; `tokens` were trained on before
    it; n_global rows are in this step's global batch, x holds the weight-fraction of them)."""
    sae = run.sae
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = run.base_lr * lr_factor(step - 1, cfg)
    dead = run.tokens_since_fired >= cfg.dead_after_tokens if tokens >= run.dead_free_until else None
    with _precision(cfg.precision, x.device):
        out = sae(x, dead_mask=dead, sparsity_scale=sparsity_factor(step - 1, cfg), host_sync=False)
    out.loss.backward()
    group.reduce_gradients_(list(sae.parameters()), weight)
    sae.project_decoder_grad_()
    if cfg.grad_clip_norm is not None:
        nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    sae.apply_constraints_()
    with torch.no_grad():
        if sae.cfg.family == "batchtopk":
            group.reduce_mean_(sae.threshold)  # each rank saw its own share of the batch
        run.tokens_since_fired += n_global
        run.tokens_since_fired.masked_fill_(group.reduce_fired(out.fired()), 0)
    return out


@contextmanager
def _precision(precision: str, device: torch.device):
    """The forward pass's arithmetic (TrainConfig.precision); parameters stay float32."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32" and device.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    else:
        yield


# --------------------------------------------------------------------------------------------
# Starting, resuming and checkpointing
# --------------------------------------------------------------------------------------------


def _fresh_runs(
    configs: dict[str, SAEConfig], stream: Iterator[Tensor], cfg: TrainConfig, group: parallel.Group,
    seed_index: Mapping[str, int],
) -> tuple[Iterator[Tensor], list[_Run]]:
    """New SAEs, initialised from the first batches, which are put back in front of the stream.
    Under torchrun the first batches of every rank are gathered, in the order of the global
    batches (batch i of rank 0, of rank 1, ..., then batch i + 1), so every rank starts from the
    SAE one process would build from the global batches."""
    first = list(itertools.islice(stream, cfg.n_init_batches))
    if not first and not group.distributed:
        raise ValueError("the activation stream yielded no batch")
    samples = {}
    for sae_cfg in configs.values():
        if sae_cfg.site not in samples:
            local = [_site_batch(x, sae_cfg.site, i) for i, x in enumerate(first)]
            for i, x in enumerate(local):
                _check_batch(x, sae_cfg.d_in, i)
            samples[sae_cfg.site] = _global_sample(local, sae_cfg.d_in, group)
    runs = []
    for i, (name, sae_cfg) in enumerate(configs.items()):
        sae = SAE(sae_cfg, generator=torch.Generator().manual_seed(cfg.seed + seed_index.get(name, i)))
        sae.init_from_data_(samples[sae_cfg.site], b_dec=cfg.b_dec_init)
        sae = sae.to(cfg.device)
        group.broadcast_(sae)
        runs.append(_new_run(name, sae, cfg))
    return itertools.chain(first, stream), runs


def _global_sample(local: list[Tensor], d_in: int, group: parallel.Group) -> Tensor:
    """The rows of the first global batches, in order (this rank's own at world size 1)."""
    per_rank = group.gather_objects([x.detach().reshape(-1, d_in).cpu() for x in local])
    n = min(len(batches) for batches in per_rank)
    if n == 0:
        raise UserInputError("the activation stream of at least one rank yielded no batch")
    return torch.cat([batches[i] for i in range(n) for batches in per_rank])


def _new_run(name: str, sae: SAE, cfg: TrainConfig) -> _Run:
    base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.cfg.d_sae)
    fused = sae.W_enc.device.type in ("cpu", "cuda")  # one kernel per step: ~4x faster than per-tensor Adam
    optimizer = torch.optim.Adam(sae.parameters(), lr=base_lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused)
    tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=cfg.device)
    return _Run(name, sae, optimizer, base_lr, tokens_since_fired)


def _save_checkpoint(out: Path, runs: list[_Run], step: int, tokens: int, cfg: TrainConfig) -> Path:
    """Write checkpoints/step_XXXXXXXX as one folder swapped in whole (SAEs and trainer state
    always from the same step), then prune old ones."""
    final = out / CHECKPOINTS_DIR / f"step_{step:08d}"
    with atomic_folder(final) as tmp:
        for run in runs:
            save_sae(run.sae, tmp / run.name)
        state = {
            "step": step,
            "tokens": tokens,
            "runs": {
                run.name: {"optimizer": run.optimizer.state_dict(), "tokens_since_fired": run.tokens_since_fired,
                           "sae_digest": sae_digest(run.sae)}
                for run in runs
            },
        }
        atomic_write(tmp / TRAINER_STATE_FILE, lambda path: torch.save(state, path))
    for old in _checkpoints(out)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with a dot and are skipped)."""
    root = out / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name))


def _latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[-1] if found else None


def _resume_runs(
    checkpoint: Path, configs: dict[str, SAEConfig], cfg: TrainConfig, group: parallel.Group
) -> tuple[list[_Run], int, int]:
    """Rebuild every run from a checkpoint, after checking it belongs to this training setup."""
    _check_same_setup(checkpoint.parent.parent / RUN_FILE, configs, cfg, group.world_size)
    state = _load_trainer_state(checkpoint / TRAINER_STATE_FILE, cfg.device)
    runs = []
    for name in configs:
        sae = load_sae(checkpoint / name)
        recorded = state["runs"][name].get("sae_digest")
        if recorded is not None and recorded != sae_digest(sae):
            raise ArtifactError(f"{checkpoint / name} does not belong to {checkpoint / TRAINER_STATE_FILE} "
                                "(another step's SAE); delete this checkpoint to resume from the one before")
        run = _new_run(name, sae.to(cfg.device), cfg)
        run.optimizer.load_state_dict(state["runs"][name]["optimizer"])
        run.tokens_since_fired.copy_(state["runs"][name]["tokens_since_fired"])
        runs.append(run)
    return runs, int(state["step"]), int(state["tokens"])


def _load_trainer_state(path: Path, device: str) -> dict:
    try:
        return torch.load(path, weights_only=True, map_location=device)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: the checkpoint is incomplete; delete it to resume "
                            "from the one before") from None
    except Exception as err:  # torch raises several types on a truncated or foreign file
        raise ArtifactError(f"{path} cannot be read ({err}); delete this checkpoint to resume from "
                            "the one before") from None


def _skip_batches(stream: Iterator[Tensor], n: int) -> None:
    """Consume the n batches a resumed run has already trained on."""
    skipped = sum(1 for _ in itertools.islice(stream, n))
    if skipped < n:
        raise ValueError(
            f"cannot resume: the checkpoint is at step {n} but the activation stream has only {skipped} "
            "batches; give the same stream as the interrupted run"
        )


def _write_run_file(path: Path, configs: dict[str, SAEConfig], cfg: TrainConfig, world_size: int = 1) -> None:
    data = {"train_config": dataclasses.asdict(cfg), "sae_configs": {n: c.to_dict() for n, c in configs.items()},
            "world_size": world_size}
    write_json(path, data)


def _check_same_setup(run_file: Path, configs: dict[str, SAEConfig], cfg: TrainConfig, world_size: int = 1) -> None:
    if not run_file.is_file():
        raise ValueError(f"cannot resume: {run_file} is missing, so the checkpoint's setup is unknown")
    saved = read_json_object(run_file, "training run file")
    config_field(saved, "train_config", dict, run_file, what="training run file")
    if saved.get("world_size", 1) != world_size:
        raise UserInputError(
            f"cannot resume: {run_file.parent} was trained by {saved.get('world_size', 1)} processes and "
            f"this job has {world_size}; each rank's share of the data depends on the number of "
            f"processes, so relaunch with {saved.get('world_size', 1)} in all (torchrun --nnodes x "
            "--nproc-per-node), or train into a new out_dir"
        )
    if config_field(saved, "sae_configs", dict, run_file, what="training run file") != {n: c.to_dict() for n, c in configs.items()}:
        raise ValueError(
            f"cannot resume: the SAE configs differ from those in {run_file}; resume with the same "
            "configs or train into a new out_dir"
        )
    current = dataclasses.asdict(cfg)
    changed = sorted(
        k for k, v in saved["train_config"].items() if k not in _RESUMABLE_CHANGES and current.get(k) != v
    )
    if changed:
        raise ValueError(
            f"cannot resume: TrainConfig fields {changed} differ from {run_file}; only "
            f"{sorted(_RESUMABLE_CHANGES)} may change when resuming"
        )


def _refuse_existing_run(out: Path | None) -> None:
    if out is not None and _checkpoints(out):
        raise ValueError(
            f"{out} already holds checkpoints of a training run; pass resume=True to continue it, "
            "or choose another out_dir"
        )


# --------------------------------------------------------------------------------------------
# Metrics logging
# --------------------------------------------------------------------------------------------


def _train_record(run: _Run, x: Tensor, out: SAEOutput, step: int, tokens: int, cfg: TrainConfig) -> dict[str, Any]:
    record: dict[str, Any] = {"kind": "train", "step": step, "tokens": tokens, "sae": run.name}
    record["lr"] = run.optimizer.param_groups[0]["lr"]
    record["loss"] = float(out.loss.detach())
    record.update({name: float(value.detach()) for name, value in out.losses.items()})
    record["fvu"] = fraction_of_variance_unexplained(x, out.reconstruction.detach())
    record["l0"] = float(out.l0().mean())
    record["dead_fraction"] = float((run.tokens_since_fired >= cfg.dead_after_tokens).double().mean())
    return record


def _eval_record(run: _Run, batches: Sequence[Tensor], step: int, tokens: int, cfg: TrainConfig) -> dict[str, Any]:
    metrics = evaluate_sae(run.sae, batches, dense_threshold=cfg.dense_threshold)
    return {"kind": "eval", "step": step, "tokens": tokens, "sae": run.name, **metrics.to_dict()}


class _MetricsLog:
    """Appends records to log.jsonl (dropping lines past a resumed step) and to TensorBoard."""

    def __init__(self, out: Path | None, cfg: TrainConfig, *, resume_step: int) -> None:
        self.path = out / LOG_FILE if out is not None else None
        if self.path is not None:
            _truncate_log(self.path, resume_step)
        self.writer = _tensorboard_writer(out, resume_step) if out is not None and cfg.tensorboard else None

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.path is not None:
            for record in records:
                append_jsonl(self.path, finite_json(record))  # one write per line: a kill tears at most the last
        if self.writer is not None:
            for record in records:
                for key, value in record.items():
                    if key not in ("kind", "step", "sae") and isinstance(value, (int, float)):
                        self.writer.add_scalar(f"{record['sae']}/{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_log(path: Path, resume_step: int) -> None:
    """Fresh run: start an empty log. Resumed run: keep only the lines up to the checkpoint's step."""
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step] if resume_step else []
    write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))


def _tensorboard_writer(out: Path, resume_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("TrainConfig(tensorboard=True) but the tensorboard package is not installed: metrics "
                      "go to log.jsonl only (pip install tensorboard)", UserWarning, stacklevel=4)
        return None
    return SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)


# --------------------------------------------------------------------------------------------
# Input checks (before any work starts)
# --------------------------------------------------------------------------------------------


def _named_configs(sae_configs: Mapping[str, SAEConfig] | Sequence[SAEConfig]) -> dict[str, SAEConfig]:
    if isinstance(sae_configs, SAEConfig):
        raise TypeError("train_saes takes several configs ({name: SAEConfig} or a list); use train_sae for one")
    if isinstance(sae_configs, Mapping):
        named = dict(sae_configs)
    else:
        named = {}
        for cfg in sae_configs:
            base = f"{getattr(cfg, 'family', 'sae')}_{getattr(cfg, 'd_sae', '')}"
            name, n = base, 2
            while name in named:
                name, n = f"{base}_{n}", n + 1
            named[name] = cfg
    if not named:
        raise ValueError("give at least one SAEConfig to train")
    for name, cfg in named.items():
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SAE {name!r}: expected an SAEConfig, got {type(cfg).__name__}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in (CHECKPOINTS_DIR, "tensorboard"):
            raise ValueError(
                f"SAE name {name!r} must be a folder name of letters, digits, '_', '.', '-' "
                f"(and not {CHECKPOINTS_DIR!r} or 'tensorboard')"
            )
    by_site: dict[str, set[int]] = {}
    for cfg in named.values():
        by_site.setdefault(cfg.site, set()).add(cfg.d_in)
    for site, d_ins in by_site.items():
        if len(d_ins) > 1:
            where = f" at site {site!r}" if site else ""
            raise ValueError(f"SAEs trained on one stream{where} must share d_in; got {sorted(d_ins)}")
    return named


def _check_train_call(
    configs: dict[str, SAEConfig], cfg: TrainConfig, out_dir: str | Path | None,
    eval_batches: Sequence[Tensor] | None, resume: bool,
) -> Path | None:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig, got {type(cfg).__name__}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir that holds the checkpoints")
    if cfg.checkpoint_every and out_dir is None:
        raise ValueError("checkpoint_every needs an out_dir to write checkpoints to")
    if eval_batches is not None:
        d_in = next(iter(configs.values())).d_in
        for i, x in enumerate(eval_batches):
            _check_batch(x, d_in, i, what="eval batch")
    return Path(out_dir) if out_dir is not None else None


def _check_batch(x: Any, d_in: int, index: int, *, what: str = "batch") -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{what} {index} must be a float tensor of shape (batch, {d_in}), got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    if x.dim() != 2 or x.shape[1] != d_in or x.shape[0] == 0:
        raise ValueError(f"{what} {index} has shape {tuple(x.shape)}; the SAEs need (batch, {d_in}) with batch > 0")


def _train_config_problems(cfg: TrainConfig) -> list[str]:
    problems = []

    def positive_int(name: str, minimum: int = 1) -> None:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"{name} must be an int >= {minimum}, got {value!r}")

    positive_int("n_steps")
    positive_int("n_init_batches")
    positive_int("dead_after_tokens")
    positive_int("log_every")
    positive_int("keep_checkpoints")
    positive_int("eval_every", 0)
    positive_int("checkpoint_every", 0)
    positive_int("seed", 0)
    if cfg.lr is not None and not (isinstance(cfg.lr, (int, float)) and 0 < cfg.lr < math.inf):
        problems.append(f"lr must be a positive number or None, got {cfg.lr!r}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            problems.append(f"{name} must be in [0, 1), got {getattr(cfg, name)!r}")
    for name in ("lr_warmup_fraction", "lr_decay_fraction", "sparsity_warmup_fraction", "dense_threshold"):
        if not 0 <= getattr(cfg, name) <= 1:
            problems.append(f"{name} must be in [0, 1], got {getattr(cfg, name)!r}")
    if cfg.lr_warmup_fraction + cfg.lr_decay_fraction > 1:
        problems.append("lr_warmup_fraction + lr_decay_fraction must not exceed 1")
    if cfg.grad_clip_norm is not None and not cfg.grad_clip_norm > 0:
        problems.append(f"grad_clip_norm must be > 0 or None, got {cfg.grad_clip_norm!r}")
    try:
        torch.device(cfg.device)
    except (RuntimeError, TypeError):
        problems.append(f"device {cfg.device!r} is not a torch device such as 'cpu' or 'cuda'")
    if cfg.precision not in PRECISIONS:
        problems.append(f"precision must be one of {list(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.b_dec_init not in B_DEC_INITS:
        problems.append(f"b_dec_init must be one of {list(B_DEC_INITS)}, got {cfg.b_dec_init!r}")
    return problems
