"""Training transcoders for several layers from one harvest pass, and splicing them in for the
MLPs to measure what they keep.

Harvest: one forward pass per batch of windows reads, for every layer L, the MLP's input side
(hook_resid_mid, or hook_resid_pre for parallel blocks) and its output (hook_mlp_out); the MLP
input is the block's own pre-MLP norm applied to the former (the norm module is called as a plain
function, so no extra hook is needed). Every transcoder takes one Adam step per batch.

Splicing: for windows, with next-token cross-entropy over non-special targets,

    L_clean     the model as it is
    L_tc        every chosen MLP's output replaced by its transcoder's output (all at once)
    L_ablated   those MLP outputs zero-ablated
    CE loss recovered = (L_ablated − L_tc) / (L_ablated − L_clean);   KL = mean KL(p_clean ‖ p_tc)

as `interplab.sae.downstream` defines them for one SAE (special tokens keep their real MLP output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from interplab.errors import UserInputError
from interplab.models.handle import LoadedModel, as_loaded
from interplab.sae.transcoder import Transcoder, TranscoderConfig
from interplab.sae.train import TrainConfig, lr_factor, sparsity_factor


def mlp_input_site(model: LoadedModel, layer: int) -> str:
    """The site whose activation, through the block's pre-MLP norm, is the MLP's input."""
    kind = "hook_resid_pre" if model.arch.parallel else "hook_resid_mid"
    return f"blocks.{layer}.{kind}"


def mlp_norm(model: LoadedModel, layer: int) -> nn.Module:
    """The block's pre-MLP norm (identity for families without one)."""
    path = model.arch.ln2
    return model.block_module(layer, path) if path else nn.Identity()


def check_layers(model: LoadedModel, layers: Sequence[int]) -> list[int]:
    n = model.n_layers
    bad = [layer for layer in layers if not isinstance(layer, int) or not -n <= layer < n]
    if not layers or bad:
        raise UserInputError(f"layers {list(layers)} are not valid for {model.model_id}: it has {n} blocks "
                             f"(valid 0..{n - 1} or -{n}..-1)")
    return sorted({layer % n for layer in layers})


@torch.no_grad()
def mlp_input(model: LoadedModel, raw: Tensor, layer: int) -> Tensor:
    """The MLP's input (float32, CPU) from rows harvested at `mlp_input_site`: through the pre-MLP norm."""
    return mlp_norm(model, layer)(raw.to(device=model.device, dtype=model.dtype)).float().cpu()


@torch.no_grad()
def mlp_pairs(model: LoadedModel, chunk, layer: int) -> tuple[Tensor, Tensor]:
    """(MLP input, MLP output) rows of one layer from a harvested chunk."""
    x = mlp_input(model, chunk.acts[model.site(mlp_input_site(model, layer)).name], layer)
    return x, chunk.acts[f"blocks.{layer}.hook_mlp_out"].float()


def train_transcoders(
    model, corpus, layers: Sequence[int], train: TrainConfig, *,
    d_sae: int, family: str = "topk", k: int | None = 32, skip: bool = False,
    context_length: int = 128, max_tokens: int | None = None, buffer_tokens: int = 32_768,
    batch_size: int = 1024,
) -> dict[int, Transcoder]:
    """One transcoder per layer, all trained on the same harvested batches (see the module docstring)."""
    from interplab.progress import progress
    from interplab.sae.store import ActivationStore, StoreConfig

    model = as_loaded(model)
    layers = check_layers(model, layers)
    sites = tuple(s for layer in layers for s in (mlp_input_site(model, layer), f"blocks.{layer}.hook_mlp_out"))
    store_cfg = StoreConfig(sites=sites, context_length=context_length, batch_size=batch_size,
                            buffer_tokens=max(buffer_tokens, 2 * batch_size), seed=train.seed)
    store = ActivationStore.from_corpus(model, corpus, store_cfg, max_tokens=max_tokens, repeat=True)
    generator = torch.Generator().manual_seed(train.seed)
    transcoders = {layer: Transcoder(TranscoderConfig(
        d_in=model.d_model, d_out=model.d_model, d_sae=d_sae, layer=layer, family=family,
        k=k if family == "topk" else None, skip=skip, model_id=model.model_id), generator=generator)
        for layer in layers}
    optimisers = {}
    for step, chunk in progress(zip(range(train.n_steps), store), train.progress, desc="transcoders", unit="step"):
        for layer, transcoder in transcoders.items():
            x, y = mlp_pairs(model, chunk, layer)
            if step == 0:
                transcoder.init_from_data_(x, y)
                optimisers[layer] = torch.optim.Adam(transcoder.parameters(), lr=train.lr or 1e-3,
                                                     betas=(train.adam_beta1, train.adam_beta2))
            _step(transcoder, optimisers[layer], x, y, step, train)
    return {layer: t.eval() for layer, t in transcoders.items()}


def _step(transcoder: Transcoder, optimiser, x: Tensor, y: Tensor, step: int, cfg: TrainConfig) -> None:
    for group in optimiser.param_groups:
        group["lr"] = (cfg.lr or 1e-3) * lr_factor(step, cfg)
    loss, _ = transcoder.loss(x, y, sparsity_factor(step, cfg))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip_norm:
        nn.utils.clip_grad_norm_(transcoder.parameters(), cfg.grad_clip_norm)
    optimiser.step()
    transcoder.apply_constraints_()


# --------------------------------------------------------------------------------------------
# Splicing
# --------------------------------------------------------------------------------------------


def splice_fns(model: LoadedModel, transcoders: dict[int, Transcoder], keep: Tensor | None = None,
               replace: Callable | None = None) -> dict:
    """Hook functions (site -> [fn]) that replace each layer's MLP output by `replace(layer, x, y)`
    (default: the transcoder's output on the MLP input x) at the tokens where `keep` (b, seq) is True."""
    fns: dict = {}
    for layer, transcoder in transcoders.items():
        stash: dict[str, Tensor] = {}
        norm = mlp_norm(model, layer)

        def remember(act, ctx, stash=stash):
            stash["x"] = act

        def swap(act, ctx, stash=stash, norm=norm, layer=layer, transcoder=transcoder):
            x = norm(stash.pop("x"))
            new = transcoder(x).to(act.dtype) if replace is None else replace(layer, x, act)
            if keep is None:
                return new
            mask = keep.to(act.device)[..., None]  # (b, seq) -> (b, seq, 1)
            return torch.where(mask, new, act)

        fns.setdefault(model.site(mlp_input_site(model, layer)), []).append(remember)
        fns.setdefault(model.site(f"blocks.{layer}.hook_mlp_out"), []).append(swap)
    return fns


@dataclass(frozen=True)
class SpliceMetrics:
    """The model's loss with transcoders in place of the chosen MLPs (see the module docstring)."""

    layers: list[int]
    """The MLPs replaced."""
    n_predictions: int
    """Next-token predictions scored."""
    clean_loss: float
    """L_clean (nats)."""
    transcoder_loss: float
    """L_tc: with every chosen MLP replaced by its transcoder."""
    ablated_loss: float
    """L_ablated: with those MLP outputs zero-ablated."""
    ce_loss_recovered: float
    """(L_ablated − L_tc) / (L_ablated − L_clean)."""
    kl: float
    """Mean KL(p_clean ‖ p_tc) per prediction (nats)."""

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_transcoders(model, transcoders: dict[int, Transcoder], windows: Tensor, *,
                         batch_size: int = 8) -> SpliceMetrics:
    """CE loss recovered and KL with all `transcoders` spliced in at once, on token windows (n, seq)."""
    from interplab.hooks import HookSession
    from interplab.sae.downstream import _keep_mask, _log_probs, _scored
    from interplab.scoring import kl_divergence, next_token_nll

    model = as_loaded(model)
    check_layers(model, list(transcoders))
    totals = dict(clean=0.0, tc=0.0, ablated=0.0, kl=0.0, n=0)
    keep_all = _keep_mask(model, windows, True)
    for start in range(0, windows.shape[0], batch_size):
        ids, keep = windows[start:start + batch_size], keep_all[start:start + batch_size]
        scored = _scored(model, ids)
        clean = _log_probs(model, ids)
        totals["clean"] += float(next_token_nll(clean, ids)[scored].sum())
        for name, replace in (("tc", None), ("ablated", lambda layer, x, y: torch.zeros_like(y))):
            session = HookSession(model, splice_fns(model, transcoders, keep, replace)).attach()
            try:
                log_probs = _log_probs(model, ids)
            finally:
                session.remove()
            totals[name] += float(next_token_nll(log_probs, ids)[scored].sum())
            if name == "tc":
                totals["kl"] += float(kl_divergence(clean[:, :-1], log_probs[:, :-1])[scored].sum())
        totals["n"] += int(scored.sum())
    n = max(totals["n"], 1)
    clean, tc, ablated = totals["clean"] / n, totals["tc"] / n, totals["ablated"] / n
    recovered = (ablated - tc) / (ablated - clean) if ablated != clean else float("nan")
    return SpliceMetrics(sorted(transcoders), totals["n"], clean, tc, ablated, recovered, totals["kl"] / n)
