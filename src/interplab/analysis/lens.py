"""Lenses: read the residual stream as if it were the last layer.

Logit lens (nostalgebraist 2020): apply the model's final norm and unembedding to the residual
stream after every block, giving each layer's "current guess" of the next token. At the last
block this is exactly the model's own logits.

Direct logit attribution (Elhage et al. 2021, "A Mathematical Framework for Transformer
Circuits"): the residual stream at the answer position is a sum of what each part wrote into
it (embeddings, every head through its slice of the output projection, attention biases, every
MLP), so a linear readout of it splits into one term per part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.analysis.cells import capture_run, unembed_logits
from interplab.analysis.report import Grid
from interplab.analysis.tasks import EncodedTask, Task, answer_token_ids, token_texts
from interplab.cache import capture
from interplab.models.handle import LoadedModel, as_loaded
from interplab.types import ModelLike


def lens_logits(model: ModelLike, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Logits read from a residual stream: final norm, then unembedding (and soft-cap, if any)."""
    model = as_loaded(model)
    with torch.no_grad():
        return unembed_logits(model, model.ln_final(resid.to(model.device)))


@dataclass
class LensResult:
    """The logit lens over every layer and position of some prompts."""

    tokens: list[list[str]]
    """Each prompt's input tokens."""
    rows: list[str]
    """Read-out points: "embed" (block 0's input), then "L0".."L{n-1}" (each block's output)."""
    top_ids: Tensor
    """(batch, rows, seq, k) most likely next tokens."""
    top_log_probs: Tensor
    """(batch, rows, seq, k) their log-probabilities (natural log; float32 probabilities would
    underflow to 0 at early layers, where the lens is far from confident)."""
    top_tokens: list
    """top_ids as strings, nested like top_ids."""
    answer_log_prob: Tensor | None = None
    """(batch, rows, seq) log-probability of each prompt's answer token, when an answer was given."""
    answer_rank: Tensor | None = None
    """(batch, rows, seq) rank of the answer (0: the lens's top token)."""
    answers: list[str] | None = None

    def __repr__(self) -> str:
        answer = f", answers {self.answers[:3]!r}{'...' if len(self.answers) > 3 else ''}" if self.answers else ""
        return (f"LensResult({len(self.tokens)} prompts x {len(self.rows)} read-outs{answer}; "
                ".grid(prompt, 'answer_log_prob' | 'answer_rank' | 'top_log_prob') to plot or save)")

    def grid(self, prompt: int = 0, value: str = "answer_log_prob") -> Grid:
        """rows x positions of one prompt: "answer_log_prob", "answer_rank" or "top_log_prob"."""
        n = len(self.tokens[prompt])
        if value == "top_log_prob":
            values = self.top_log_probs[prompt, :, :n, 0]
        elif value in ("answer_log_prob", "answer_rank") and self.answer_log_prob is not None:
            values = getattr(self, value)[prompt, :, :n].float()
        else:
            raise ValueError(f"value must be 'top_log_prob', or 'answer_log_prob'/'answer_rank' when an "
                             f"answer was given; got {value!r}")
        cols = [f"{p} {t}" for p, t in enumerate(self.tokens[prompt])]
        what = value.replace("_", " ") + (f" of {self.answers[prompt]!r}" if value != "top_log_prob" else "")
        return Grid(values, list(self.rows), cols, title=f"logit lens: {what}", value_name=value)

    def top_token_table(self, prompt: int = 0) -> list[list[str]]:
        """rows x positions: the lens's top token at each point (for annotating heatmaps)."""
        n = len(self.tokens[prompt])
        return [[cell[0] for cell in row[:n]] for row in self.top_tokens[prompt]]

    def _repr_html_(self) -> str:
        """The first prompt's lens as the workbench shows it: each cell the layer's top next-token
        guess, shaded by its probability."""
        import html

        n = len(self.tokens[0])
        head = "".join(f"<th>{html.escape(repr(t))}</th>" for t in self.tokens[0])
        rows = []
        for r, name in enumerate(self.rows):
            cells = "".join(
                f'<td style="background: rgba(37, 99, 235, {float(self.top_log_probs[0, r, p, 0].exp()):.3f})" '
                f'title="log p {float(self.top_log_probs[0, r, p, 0]):.3f}">{html.escape(self.top_tokens[0][r][p][0])}</td>'
                for p in range(n))
            rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
        return (f'<table class="interplab-lens" style="font-family: monospace; border-collapse: collapse">'
                f"<tr><th></th>{head}</tr>{''.join(rows)}</table>")


def logit_lens(model: ModelLike, prompts: str | Sequence[str], *, answer: str | Sequence[str] | None = None,
               top_k: int = 5, batch_size: int = 8) -> LensResult:
    """The top-k tokens, and the answer's log-probability and rank, at every layer and position.

    `answer`: one word (for all prompts) or one per prompt; it must be a single token.
    """
    model = as_loaded(model)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    answers = _answers(answer, len(texts))
    tokenizer = model.require_tokenizer()
    answer_ids = None if answers is None else answer_token_ids(tokenizer, answers, "error", "lens")
    if not 1 <= top_k <= model.vocab_size:
        raise ValueError(f"top_k must be in 1..{model.vocab_size}, got {top_k}")
    sites = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(model.n_layers)]
    parts = [_lens_batch(model, texts[i:i + batch_size], sites, top_k,
                         None if answer_ids is None else answer_ids[i:i + batch_size])
             for i in range(0, len(texts), batch_size)]
    width = max(p["top_ids"].shape[2] for p in parts)
    merged = {key: torch.cat([_pad_seq(p[key], width) for p in parts]) for key in parts[0] if key != "tokens"}
    tokens = [t for p in parts for t in p["tokens"]]
    unique = merged["top_ids"].unique().tolist()
    texts = dict(zip(unique, token_texts(tokenizer, unique)))  # decode each distinct id once
    top_tokens = [[[[texts[i] for i in cell] for cell in row] for row in prompt] for prompt in merged["top_ids"].tolist()]
    return LensResult(tokens, ["embed"] + [f"L{i}" for i in range(model.n_layers)], merged["top_ids"],
                      merged["top_log_probs"], top_tokens, merged.get("answer_log_prob"), merged.get("answer_rank"), answers)


def _answers(answer, n: int) -> list[str] | None:
    if answer is None:
        return None
    answers = [answer] * n if isinstance(answer, str) else list(answer)
    if len(answers) != n:
        raise ValueError(f"give one answer for all prompts or one per prompt ({n}), got {len(answers)}")
    return answers


def _lens_batch(model: LoadedModel, texts: list[str], sites: list[str], top_k: int, answer_ids) -> dict:
    cache = capture(model, sites, texts, padding_side="right", device="cpu")  # assembled on the CPU below
    lengths = cache.attention_mask.sum(-1)
    tokenizer = model.require_tokenizer()
    out: dict[str, list] = {"top_ids": [], "top_log_probs": [], "answer_log_prob": [], "answer_rank": []}
    for site in sites:
        log_probs = lens_logits(model, cache[site]).float().log_softmax(-1)  # (batch, seq, vocab)
        top = log_probs.topk(top_k, dim=-1)
        out["top_ids"].append(top.indices)
        out["top_log_probs"].append(top.values)
        if answer_ids is not None:
            target = log_probs[..., answer_ids.tolist()].diagonal(dim1=0, dim2=2).permute(1, 0)  # (batch, seq)
            out["answer_log_prob"].append(target)
            out["answer_rank"].append((log_probs > target[..., None]).sum(-1))
    result = {key: torch.stack(values, dim=1) for key, values in out.items() if values}  # (batch, rows, seq, ...)
    result["tokens"] = [token_texts(tokenizer, cache.input_ids[b, : lengths[b]].tolist())
                        for b in range(len(texts))]
    return result


def _pad_seq(t: Tensor, width: int) -> Tensor:
    if t.shape[2] == width:
        return t
    pad = torch.zeros(*t.shape[:2], width - t.shape[2], *t.shape[3:], dtype=t.dtype)
    return torch.cat([t, pad], dim=2)


# --- direct logit attribution -----------------------------------------------------------------

@dataclass(frozen=True)
class FinalNorm:
    """The final norm as gain * (x - mean(x) if centred) / scale(x) + bias."""

    gain: Tensor
    bias: Tensor | None
    center: bool
    eps: float

    def scale(self, x: Tensor) -> Tensor:
        """(..., 1): sqrt(mean of squares (centred for LayerNorm) + eps), as the norm computes it."""
        x = self.centred(x)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def centred(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.center else x

    def frozen(self, c: Tensor, scale: Tensor) -> Tensor:
        """The norm applied to a part c of the residual with the scale held fixed (no bias)."""
        return self.centred(c) * self.gain / scale


def final_norm(model: LoadedModel) -> FinalNorm:
    """Read the final norm's gain, bias and eps (LayerNorm, or an RMSNorm of any flavour: its gain
    is measured by normalising a vector of ones, so Gemma's (1 + weight) is covered)."""
    norm = model.ln_final
    with torch.no_grad():
        if isinstance(norm, nn.LayerNorm):
            d = norm.normalized_shape[-1]
            gain = norm.weight.detach() if norm.weight is not None else torch.ones(d)
            bias = norm.bias.detach() if norm.bias is not None else None
            return FinalNorm(gain.float().cpu(), None if bias is None else bias.float().cpu(), True, float(norm.eps))
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:
            raise ValueError(f"the final norm {type(norm).__name__} is neither a LayerNorm nor an RMSNorm "
                             "with an eps attribute; direct logit attribution cannot freeze its scale")
        ones = torch.ones(1, model.d_model, device=model.device, dtype=model.dtype)
        gain = norm(ones)[0].float().cpu() * math.sqrt(1 + float(eps))
        return FinalNorm(gain, None, False, float(eps))


@dataclass
class DLAResult:
    """Each part's direct contribution to the readout at the answer position (mean over prompts)."""

    heads: Tensor
    """(layers, heads) contribution of each head (through its slice of the output projection)."""
    mlps: Tensor
    """(layers,) contribution of each MLP output."""
    embed: float
    """Contribution of block 0's input (token and position embeddings)."""
    biases: float
    """Attention output biases, the final norm's bias and the unembedding's bias."""
    total: float
    """Sum of all contributions; equals `readout` (the decomposition is exact)."""
    readout: float
    """The model's own logit difference (or answer logit) before any final soft-cap."""
    per_prompt: dict
    """The same terms per prompt: "heads" (batch, layers, heads), "mlps", "embed", "biases"."""
    meta: dict

    def __repr__(self) -> str:
        top = ", ".join(f"{name} {value:+.2f}" for name, value in self.top(3))
        return (f"DLAResult(readout {self.readout:.3f} = sum of parts {self.total:.3f}; largest: {top}; "
                ".top(k), .grid() to plot or save)")

    def grid(self) -> Grid:
        """layers x (H0..Hn, mlp)."""
        values = torch.cat([self.heads, self.mlps[:, None]], dim=1)
        n_layers, n_heads = self.heads.shape
        return Grid(values, [f"L{i}" for i in range(n_layers)], [f"H{h}" for h in range(n_heads)] + ["mlp"],
                    title=f"direct logit attribution ({self.meta['what']}; embed {self.embed:+.3g}, "
                          f"biases {self.biases:+.3g})", value_name="contribution",
                    meta={**self.meta, "embed": self.embed, "biases": self.biases, "total": self.total,
                          "readout": self.readout})

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The k parts with the largest |contribution|."""
        parts = [(f"L{l}H{h}", float(self.heads[l, h])) for l in range(self.heads.shape[0])
                 for h in range(self.heads.shape[1])]
        parts += [(f"L{l}.mlp", float(self.mlps[l])) for l in range(len(self.mlps))]
        parts += [("embed", self.embed), ("biases", self.biases)]
        return sorted(parts, key=lambda p: -abs(p[1]))[:k]


def direct_logit_attribution(model: ModelLike, task: Task | EncodedTask) -> DLAResult:
    """Split the logit difference (correct - incorrect; or the correct logit when the task has no
    incorrect answers) at each clean prompt's last token into one term per head, MLP, the
    embeddings and the biases.

    Frozen: the final norm is not linear, so its scale (the root mean square of the final
    residual, centred for LayerNorm) is taken from the clean run and held fixed; each part c
    then contributes (gain * c / scale) . (W_U[correct] - W_U[incorrect]), and the terms add up
    exactly to the model's own logit difference. A final logit soft-cap (Gemma 2) is not linear
    either, so the readout is the logit difference before the cap. Architectures that normalise
    attention or MLP outputs before adding them (Gemma 2/3, OLMo 2) have no per-head linear
    decomposition and are refused.
    """
    model = as_loaded(model)
    _check_decomposable(model)
    enc = task if isinstance(task, EncodedTask) else task.encode(model)
    n = model.n_layers
    sites = [model.site("blocks.0.hook_resid_pre"), model.site(f"blocks.{n - 1}.hook_resid_post")]
    sites += [model.site(f"blocks.{i}.{kind}") for i in range(n) for kind in ("attn.hook_z", "hook_mlp_out")]
    last = enc.last("clean")
    acts, _ = capture_run(model, enc.clean_ids, enc.clean_mask, last, sites)
    at_last = {site.name: acts[site][torch.arange(len(enc)), last].float() for site in sites}  # (batch, ...)
    return _decompose(model, enc, at_last)


def _check_decomposable(model: LoadedModel) -> None:
    arch = model.arch
    if arch.attn_out != arch.attn or arch.mlp_out != arch.mlp:
        raise ValueError(f"{arch.model_type} normalises attention/MLP outputs ({arch.attn_out}, {arch.mlp_out}) "
                         "before adding them to the residual stream, so heads do not add up linearly; direct "
                         "logit attribution needs blocks that add o_proj(z) and the MLP output directly")


def _decompose(model: LoadedModel, enc: EncodedTask, acts: dict[str, Tensor]) -> DLAResult:
    norm = final_norm(model)
    final = acts[f"blocks.{model.n_layers - 1}.hook_resid_post"]  # (batch, d_model)
    scale = norm.scale(final)  # (batch, 1), frozen from the clean run
    _check_norm(model, norm, final)
    w_u = model.unembed.weight.detach().float().cpu()
    direction = w_u[enc.correct] - (w_u[enc.incorrect] if enc.incorrect is not None else 0)  # (batch, d_model)
    read = _reader(norm, scale, direction)
    heads, mlps, bias_parts, rebuilt = [], [], [], acts["blocks.0.hook_resid_pre"].clone()
    for layer in range(model.n_layers):
        head_out, o_bias = _head_outputs(model, layer, acts[f"blocks.{layer}.attn.hook_z"])  # (batch, heads, d)
        mlp_out = acts[f"blocks.{layer}.hook_mlp_out"]
        heads.append(read(head_out))
        mlps.append(read(mlp_out))
        bias_parts.append(read(o_bias.expand_as(mlp_out)))
        rebuilt += head_out.sum(1) + o_bias + mlp_out
    _check_rebuilt(rebuilt, final, model)
    biases = torch.stack(bias_parts).sum(0) + _constant_terms(model, norm, enc)
    per_prompt = {"heads": torch.stack(heads, 1), "mlps": torch.stack(mlps, 1),
                  "embed": read(acts["blocks.0.hook_resid_pre"]), "biases": biases}
    total = per_prompt["heads"].sum((1, 2)) + per_prompt["mlps"].sum(1) + per_prompt["embed"] + biases
    readout = _readout(model, enc, final)
    what = "logit difference" if enc.incorrect is not None else "answer logit"
    return DLAResult(per_prompt["heads"].mean(0), per_prompt["mlps"].mean(0), float(per_prompt["embed"].mean()),
                     float(biases.mean()), float(total.mean()), float(readout.mean()), per_prompt,
                     {"model": model.model_id, "task": enc.task.name, "what": what, "n_prompts": len(enc),
                      "frozen": "final norm scale from the clean run"})


def _reader(norm: FinalNorm, scale: Tensor, direction: Tensor):
    """part (batch, [heads,] d_model) -> (batch, [heads]): frozen-norm readout along each prompt's direction."""

    def read(part: Tensor) -> Tensor:
        extra = [1] * (part.dim() - 2)
        frozen = norm.frozen(part, scale.view(scale.shape[0], *extra, 1))
        return (frozen * direction.view(direction.shape[0], *extra, -1)).sum(-1)

    return read


def _head_outputs(model: LoadedModel, layer: int, z: Tensor) -> tuple[Tensor, Tensor]:
    """z (batch, heads, d_head) -> each head's write into the residual (batch, heads, d_model), and
    the output projection's bias (d_model,) (zeros when it has none)."""
    proj = model.block_module(layer, model.arch.attn_o)
    weight = proj.weight.detach().float().cpu()
    weight = weight if isinstance(proj, nn.Linear) else weight.T  # GPT-2 Conv1D stores (in, out)
    per_head = weight.view(model.d_model, model.n_heads, model.d_head)  # (d_model, heads*d_head) -> (d_model, heads, d_head)
    out = torch.einsum("bhk,dhk->bhd", z, per_head)
    bias = proj.bias.detach().float().cpu() if getattr(proj, "bias", None) is not None else torch.zeros(model.d_model)
    return out, bias


def _constant_terms(model: LoadedModel, norm: FinalNorm, enc: EncodedTask) -> Tensor:
    """(batch,) the final norm's bias and the unembedding's bias, read out like any other part."""
    total = torch.zeros(len(enc))
    if norm.bias is not None:
        total += _pick(model.unembed.weight.detach().float().cpu() @ norm.bias, enc)
    lm_bias = getattr(model.unembed, "bias", None)
    if lm_bias is not None:
        total += _pick(lm_bias.detach().float().cpu(), enc)
    return total


def _pick(values: Tensor, enc: EncodedTask) -> Tensor:
    """values (vocab,) -> (batch,) value of the correct minus the incorrect answer."""
    return values[enc.correct] - (values[enc.incorrect] if enc.incorrect is not None else 0)


def _readout(model: LoadedModel, enc: EncodedTask, final: Tensor) -> Tensor:
    """The model's own logit difference at the last token, before any soft-cap."""
    with torch.no_grad():
        logits = model.unembed(model.ln_final(final.to(device=model.device, dtype=model.dtype))).float().cpu()
    rows = torch.arange(len(enc))
    out = logits[rows, enc.correct]
    return out - logits[rows, enc.incorrect] if enc.incorrect is not None else out


def _check_norm(model: LoadedModel, norm: FinalNorm, final: Tensor) -> None:
    with torch.no_grad():
        real = model.ln_final(final.to(device=model.device, dtype=model.dtype)).float().cpu()
    mine = norm.frozen(final, norm.scale(final)) + (norm.bias if norm.bias is not None else 0)
    if not torch.allclose(real, mine, atol=1e-4 * max(1.0, float(real.abs().max())), rtol=1e-3):
        raise ValueError(f"the final norm {type(model.ln_final).__name__} does not behave like a LayerNorm or "
                         "RMSNorm (gain * x / rms(x)); direct logit attribution cannot freeze its scale")


def _check_rebuilt(rebuilt: Tensor, final: Tensor, model: LoadedModel) -> None:
    error = float((rebuilt - final).abs().max())
    if error > 1e-3 * max(1.0, float(final.abs().max())):
        raise ValueError(f"embeddings + heads + MLP outputs differ from {model.model_id}'s final residual by "
                         f"{error:.3g}; this architecture adds something else to the residual stream, so "
                         "direct logit attribution would be incomplete")
