"""Grokking on modular addition (Power et al. 2022), explained as in Nanda et al. 2023.

A one-layer transformer sees the three tokens "a b =" for a prime p and predicts
(a + b) mod p. Trained full-batch on a fixed random 30% of all p^2 pairs with strong
weight decay, it first memorises the training pairs (train accuracy ~100%, test at
chance) and only much later generalises (test accuracy jumps to ~100%): a phase change.

Nanda et al. ("Progress measures for grokking via mechanistic interpretability", 2023)
showed that the generalising solution computes a + b through rotations: the embedding
maps each token a onto cos(w_k a), sin(w_k a) for a handful of key frequencies
w_k = 2 pi k / p, and the logits are sums of cos(w_k (a + b - c)). Two progress
measures built on that picture move smoothly long before test accuracy does:

* restricted loss: the loss when the logits keep only their key-frequency components
  cos(w_k(a+b)), sin(w_k(a+b)) (and the constant), i.e. only the generalising circuit;
* excluded loss: the training loss when exactly those components are removed, i.e.
  what memorisation alone achieves; it rises as the model comes to depend on the circuit.

The model is a plain `nn.Module` with TransformerLens / HF-like submodule names
(`embed`, `pos_embed`, `blocks.0.attn.{q,k,v,o}_proj`, `blocks.0.mlp.{in_proj,act,out_proj}`,
`unembed`), no LayerNorm (as in Nanda et al.), so ordinary torch hooks reach every part.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from interplab.errors import ArtifactError
from interplab.files import read_json_object
from interplab.progress import progress_bar
from interplab.toy.artifacts import FORMAT_VERSION, load_tensors, run_folder, save_tensors, write_json

#: memorisation = first logged step with train accuracy >= this
MEMORISATION_ACCURACY = 0.99
#: generalisation = first logged step with test accuracy >= this
GENERALISATION_ACCURACY = 0.95


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GrokkingConfig:
    """Data, model and optimiser settings for one grokking run.

    The defaults are tuned to grok on a 2-core CPU in a few minutes (measured numbers in
    docs/toy.md): p = 113 and the 0.3 training fraction as in the paper, but a narrower
    model (d_model 64, d_mlp 256) and a 5x higher learning rate. `GrokkingConfig.paper()`
    gives the settings of Nanda et al. 2023.
    """

    p: int = 113
    """The prime modulus; inputs are a, b in 0..p-1 and the label is (a + b) mod p."""
    train_fraction: float = 0.3
    """Fraction of the p^2 pairs used for training (fixed random split)."""
    d_model: int = 64
    """Residual stream width (paper: 128)."""
    n_heads: int = 4
    """Attention heads; d_head = d_model / n_heads (paper: 4)."""
    d_mlp: int = 256
    """MLP hidden width (paper: 512)."""
    lr: float = 5e-3
    """AdamW learning rate, after a linear warm-up (paper: 1e-3). Measured at p=113: 5e-3
    memorises at step 110 and generalises at steps 660-1550 (seeds 0-2); with seed 0, 3e-3
    generalises at 1810 (slower, more dramatic) and 1e-2 at 370, too soon for a clear delay."""
    weight_decay: float = 1.0
    """AdamW weight decay (paper: 1.0); grokking needs it."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (paper: (0.9, 0.98))."""
    warmup_steps: int = 10
    """Steps of linear learning-rate warm-up (paper: 10)."""
    steps: int = 3000
    """Maximum full-batch optimiser steps (paper: 40,000)."""
    stop_after_generalisation: int | None = 500
    """Stop this many steps after test accuracy reaches 95% (None: always run `steps`)."""
    eval_every: int = 10
    """Log train and test loss / accuracy every this many steps."""
    checkpoint_every: int = 100
    """Keep a copy of the weights every this many steps (used by the progress measures)."""
    seed: int = 0
    """Seed for the initial weights."""
    data_seed: int = 0
    """Seed for the train/test split."""

    def __post_init__(self) -> None:
        _check_config(self)

    @classmethod
    def paper(cls, **overrides) -> GrokkingConfig:
        """The settings of Nanda et al. 2023: d_model 128, 4 heads, d_mlp 512, lr 1e-3, weight decay 1.0,
        betas (0.9, 0.98), 10 warm-up steps, p = 113, 30% train, up to 40k full-batch steps.

        The run stops 3,000 steps after test accuracy reaches 95% (the paper trains on to 40k;
        pass stop_after_generalisation=None for that); the dynamics up to there are the same.
        """
        settings = dict(d_model=128, n_heads=4, d_mlp=512, lr=1e-3, steps=40_000, stop_after_generalisation=3000,
                        checkpoint_every=250, eval_every=20)
        return cls(**{**settings, **overrides})

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _check_config(config: GrokkingConfig) -> None:
    if not isinstance(config.p, int) or config.p <= 2 or not is_prime(config.p):
        raise ValueError(
            f"p must be a prime > 2, got {config.p!r}. With a prime every frequency k = 1..(p-1)/2 "
            "walks through all p residues (k*a mod p is a permutation), which is what the Fourier "
            "(rotation) algorithm the model learns relies on; p = 2 has no such frequency. "
            "Use e.g. p = 113 (the paper's), 97 or 59."
        )
    if not 0.0 < config.train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {config.train_fraction}")
    for name in ("d_model", "n_heads", "d_mlp", "steps", "eval_every", "checkpoint_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if config.d_model % config.n_heads:
        raise ValueError(f"d_model={config.d_model} must be divisible by n_heads={config.n_heads}")
    if config.lr <= 0 or config.weight_decay < 0 or config.warmup_steps < 0:
        raise ValueError("need lr > 0, weight_decay >= 0 and warmup_steps >= 0")
    if not all(0.0 <= b < 1.0 for b in config.betas) or len(config.betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {config.betas}")
    n_train = round(config.train_fraction * config.p**2)
    if n_train < 1 or n_train >= config.p**2:
        raise ValueError(f"train_fraction={config.train_fraction} leaves no train or no test pairs for p={config.p}")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ModularAdditionData:
    """All p^2 inputs "a b =" with labels (a + b) mod p and a fixed train/test split."""

    tokens: Int[Tensor, "pairs 3"]
    """Row a * p + b is (a, b, p); token p is "="."""
    labels: Int[Tensor, "pairs"]
    train_index: Int[Tensor, "train"]
    test_index: Int[Tensor, "test"]


def modular_addition_data(p: int, train_fraction: float, seed: int = 0) -> ModularAdditionData:
    a = torch.arange(p).repeat_interleave(p)  # (p*p,): 0,0,...,1,1,...
    b = torch.arange(p).repeat(p)  # (p*p,): 0,1,...,0,1,...
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * p * p)
    return ModularAdditionData(tokens, (a + b) % p, order[:n_train].sort().values, order[n_train:].sort().values)


# ----------------------------------------------------------------------------- model


class Attention(nn.Module):
    """Causal multi-head attention with separate q/k/v/o projections and no biases."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], last_only: bool = False
    ) -> Float[Tensor, "batch q d_model"]:
        """Attention output at every position, or only at the last one (q = 1) if `last_only`."""
        batch, pos, d_model = x.shape
        queries = x[:, -1:] if last_only else x

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, t.shape[1], self.n_heads, -1).transpose(1, 2)  # (b, s, d) -> (b, h, s, d_head)

        q, k, v = heads(self.q_proj(queries)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, h, q, s)
        query_pos = torch.arange(pos - q.shape[2], pos, device=x.device)
        future = torch.arange(pos, device=x.device)[None, :] > query_pos[:, None]  # (q, s): key after query
        pattern = scores.masked_fill(future, float("-inf")).softmax(-1)  # (b, h, q, s)
        z = (pattern @ v).transpose(1, 2).reshape(batch, q.shape[2], d_model)  # (b, h, q, d_head) -> (b, q, d)
        return self.o_proj(z)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.in_proj = nn.Linear(d_model, d_mlp)
        self.act = nn.ReLU()
        self.out_proj = nn.Linear(d_mlp, d_model)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.out_proj(self.act(self.in_proj(x)))


class Block(nn.Module):
    """resid += attn(resid); resid += mlp(resid) (no LayerNorm, as in Nanda et al.)."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.attn = Attention(d_model, n_heads)
        self.mlp = MLP(d_model, d_mlp)

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"], last_only: bool = False
    ) -> Float[Tensor, "batch q d_model"]:
        resid = (resid[:, -1:] if last_only else resid) + self.attn(resid, last_only)
        return resid + self.mlp(resid)


class GrokTransformer(nn.Module):
    """One-layer transformer for "a b =" -> (a + b) mod p; returns logits over the p answers."""

    def __init__(self, config: GrokkingConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.p + 1, config.d_model)  # tokens 0..p-1 and "=" (= p)
        self.pos_embed = nn.Embedding(3, config.d_model)
        self.blocks = nn.ModuleList([Block(config.d_model, config.n_heads, config.d_mlp)])
        self.unembed = nn.Linear(config.d_model, config.p, bias=False)
        self._init_weights(generator)

    def _init_weights(self, generator: torch.Generator | None) -> None:
        """N(0, 1/d_model) weights, zero biases, N(0, 1/d_vocab) unembedding (as Nanda et al.)."""
        std = 1.0 / math.sqrt(self.config.d_model)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=std, generator=generator)
        nn.init.normal_(self.unembed.weight, std=1.0 / math.sqrt(self.config.p + 1), generator=generator)

    def forward(self, tokens: Int[Tensor, "batch pos"], last_only: bool = False) -> Float[Tensor, "batch q p"]:
        """Logits at every position, or (`last_only`, about 2x cheaper) only at the last one.

        `last_only` skips the work whose result the answer never reads: queries, MLP and
        unembedding at the earlier positions of the last block.
        """
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        resid = self.embed(tokens) + self.pos_embed(positions)
        for i, block in enumerate(self.blocks):
            resid = block(resid, last_only=last_only and i == len(self.blocks) - 1)
        return self.unembed(resid)


def answer_logits(model: GrokTransformer, tokens: Int[Tensor, "batch 3"]) -> Float[Tensor, "batch p"]:
    """The logits at the "=" position, where the answer is read."""
    return model(tokens, last_only=True)[:, -1]


def cross_entropy(logits: Float[Tensor, "batch p"], labels: Int[Tensor, "batch"]) -> Tensor:
    """Cross-entropy computed in float64, as Nanda et al. do: once the train loss is ~1e-7,
    float32 rounding in log-softmax sets off loss spikes ("slingshots") late in training."""
    return F.cross_entropy(logits.double(), labels)


def weight_norm(model: nn.Module) -> float:
    """sqrt(sum of squared parameters): what weight decay shrinks."""
    return math.sqrt(sum(float((p.detach() ** 2).sum()) for p in model.parameters()))


# ----------------------------------------------------------------------------- training


@dataclass
class GrokkingHistory:
    """Curves logged every `eval_every` steps."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    weight_norm: list[float] = field(default_factory=list)


@dataclass
class GrokkingRun:
    """A trained model, its curves and the weights kept along the way."""

    config: GrokkingConfig
    model: GrokTransformer
    data: ModularAdditionData
    history: GrokkingHistory
    checkpoints: dict[int, dict[str, Tensor]]
    """step -> state dict (copies), every `checkpoint_every` steps and at the end."""
    seconds: float = 0.0
    steps_done: int = 0


def train_grokking(config: GrokkingConfig, *, progress: bool = False,
                   state_dir: str | Path | None = None) -> GrokkingRun:
    """Full-batch AdamW on the training pairs, logging curves and keeping checkpoints.

    With `state_dir`, every `checkpoint_every` steps the checkpoint and the full training state
    (weights, AdamW moments, warm-up schedule, curves) are written there, and a run that finds a
    state from an interrupted call with the same config continues from it; training is
    deterministic full-batch, so the result equals an uninterrupted run.
    """
    model = GrokTransformer(config, generator=torch.Generator().manual_seed(config.seed))
    data = modular_addition_data(config.p, config.train_fraction, config.data_seed)
    train_x, train_y = data.tokens[data.train_index], data.labels[data.train_index]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=config.betas
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    history, checkpoints = GrokkingHistory(), {}
    stop_at, first, earlier_seconds = config.steps, 0, 0.0
    state_dir = None if state_dir is None else Path(state_dir)
    resumed = state_dir is not None and (state_dir / STATE_FILE).exists()
    if resumed:
        first, stop_at, earlier_seconds = _restore_state(state_dir, config, model, optimizer, warmup, history,
                                                         checkpoints)
    start, step = time.perf_counter(), first
    bar = progress_bar(progress, total=config.steps, desc="grokking")
    for step in range(first, config.steps + 1):
        if step % config.checkpoint_every == 0 or step == stop_at:
            checkpoints[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if state_dir is not None and not (resumed and step == first):
                seconds = earlier_seconds + time.perf_counter() - start
                _save_state(state_dir, step, stop_at, seconds, config, model, optimizer, warmup, history,
                            checkpoints[step])
        logits = answer_logits(model, train_x)
        loss = cross_entropy(logits, train_y)
        if step % config.eval_every == 0 or step == stop_at:
            _log(history, step, model, data, loss, logits, train_y)
            stop_at = _maybe_stop_early(config, history, stop_at)
            _update_bar(bar, step, history)
        if step >= stop_at:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
    bar.close()
    return GrokkingRun(config, model, data, history, checkpoints, earlier_seconds + time.perf_counter() - start, step)


STATE_FILE = "train_state.pt"


def _save_state(directory: Path, step: int, stop_at: int, seconds: float, config: GrokkingConfig, model,
                optimizer, warmup, history: GrokkingHistory, checkpoint: dict[str, Tensor]) -> None:
    """The state at the start of `step` (before its forward pass), written atomically; the
    checkpoint file first, so that the state never points at a missing checkpoint."""
    from interplab.files import atomic_write

    save_tensors(directory / "checkpoints" / f"step_{step:06d}.safetensors", checkpoint)
    state = {"step": step, "stop_at": stop_at, "seconds": seconds, "config": _config_dict(config),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "warmup": warmup.state_dict(),
             "history": asdict(history)}
    atomic_write(directory / STATE_FILE, lambda tmp: torch.save(state, tmp))


def _restore_state(directory: Path, config: GrokkingConfig, model, optimizer, warmup, history: GrokkingHistory,
                   checkpoints: dict) -> tuple[int, int, float]:
    """Load the state written by `_save_state`; refuse one from another config."""
    from interplab.errors import UserInputError

    state = torch.load(directory / STATE_FILE, weights_only=True)
    if state["config"] != _config_dict(config):
        changed = sorted(k for k in state["config"] if state["config"][k] != _config_dict(config).get(k))
        raise UserInputError(f"{directory} holds a grokking run with other settings ({', '.join(changed)} differ); "
                             "choose another output folder, or overwrite it")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    warmup.load_state_dict(state["warmup"])
    for name, values in state["history"].items():
        getattr(history, name).extend(values)
    for path in sorted((directory / "checkpoints").glob("step_*.safetensors")):
        saved_step = int(path.stem.split("_")[1])
        if saved_step < state["step"]:
            checkpoints[saved_step] = load_tensors(path)
    return state["step"], state["stop_at"], state["seconds"]


def _log(history, step, model, data, loss, logits, train_y) -> None:
    test_loss, test_acc = evaluate(model, data.tokens[data.test_index], data.labels[data.test_index])
    history.step.append(step)
    history.train_loss.append(float(loss.detach()))
    history.train_accuracy.append(float((logits.detach().argmax(-1) == train_y).float().mean()))
    history.test_loss.append(test_loss)
    history.test_accuracy.append(test_acc)
    history.weight_norm.append(weight_norm(model))


def _maybe_stop_early(config: GrokkingConfig, history: GrokkingHistory, stop_at: int) -> int:
    if config.stop_after_generalisation is None or stop_at < config.steps:
        return stop_at  # no early stop asked for, or already scheduled
    if history.test_accuracy[-1] >= GENERALISATION_ACCURACY:
        return min(config.steps, history.step[-1] + config.stop_after_generalisation)
    return stop_at


@torch.no_grad()
def evaluate(
    model: GrokTransformer, tokens: Int[Tensor, "batch 3"], labels: Int[Tensor, "batch"]
) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) of the answer logits."""
    logits = answer_logits(model, tokens)
    return float(cross_entropy(logits, labels)), float((logits.argmax(-1) == labels).float().mean())


def _update_bar(bar, step: int, history: GrokkingHistory) -> None:
    bar.update(step - getattr(bar, "n", step))  # tqdm counts from its own n; the silent stand-in has none
    bar.set_postfix(train=f"{history.train_accuracy[-1]:.2f}", test=f"{history.test_accuracy[-1]:.2f}")


def phase_steps(history: GrokkingHistory) -> tuple[int | None, int | None]:
    """(memorisation step, generalisation step): the first logged step with train accuracy
    >= 99%, and the first with test accuracy >= 95%; None if never reached."""
    memorised = next((s for s, a in zip(history.step, history.train_accuracy) if a >= MEMORISATION_ACCURACY), None)
    generalised = next((s for s, a in zip(history.step, history.test_accuracy) if a >= GENERALISATION_ACCURACY), None)
    return memorised, generalised


# ----------------------------------------------------------------------------- Fourier analysis


def fourier_basis(p: int) -> Float[Tensor, "p p"]:
    """Orthonormal Fourier basis over Z_p: rows 1, cos(w_1 x), sin(w_1 x), cos(w_2 x), ...

    with w_k = 2 pi k / p for k = 1..(p-1)/2 (p odd). Row 2k-1 is cos of frequency k, row 2k sin.
    """
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
    basis = torch.stack(rows)
    return (basis / basis.norm(dim=1, keepdim=True)).float()


def embedding_frequency_norms(model: GrokTransformer) -> Float[Tensor, "frequencies"]:
    """Squared norm of the token embedding carried by each frequency k = 1..(p-1)/2.

    The embedding W_E (p number tokens x d_model) is written in the Fourier basis over the
    input token; frequency k's share is ||cos_k W_E||^2 + ||sin_k W_E||^2.
    """
    p = model.config.p
    W_E = model.embed.weight.detach()[:p]  # drop the "=" token
    coefficients = fourier_basis(p) @ W_E  # (p, d_model): row 0 constant, then cos/sin pairs
    per_row = (coefficients**2).sum(-1)
    return per_row[1:].view(-1, 2).sum(-1)  # (p-1,) -> ((p-1)/2, 2) -> ((p-1)/2,)


def key_frequencies(norms: Float[Tensor, "frequencies"], min_share: float = 3.0) -> list[int]:
    """The key frequencies: those carrying at least `min_share` times their uniform share of the norm.

    With (p-1)/2 frequencies, a frequency is key if it holds more than min_share * 2/(p-1) of
    the embedding's (non-constant) squared norm: 3 x 1/56 = 5.4% at p = 113. A trained model
    keeps a handful of frequencies and weight decay shrinks the rest, so the cut is clear;
    at least the strongest frequency is always returned. Returns k values (1-based), sorted.
    """
    shares = norms / norms.sum().clamp_min(1e-12)
    keys = torch.nonzero(shares > min_share / len(norms)).flatten()
    if len(keys) == 0:
        keys = shares.argmax().view(1)
    return sorted(int(k) + 1 for k in keys)


def key_frequency_fraction(model: GrokTransformer, keys: list[int]) -> float:
    """Fraction of the token embedding's squared norm carried by the key frequencies."""
    p = model.config.p
    norms = embedding_frequency_norms(model)
    total = float((model.embed.weight.detach()[:p] ** 2).sum())
    return float(norms[[k - 1 for k in keys]].sum()) / total


def _sum_directions(p: int, keys: list[int]) -> Float[Tensor, "directions pairs"]:
    """Orthonormal functions of (a, b): the constant, and cos/sin(w_k (a + b)) for each key k."""
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)  # matches the data's row order a * p + b
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    rows = [torch.ones(p * p, dtype=torch.float64)]
    for k in keys:
        angle = 2 * math.pi * k * (a + b) / p
        rows += [torch.cos(angle), torch.sin(angle)]
    directions = torch.stack(rows)
    return (directions / directions.norm(dim=1, keepdim=True)).float()


def restricted_and_excluded_logits(
    logits: Float[Tensor, "pairs p"], p: int, keys: list[int]
) -> tuple[Float[Tensor, "pairs p"], Float[Tensor, "pairs p"]]:
    """Split the logits over all p^2 inputs into the key-frequency part and the rest (Nanda et al. 2023).

    For every output c, the logit table L[a, b, c] is projected onto the functions
    cos(w_k (a + b)) and sin(w_k (a + b)) of the inputs for the key frequencies k (their span
    holds cos(w_k (a + b - c))). Restricted logits keep that projection plus the constant;
    excluded logits are L minus the projection (constant left in).
    """
    directions = _sum_directions(p, keys)  # (1 + 2K, p*p)
    coefficients = directions @ logits  # (1 + 2K, p)
    key_part = directions[1:].T @ coefficients[1:]  # (p*p, p)
    constant = directions[:1].T @ coefficients[:1]  # (p*p, p)
    return key_part + constant, logits - key_part


@dataclass(frozen=True)
class ProgressMeasures:
    """Nanda et al.'s progress measures at each checkpoint."""

    step: list[int]
    key_fraction: list[float]
    """Fraction of the embedding's squared norm in the key frequencies."""
    restricted_loss: list[float]
    """Test loss with only the key-frequency logit components (and the constant) kept."""
    excluded_loss: list[float]
    """Train loss with the key-frequency logit components removed."""


@torch.no_grad()
def progress_measures(run: GrokkingRun, keys: list[int]) -> ProgressMeasures:
    """Restricted loss, excluded loss and key-frequency fraction at every kept checkpoint."""
    config, data = run.config, run.data
    model = GrokTransformer(config)
    steps, fractions, restricted, excluded = sorted(run.checkpoints), [], [], []
    for step in steps:
        model.load_state_dict(run.checkpoints[step])
        logits = answer_logits(model, data.tokens)  # all p*p pairs, in row order a * p + b
        kept, removed = restricted_and_excluded_logits(logits, config.p, keys)
        restricted.append(float(cross_entropy(kept[data.test_index], data.labels[data.test_index])))
        excluded.append(float(cross_entropy(removed[data.train_index], data.labels[data.train_index])))
        fractions.append(key_frequency_fraction(model, keys))
    return ProgressMeasures(steps, fractions, restricted, excluded)


# ----------------------------------------------------------------------------- summary and saving


@dataclass(frozen=True)
class GrokkingSummary:
    """The measured quantities of a run (what `summary.json` holds)."""

    memorisation_step: int | None
    generalisation_step: int | None
    final_train_accuracy: float
    final_test_accuracy: float
    final_train_loss: float
    final_test_loss: float
    key_frequencies: list[int]
    key_fraction: float
    """Fraction of the final embedding's squared norm carried by the key frequencies."""
    steps: int
    seconds: float
    steps_per_second: float
    config: dict


def summarize(run: GrokkingRun, keys: list[int]) -> GrokkingSummary:
    memorised, generalised = phase_steps(run.history)
    h = run.history
    return GrokkingSummary(
        memorisation_step=memorised,
        generalisation_step=generalised,
        final_train_accuracy=h.train_accuracy[-1],
        final_test_accuracy=h.test_accuracy[-1],
        final_train_loss=h.train_loss[-1],
        final_test_loss=h.test_loss[-1],
        key_frequencies=keys,
        key_fraction=key_frequency_fraction(run.model, keys),
        steps=run.steps_done,
        seconds=run.seconds,
        steps_per_second=run.steps_done / max(run.seconds, 1e-9),
        config=_config_dict(run.config),
    )


def _config_dict(config: GrokkingConfig) -> dict:
    return {**asdict(config), "betas": list(config.betas)}


def save_run(run: GrokkingRun, directory: Path) -> None:
    """Write config.json, model.safetensors, checkpoints/step_XXXXXX.safetensors and history.json,
    as one folder swapped in whole."""
    with run_folder(directory, "grokking run folder") as tmp:
        write_run_files(run, tmp)


def write_run_files(run: GrokkingRun, directory: Path) -> None:
    """The files of `save_run`, written into an existing (temporary) folder."""
    config = {"format_version": FORMAT_VERSION, "kind": "grokking", **_config_dict(run.config)}
    write_json(directory / "config.json", config)
    save_tensors(directory / "model.safetensors", run.model.state_dict())
    for step, state in run.checkpoints.items():
        save_tensors(directory / "checkpoints" / f"step_{step:06d}.safetensors", state)
    write_json(directory / "history.json", asdict(run.history))


def load_model(directory: Path, step: int | None = None) -> GrokTransformer:
    """Load a saved model (the final weights, or the checkpoint at `step`)."""
    directory = Path(directory)
    raw = read_json_object(directory / "config.json", "grokking run config")
    if raw.get("format_version") != FORMAT_VERSION or raw.get("kind") != "grokking":
        raise ValueError(f"{directory} is not a grokking run folder (format_version {FORMAT_VERSION})")
    fields = {k: v for k, v in raw.items() if k not in ("format_version", "kind")}
    try:
        config = GrokkingConfig(**{**fields, "betas": tuple(fields["betas"])})
    except (TypeError, KeyError, ValueError) as err:
        raise ArtifactError(f"{directory / 'config.json'}: not a valid grokking config ({err})") from None
    checkpoints = directory / "checkpoints"
    path = directory / "model.safetensors" if step is None else checkpoints / f"step_{step:06d}.safetensors"
    if not path.exists():
        saved = sorted(p.name for p in checkpoints.glob("*.safetensors"))
        raise ArtifactError(f"{path} not found; saved checkpoints: {saved}")
    model = GrokTransformer(config)
    model.load_state_dict(load_tensors(path, "grokking weights file"))
    return model


def with_overrides(config: GrokkingConfig, **overrides) -> GrokkingConfig:
    """`config` with the given fields replaced (None values are ignored)."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
