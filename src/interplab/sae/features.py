"""Features people can read: what makes each SAE latent fire, and what it does to the logits.

`build_feature_index` runs a corpus through the model and the SAE (or a transcoder: its latents
read the MLP input of its layer, ln2(resid_mid), and its decoder writes the MLP output straight
into the residual stream) once and stores, per latent, in one SQLite file (so that later queries
are instant):

- the top-activating contexts: a fixed-size heap per latent of the windows with the largest
  maximum activation (one entry per window), with the latent's activation on every token;
- a histogram of its non-zero activations: `n_bins` equal bins on [0, hi), where hi starts just
  above the first maximum seen (×1.01) and doubles (merging bins pairwise) whenever a value
  reaches it, so the counts are exact in one streaming pass;
- its firing density: the fraction of (non-special) tokens on which it is non-zero;
- its logit effects: the tokens its decoder direction promotes and suppresses through the
  unembedding, W_U (γ ⊙ r_i), where r_i is the decoder row W_dec[i] carried to the residual stream
  (through W_O for attn.hook_z, through W_down for mlp.hook_post; W_dec[i] / s_out for a
  transcoder, whose decoder writes the MLP output) and γ the final norm's weight
  when `fold_norm` (the "direct logit effect" of Bricken et al. 2023 / Neuronpedia, which
  ignores the norm's data-dependent scale);
- a cheap label built from the tokens it fires on and the tokens it promotes.

`inspect(text)` lists the latents active on each token; `contrast(a, b)` the latents whose mean
activation differs most between two sets of texts.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import ArtifactError, UserInputError
from interplab.files import atomic_write, tensors_digest
from interplab.models.handle import LoadedModel, as_loaded
from interplab.progress import progress as progress_items
from interplab.sae.downstream import resolve_sae_site
from interplab.sae.formats import sae_digest
from interplab.sae.model import SAE
from interplab.sae.store import Harvester, corpus_windows, special_token_ids
from interplab.sae.transcoder import Transcoder
from interplab.sites import Site
from interplab.tokens import special_token_mask

FORMAT_VERSION = 1
"""Version of the SQLite feature index layout."""

_HEADROOM = 1.01
"""A histogram's first range is this factor above the first maximum, so no value sits on its upper edge."""

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (id INTEGER PRIMARY KEY, fire_count INTEGER, density REAL, max_act REAL,
                       mean_act REAL, hist_max REAL, hist TEXT, label TEXT);
CREATE TABLE top_contexts (feature INTEGER, rank INTEGER, activation REAL, context INTEGER,
                           max_pos INTEGER, acts BLOB, snippet TEXT, PRIMARY KEY (feature, rank));
CREATE TABLE contexts (id INTEGER PRIMARY KEY, tokens TEXT);
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT);
CREATE TABLE logit_effects (feature INTEGER, kind TEXT, rank INTEGER, token INTEGER, value REAL,
                            PRIMARY KEY (feature, kind, rank));
"""


# --------------------------------------------------------------------------------------------
# Logit effects
# --------------------------------------------------------------------------------------------


def residual_directions(model: LoadedModel, site: Site, directions: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_model"]:
    """Directions at `site` carried linearly into the residual stream (biases ignored): identity for
    residual-width sites, through the attention output projection for attn.hook_z and through the
    MLP's down projection for mlp.hook_post."""
    if site.kind in ("attn.hook_z", "mlp.hook_post"):
        path = model.arch.attn_o if site.kind == "attn.hook_z" else model.arch.mlp_down
        weight = model.block_module(site.layer, path).weight.detach()
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)
        matrix = weight.T if weight.shape[0] == model.d_model and weight.shape[1] == directions.shape[1] else weight
        return directions.to(matrix.dtype) @ matrix
    return directions


def final_norm_scale(model: LoadedModel) -> Tensor | None:
    """γ, the final norm's elementwise weight as it multiplies the normalised residual (Gemma's
    RMSNorm multiplies by 1 + weight); None when the norm has no weight."""
    weight = getattr(model.ln_final, "weight", None)
    if weight is None:
        return None
    weight = weight.detach()
    return 1.0 + weight if "gemma" in type(model.ln_final).__name__.lower() else weight


def logit_effect_matrix(model: LoadedModel, sae: SAE | Transcoder, site: Site, features: Tensor, *,
                        fold_norm: bool = True) -> Float[Tensor, "n vocab"]:
    """W_U (γ ⊙ r_i) for the given latents i (see the module docstring); for a transcoder, `site` is
    the one it reads (its MLP input) and r_i = W_dec[i] / s_out, what one unit of latent i adds to
    the residual stream at the MLP output."""
    unembed = model.unembed.weight.detach()
    if isinstance(sae, Transcoder):
        directions = (sae.W_dec.detach()[features] / sae.output_scale).to(unembed.device)
    else:
        directions = residual_directions(model, site, sae.W_dec.detach()[features])
    if fold_norm and site.kind != "ln_final.hook_normalized":
        gamma = final_norm_scale(model)
        if gamma is not None:
            directions = directions * gamma.to(device=directions.device, dtype=directions.dtype)
    return directions.to(device=unembed.device, dtype=unembed.dtype) @ unembed.T


def feature_vocab_effect(model, sae: SAE, feature: int, *, site: str | None = None,
                         fold_norm: bool = True) -> Float[Tensor, " vocab"]:
    """One latent's logit effect on the whole vocabulary, W_U (γ ⊙ r_i)."""
    model = as_loaded(model)
    resolved = resolve_sae_site(model, sae, site)
    _check_feature(feature, sae.cfg.d_sae)
    return logit_effect_matrix(model, sae, resolved, torch.tensor([feature]), fold_norm=fold_norm)[0]


@torch.no_grad()
def top_logit_effects(model: LoadedModel, sae: SAE | Transcoder, site: Site, *, k: int = 10, fold_norm: bool = True,
                      chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(promoted ids, promoted values, suppressed ids, suppressed values), each (d_sae, k)."""
    parts = []
    for start in range(0, sae.cfg.d_sae, chunk):
        features = torch.arange(start, min(start + chunk, sae.cfg.d_sae))
        effects = logit_effect_matrix(model, sae, site, features, fold_norm=fold_norm).float()
        up, down = effects.topk(k, dim=-1), (-effects).topk(k, dim=-1)
        parts.append((up.indices, up.values, down.indices, -down.values))
    return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------


class FeatureStats:
    """Per-latent top contexts, histogram, firing count and activation sum, updated batch by batch."""

    def __init__(self, d_sae: int, context_length: int, *, n_top: int = 20, n_bins: int = 32) -> None:
        if n_bins < 2 or n_bins % 2:
            raise ValueError(f"n_bins must be an even number >= 2, got {n_bins}")
        if n_top < 1:
            raise ValueError(f"n_top must be >= 1, got {n_top}")
        self.n_top, self.n_bins = n_top, n_bins
        self.top_values = torch.zeros(d_sae, n_top)
        self.top_contexts = torch.full((d_sae, n_top), -1, dtype=torch.long)
        self.top_positions = torch.zeros(d_sae, n_top, dtype=torch.long)
        self.top_acts = torch.zeros(d_sae, n_top, context_length, dtype=torch.float16)
        self.fire_count = torch.zeros(d_sae, dtype=torch.long)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.hist = torch.zeros(d_sae, n_bins, dtype=torch.long)
        self.hist_max = torch.zeros(d_sae)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, acts: Float[Tensor, "b seq d_sae"], keep: Tensor, contexts: Int[Tensor, " b"]) -> None:
        """Add one batch of windows' latent activations (zero on tokens not kept)."""
        acts = acts * keep[..., None]
        self.n_tokens += int(keep.sum())
        flat = acts.reshape(-1, acts.shape[-1])  # (b * seq, d_sae)
        self.fire_count += (flat > 0).sum(0)
        self.act_sum += flat.sum(0, dtype=torch.float64)
        self._update_top(acts, contexts)
        self._update_histogram(flat)

    def _update_top(self, acts: Tensor, contexts: Tensor) -> None:
        window_max, argmax = acts.max(dim=1)  # (b, d_sae): each window's maximum per latent
        d_sae, b = acts.shape[-1], acts.shape[0]
        values = torch.cat([self.top_values, window_max.T], dim=1)  # (d_sae, n_top + b)
        best, order = values.topk(self.n_top, dim=1)
        ctx = torch.cat([self.top_contexts, contexts.expand(d_sae, b)], dim=1)
        pos = torch.cat([self.top_positions, argmax.T], dim=1)
        per_token = torch.cat([self.top_acts, acts.permute(2, 0, 1).half()], dim=1)  # (d_sae, n_top + b, seq)
        self.top_values = best
        self.top_contexts = ctx.gather(1, order).masked_fill(best <= 0, -1)
        self.top_positions = pos.gather(1, order)
        self.top_acts = per_token.gather(1, order[..., None].expand(-1, -1, per_token.shape[-1]))

    def _update_histogram(self, flat: Tensor) -> None:
        batch_max = flat.max(0).values
        new = (self.hist_max == 0) & (batch_max > 0)
        self.hist_max[new] = batch_max[new] * _HEADROOM
        while True:
            grow = (batch_max >= self.hist_max) & (batch_max > 0)
            if not bool(grow.any()):
                break
            half = self.hist[grow].view(-1, self.n_bins // 2, 2).sum(-1)  # merge bins pairwise
            self.hist[grow] = torch.cat([half, torch.zeros_like(half)], dim=1)
            self.hist_max[grow] *= 2
        token, feature = flat.nonzero(as_tuple=True)
        value = flat[token, feature]
        bins = (value / self.hist_max[feature] * self.n_bins).long().clamp_(0, self.n_bins - 1)
        self.hist.view(-1).index_add_(0, feature * self.n_bins + bins, torch.ones_like(bins))


# --------------------------------------------------------------------------------------------
# Building the index
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reader:
    """What an index is of: the site harvested, how its rows become latents, and the meta that
    identifies the SAE or transcoder (checked by FeatureIndex.check_sae)."""

    site: Site
    encode: Callable[[Tensor], Tensor]
    """(rows, width) harvested at `site` -> (rows, d_sae) latent activations."""
    d_sae: int
    meta: dict


def _reader(model: LoadedModel, sae: SAE | Transcoder, site: str | None) -> _Reader:
    if isinstance(sae, Transcoder):
        return _transcoder_reader(model, sae, site)
    resolved = resolve_sae_site(model, sae, site)
    return _Reader(resolved, sae.encode, sae.cfg.d_sae, {"kind": "sae", "site": resolved.name,
                                                          "sae_digest": sae_digest(sae)})


def _transcoder_reader(model: LoadedModel, transcoder: Transcoder, site: str | None) -> _Reader:
    from interplab.sae.transcoder_train import check_layers, mlp_input, mlp_input_site

    layer, cfg = transcoder.cfg.layer, transcoder.cfg
    if site is not None:
        raise UserInputError("a transcoder reads the MLP input of its own layer; leave site unset")
    check_layers(model, [layer])
    if cfg.d_in != model.d_model or cfg.d_out != model.d_model:
        raise UserInputError(f"the layer-{layer} transcoder reads d_in={cfg.d_in} and writes d_out={cfg.d_out}, but "
                             f"{model.model_id} has hidden_size={model.d_model}; use the model it was trained on")
    read = model.site(mlp_input_site(model, layer))

    def encode(raw: Tensor) -> Tensor:
        return transcoder.encode(mlp_input(model, raw, layer).to(transcoder.W_enc.device))

    return _Reader(read, encode, cfg.d_sae, {"kind": "transcoder", "layer": layer, "site": read.name,
                                             "transcoder_digest": transcoder_digest(transcoder)})


def transcoder_index_path(folder, layer: int) -> Path:
    """Where a transcoder set keeps the feature index of one layer: FOLDER/features-<L>.db, written
    there by `interplab sae features FOLDER --layers L` and picked up by `interplab serve --transcoders`."""
    return Path(folder) / f"features-{layer}.db"


def transcoder_digest(transcoder: Transcoder) -> str:
    """The digest of a transcoder's tensors: its identity for a feature index."""
    return tensors_digest(transcoder.state_dict())


@torch.no_grad()
def build_feature_index(
    model,
    sae: SAE | Transcoder,
    corpus,
    path,
    *,
    site: str | None = None,
    n_contexts: int = 1024,
    context_length: int = 64,
    n_top: int = 20,
    n_bins: int = 32,
    n_logits: int = 10,
    fold_norm: bool = True,
    batch_size: int = 16,
    skip_special_tokens: bool = True,
    sae_path: str | None = None,
    progress: bool = False,
) -> "FeatureIndex":
    """Write the feature index of `sae` (an SAE, or a Transcoder: its latents on its layer's MLP
    input) over `corpus` (a text/JSONL file or folder, a list of texts, or an (n, seq) tensor of
    token windows) to the SQLite file `path`, replacing it atomically. `sae_path` is recorded to
    name the SAE (or transcoder set) in error messages."""
    model = as_loaded(model)
    reader = _reader(model, sae, site)
    windows = _windows(model, corpus, n_contexts, context_length)
    stats = FeatureStats(reader.d_sae, windows.shape[1], n_top=n_top, n_bins=n_bins)
    harvester = Harvester(model, [reader.site.name], drop_special_tokens=False)
    keep_all = _keep(model, windows, skip_special_tokens)
    for start in progress_items(range(0, windows.shape[0], batch_size), progress, desc="features", unit="batch"):
        ids = windows[start:start + batch_size]
        acts = _latents(reader, harvester, ids, start)
        stats.update(acts, keep_all[start:start + batch_size], torch.arange(start, start + ids.shape[0]))
    effects = top_logit_effects(model, sae, reader.site, k=n_logits, fold_norm=fold_norm)
    meta = {"format_version": FORMAT_VERSION, "type": "interplab.feature_index", "model_id": model.model_id,
            **reader.meta, "d_sae": reader.d_sae, "sae_path": sae_path, "n_tokens": stats.n_tokens,
            "n_contexts": int(windows.shape[0]), "context_length": int(windows.shape[1]), "n_top": n_top,
            "n_bins": n_bins, "fold_norm": fold_norm, "skip_special_tokens": skip_special_tokens}
    _write_index(Path(path), meta, stats, windows, effects, model.require_tokenizer())
    return FeatureIndex(path)


def _windows(model: LoadedModel, corpus, n_contexts: int, context_length: int) -> Tensor:
    if isinstance(corpus, Tensor):
        if corpus.dim() != 2 or corpus.numel() == 0:
            raise ValueError(f"token windows must be a non-empty (n, seq) tensor, got shape {tuple(corpus.shape)}")
        return corpus.long()
    return corpus_windows(model, corpus, context_length=context_length, n_contexts=n_contexts)


def _keep(model: LoadedModel, windows: Tensor, skip_special_tokens: bool) -> Tensor:
    if not skip_special_tokens or model.tokenizer is None:
        return torch.ones_like(windows, dtype=torch.bool)
    return ~special_token_mask(model, windows)


def _latents(reader: _Reader, harvester: Harvester, ids: Tensor, first: int) -> Float[Tensor, "b seq d_sae"]:
    chunk = harvester.run(ids, first)
    acts = reader.encode(chunk.acts[reader.site.name])  # (b * seq, d_sae)
    return acts.float().relu().view(*ids.shape, -1)  # -> (b, seq, d_sae)


def _write_index(path: Path, meta: dict, stats: FeatureStats, windows: Tensor, effects, tokenizer) -> None:
    """Write the whole index (metadata and tables) into one SQLite file, swapped in atomically."""
    def write(tmp: str) -> None:
        with contextlib.closing(sqlite3.connect(tmp)) as db, db:
            db.executescript(_SCHEMA)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            vocab = _vocab(tokenizer, windows, stats, effects)
            db.executemany("INSERT INTO vocab VALUES (?, ?)", vocab.items())
            used = sorted({int(c) for c in stats.top_contexts.flatten().tolist() if c >= 0})
            db.executemany("INSERT INTO contexts VALUES (?, ?)", ((c, json.dumps(windows[c].tolist())) for c in used))
            db.executemany("INSERT INTO top_contexts VALUES (?, ?, ?, ?, ?, ?, ?)", _top_rows(stats, windows, vocab))
            db.executemany("INSERT INTO logit_effects VALUES (?, ?, ?, ?, ?)", _effect_rows(effects))
            db.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?)", _feature_rows(stats, effects, vocab, windows))

    atomic_write(path, write)


def _vocab(tokenizer, windows: Tensor, stats: FeatureStats, effects) -> dict[int, str]:
    used = set(windows[stats.top_contexts[stats.top_contexts >= 0].unique()].flatten().tolist())
    used |= set(effects[0].flatten().tolist()) | set(effects[2].flatten().tolist())
    return {i: tokenizer.decode([i]) for i in sorted(used)}


def _top_rows(stats: FeatureStats, windows: Tensor, vocab: dict[int, str]):
    for feature, rank in (stats.top_contexts >= 0).nonzero().tolist():
        context, pos = int(stats.top_contexts[feature, rank]), int(stats.top_positions[feature, rank])
        tokens = windows[context].tolist()
        snippet = "".join(vocab[t] for t in tokens[max(0, pos - 8):pos + 3])
        acts = stats.top_acts[feature, rank].numpy().astype("<f2").tobytes()
        yield feature, rank, float(stats.top_values[feature, rank]), context, pos, acts, snippet


def _effect_rows(effects):
    up_ids, up_values, down_ids, down_values = effects
    for kind, ids, values in (("promoted", up_ids, up_values), ("suppressed", down_ids, down_values)):
        for feature in range(ids.shape[0]):
            for rank in range(ids.shape[1]):
                yield feature, kind, rank, int(ids[feature, rank]), float(values[feature, rank])


def _feature_rows(stats: FeatureStats, effects, vocab: dict[int, str], windows: Tensor):
    n = max(stats.n_tokens, 1)
    for feature in range(stats.top_values.shape[0]):
        fired = int(stats.fire_count[feature])
        mean = float(stats.act_sum[feature]) / fired if fired else 0.0
        promotes = [vocab[int(t)] for t in effects[0][feature, :3]]
        label = auto_label(_top_tokens(stats, feature, windows, vocab), promotes) if fired else ""
        yield (feature, fired, fired / n, float(stats.top_values[feature, 0]), mean,
               float(stats.hist_max[feature]), json.dumps(stats.hist[feature].tolist()), label)


def _top_tokens(stats: FeatureStats, feature: int, windows: Tensor, vocab: dict[int, str]) -> list[str]:
    """Tokens at the maximum of the top contexts, the largest summed activation first."""
    weights: Counter = Counter()
    for rank in range(stats.n_top):
        context = int(stats.top_contexts[feature, rank])
        if context >= 0:
            token = vocab[int(windows[context, stats.top_positions[feature, rank]])].strip()
            weights[token] += float(stats.top_values[feature, rank])
    return [token for token, _ in weights.most_common() if token]


def auto_label(fires_on: Sequence[str], promotes: Sequence[str], *, n: int = 3) -> str:
    """A cheap label: the tokens a latent fires on most strongly and the tokens it promotes most,
    e.g. "fires on 'rain' 'storm' | promotes 'weather' 'wet'"."""
    def show(tokens):
        seen = []
        for token in tokens:
            token = token.strip()
            if token and token not in seen:
                seen.append(token)
        return " ".join(repr(t) for t in seen[:n])

    parts = []
    if fires_on:
        parts.append(f"fires on {show(fires_on)}")
    if promotes:
        parts.append(f"promotes {show(promotes)}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------
# Reading the index
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopContext:
    """One top-activating window of a latent."""

    activation: float
    """The latent's maximum activation in the window."""
    context: int
    """Index of the window in the indexed corpus."""
    max_pos: int
    """Position of that maximum."""
    tokens: list[str]
    """The window's tokens, decoded one by one."""
    acts: list[float]
    """The latent's activation on each token."""


@dataclass(frozen=True)
class FeatureSummary:
    feature: int
    label: str
    density: float
    """Fraction of tokens on which the latent is non-zero."""
    fire_count: int
    max_act: float
    mean_act: float
    """Mean activation over the tokens where it fires."""


@dataclass(frozen=True)
class LogitEffects:
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    fold_norm: bool
    """Whether the final norm's weight γ was folded in: W_U (γ ⊙ r_i) rather than W_U r_i."""


@dataclass(frozen=True)
class SearchHit:
    feature: int
    score: float
    label: str
    density: float
    matched: str
    """Where the query matched: 'label', 'top token' or 'context'."""


class FeatureIndex:
    """Read access to a feature index written by `build_feature_index`."""

    def __init__(self, path, *, sae: SAE | Transcoder | None = None) -> None:
        """Open the index read-only; with `sae` (an SAE or a Transcoder), first check that the index
        was built from it."""
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path} does not exist; build it with `interplab sae features` or build_feature_index")
        # a properly quoted URI: '#', '?', spaces and non-ASCII in the name must not be read as URI syntax
        self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            self.meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        except (sqlite3.DatabaseError, ValueError) as error:
            self.db.close()
            raise ArtifactError(f"{self.path} is not an interplab feature index ({error})") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            self.db.close()
            raise ArtifactError(f"{self.path}: feature index format_version {self.meta.get('format_version')!r} "
                                f"is not {FORMAT_VERSION}; rebuild it")
        self._vocab: dict[int, str] | None = None
        if sae is not None:
            try:
                self.check_sae(sae)
            except BaseException:
                self.db.close()
                raise

    @property
    def kind(self) -> str:
        """'sae' or 'transcoder': what the index's latents are of (indexes before this field: 'sae')."""
        return self.meta.get("kind", "sae")

    def check_sae(self, sae: SAE | Transcoder, *, site: str | None = None) -> None:
        """Refuse an SAE or transcoder other than the one this index was built from (its labels and
        statistics would be another's): the kind, the latent count, the site (an SAE's) or layer (a
        transcoder's) and the weights' digest must match."""
        kind = "transcoder" if isinstance(sae, Transcoder) else "sae"
        if kind != self.kind:
            article = {"sae": "an SAE", "transcoder": "a transcoder"}
            raise UserInputError(f"the feature index {self.path} is of {article[self.kind]}, not of {article[kind]}: "
                                 "use the index built from this one, or build one with `interplab sae features`")
        problems = []
        if int(self.meta["d_sae"]) != sae.cfg.d_sae:
            problems.append(f"d_sae {self.meta['d_sae']} there, {sae.cfg.d_sae} here")
        problems += self._check_transcoder(sae) if kind == "transcoder" else self._check_site_digest(sae, site)
        if problems:
            built_from = self.meta.get("sae_path") or f"another {'SAE' if kind == 'sae' else 'transcoder'}"
            this = "this SAE" if kind == "sae" else f"this layer-{sae.cfg.layer} transcoder"
            raise UserInputError(f"the feature index {self.path} was built from {built_from}, not from {this} "
                                 f"({'; '.join(problems)}): its labels would be wrong. Use the index built "
                                 "from it, or build one with `interplab sae features`")

    def _check_site_digest(self, sae: SAE, site: str | None) -> list[str]:
        built_site, used_site = self.meta.get("site"), site or sae.cfg.site
        problems = []
        if used_site and built_site and used_site != built_site:
            problems.append(f"site {built_site} there, {used_site} here")
        recorded = self.meta.get("sae_digest")
        if recorded is None:
            warnings.warn(f"{self.path} was built before indexes recorded their SAE's digest; interplab cannot "
                          "check that it belongs to this SAE. Rebuild it to be sure.", UserWarning, stacklevel=4)
        elif recorded != sae_digest(sae):
            problems.append(f"weights digest {recorded} there, {sae_digest(sae)} here")
        return problems

    def _check_transcoder(self, transcoder: Transcoder) -> list[str]:
        problems = []
        if int(self.meta["layer"]) != transcoder.cfg.layer:
            problems.append(f"layer {self.meta['layer']} there, {transcoder.cfg.layer} here")
        digest = transcoder_digest(transcoder)
        if self.meta["transcoder_digest"] != digest:
            problems.append(f"weights digest {self.meta['transcoder_digest']} there, {digest} here")
        return problems

    def __enter__(self) -> "FeatureIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    @property
    def d_sae(self) -> int:
        return int(self.meta["d_sae"])

    def vocab(self) -> dict[int, str]:
        if self._vocab is None:
            self._vocab = dict(self.db.execute("SELECT id, text FROM vocab"))
        return self._vocab

    def summary(self, feature: int) -> FeatureSummary:
        _check_feature(feature, self.d_sae)
        row = self.db.execute("SELECT label, density, fire_count, max_act, mean_act FROM features WHERE id = ?",
                              (feature,)).fetchone()
        return FeatureSummary(feature, row[0], row[1], row[2], row[3], row[4])

    def top_contexts(self, feature: int, n: int | None = None) -> list[TopContext]:
        _check_feature(feature, self.d_sae)
        rows = self.db.execute(
            "SELECT t.activation, t.context, t.max_pos, t.acts, c.tokens FROM top_contexts t "
            "JOIN contexts c ON c.id = t.context WHERE t.feature = ? ORDER BY t.rank LIMIT ?",
            (feature, -1 if n is None else n)).fetchall()
        vocab = self.vocab()
        return [TopContext(a, c, p, [vocab[t] for t in json.loads(tokens)], _halfs(blob)) for a, c, p, blob, tokens in rows]

    def histogram(self, feature: int) -> tuple[list[float], list[int]]:
        """(bin edges, counts) of the latent's non-zero activations."""
        _check_feature(feature, self.d_sae)
        hi, counts = self.db.execute("SELECT hist_max, hist FROM features WHERE id = ?", (feature,)).fetchone()
        counts = json.loads(counts)
        return [hi * i / len(counts) for i in range(len(counts) + 1)], counts

    def logit_effects(self, feature: int, n: int | None = None) -> LogitEffects:
        _check_feature(feature, self.d_sae)
        vocab = self.vocab()
        result = {}
        for kind in ("promoted", "suppressed"):
            rows = self.db.execute("SELECT token, value FROM logit_effects WHERE feature = ? AND kind = ? "
                                   "ORDER BY rank LIMIT ?", (feature, kind, -1 if n is None else n)).fetchall()
            result[kind] = [(vocab[t], v) for t, v in rows]
        return LogitEffects(result["promoted"], result["suppressed"], bool(self.meta["fold_norm"]))

    def search(self, query: str, *, limit: int = 20) -> list[SearchHit]:
        """Latents whose label or top contexts mention `query` (case-insensitive), best first:
        a label that contains it scores 3 (5 when it is one of the label's tokens exactly), each
        top-context snippet that contains it adds 1 / n_top; ties go to the denser latent."""
        if not query or not query.strip():
            raise ValueError("the search query is empty")
        needle = query.strip()
        pattern = "%" + _escape_like(needle) + "%"
        scores: Counter = Counter()
        matched: dict[int, str] = {}
        for feature, label in self.db.execute("SELECT id, label FROM features WHERE label LIKE ? ESCAPE '\\'", (pattern,)):
            exact = any(token.strip().lower() == needle.lower() for token in _label_tokens(label))
            scores[feature] += 5.0 if exact else 3.0
            matched[feature] = "label"
        for feature, count in self.db.execute(
                "SELECT feature, COUNT(*) FROM top_contexts WHERE snippet LIKE ? ESCAPE '\\' GROUP BY feature", (pattern,)):
            scores[feature] += count / max(int(self.meta["n_top"]), 1)
            matched.setdefault(feature, "context")
        rows = {f: self.db.execute("SELECT label, density FROM features WHERE id = ?", (f,)).fetchone() for f in scores}
        ranked = sorted(scores, key=lambda f: (-scores[f], -rows[f][1], f))[:limit]
        return [SearchHit(f, scores[f], rows[f][0], rows[f][1], matched[f]) for f in ranked]


def _escape_like(text: str) -> str:
    """`text` matched literally by LIKE ... ESCAPE '\\' ('%' and '_' are wildcards otherwise)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _label_tokens(label: str) -> list[str]:
    """The quoted tokens of a label made by `auto_label`."""
    return [a or b for a, b in re.findall(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", label)]


def _halfs(blob: bytes) -> list[float]:
    import numpy as np

    return np.frombuffer(blob, dtype="<f2").astype(float).tolist()


def _check_feature(feature: int, d_sae: int) -> None:
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < d_sae:
        raise ValueError(f"feature {feature!r} is out of range: the SAE has {d_sae} latents (valid 0..{d_sae - 1})")


# --------------------------------------------------------------------------------------------
# inspect and contrast
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenFeatures:
    """The latents active on one token, strongest first."""

    position: int
    token: str
    features: list[tuple[int, float]]


@torch.no_grad()
def inspect(model, sae: SAE, text: str, *, k: int = 5, site: str | None = None,
            skip_special_tokens: bool = True) -> list[TokenFeatures]:
    """Which latents fire on each token of `text` (the k strongest per token). Special tokens
    (BOS, ...) are listed without latents unless skip_special_tokens=False, since SAEs are
    trained without them."""
    model = as_loaded(model)
    resolved = resolve_sae_site(model, sae, site)
    acts, ids = _text_latents(model, sae, resolved, text)
    tokenizer = model.require_tokenizer()
    special = special_token_ids(tokenizer) if skip_special_tokens else set()
    top = acts.topk(min(k, acts.shape[-1]), dim=-1)
    result = []
    for pos, token in enumerate(ids.tolist()):
        pairs = [] if token in special else [
            (int(f), float(v)) for f, v in zip(top.indices[pos], top.values[pos]) if v > 0]
        result.append(TokenFeatures(pos, tokenizer.decode([token]), pairs))
    return result


def _text_latents(model: LoadedModel, sae: SAE, site: Site, text: str) -> tuple[Tensor, Tensor]:
    """(seq, d_sae) latent activations and the (seq,) token ids of one text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text to inspect is empty")
    from interplab.tokens import to_batch

    batch = to_batch(model, [text])
    chunk = Harvester(model, [site.name], drop_special_tokens=False).run(batch.input_ids, 0)
    return sae.encode(chunk.acts[site.name]).float().relu(), batch.input_ids[0]


@dataclass(frozen=True)
class FeatureDifference:
    feature: int
    mean_a: float
    """Mean activation over set A (per text, then over texts)."""
    mean_b: float
    difference: float
    """mean_a − mean_b."""
    freq_a: float
    """Fraction of set A's tokens on which the latent fires."""
    freq_b: float


@torch.no_grad()
def contrast(model, sae: SAE, texts_a: Sequence[str], texts_b: Sequence[str], *, k: int = 10,
             site: str | None = None, skip_special_tokens: bool = True) -> list[FeatureDifference]:
    """The latents whose mean activation differs most between two sets of texts: the k with the
    largest mean_a − mean_b, then the k with the smallest (most active in B)."""
    model = as_loaded(model)
    resolved = resolve_sae_site(model, sae, site)
    for name, texts in (("texts_a", texts_a), ("texts_b", texts_b)):
        if isinstance(texts, str) or not texts:
            raise ValueError(f"{name} must be a non-empty list of texts")
    mean_a, freq_a = _set_means(model, sae, resolved, texts_a, skip_special_tokens)
    mean_b, freq_b = _set_means(model, sae, resolved, texts_b, skip_special_tokens)
    diff = mean_a - mean_b
    k = min(k, diff.shape[0])
    order = torch.cat([diff.topk(k).indices, (-diff).topk(k).indices])
    return [FeatureDifference(int(f), float(mean_a[f]), float(mean_b[f]), float(diff[f]), float(freq_a[f]),
                              float(freq_b[f])) for f in order]


def _set_means(model, sae, site, texts, skip_special_tokens) -> tuple[Tensor, Tensor]:
    means, fired, n_tokens = [], 0, 0
    for text in texts:
        acts, ids = _text_latents(model, sae, site, text)
        keep = ~special_token_mask(model, ids) if skip_special_tokens else torch.ones_like(ids, dtype=torch.bool)
        if not keep.any():
            continue
        means.append(acts[keep].mean(0))
        fired = fired + (acts[keep] > 0).sum(0)
        n_tokens += int(keep.sum())
    if not means:
        raise ValueError("every text is empty once special tokens are removed")
    return torch.stack(means).mean(0), fired / n_tokens

