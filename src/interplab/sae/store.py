"""Activation store: text in, shuffled activation batches out, in constant memory.

    documents  ->  token windows of `context_length` (each starts with BOS)
               ->  activations at one or more sites (the forward pass stops after the deepest)
               ->  special tokens (BOS, ...) dropped
               ->  a mixing buffer of `buffer_tokens` rows that serves shuffled batches

The mixing buffer is SAELens' scheme: fill it, shuffle it, serve half of it, refill that half
from new contexts, repeat; at the end of the stream serve what is left. A batch therefore
mixes tokens of many contexts, and memory is fixed by `buffer_tokens`, not by the corpus.

Windows: documents are tokenized without special tokens and joined into one token stream
with BOS in front of each document; each window is `context_length` tokens of that stream
and starts with BOS (a BOS is put in front when the window starts inside a document),
as in SAELens' `concat_and_batch_sequences`.

On disk (`harvest_to_disk`): a folder with `manifest.json` and `shard_XXXXX.safetensors`
files, one per `contexts_per_shard` windows, each holding every site's activations
(n_tokens, width) plus `tokens`, `contexts` and `positions` (n_tokens,). Shards are written
atomically and the manifest is rewritten after each one, so a harvest that was killed
resumes at the first missing shard and produces the same shards as one that was not.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import ArtifactError, UserInputError
from interplab.files import (check_digest, config_field, file_digest, read_json_object, save_tensors,
                             write_json)
from interplab.hooks import HookSession, StopForward
from interplab.progress import progress_bar
from interplab.models.handle import LoadedModel, as_loaded
from interplab.sites import Site
from interplab.tokens import check_context, special_token_ids

FORMAT_VERSION = 1
"""Version of the on-disk activation folder format."""

MANIFEST_FILE = "manifest.json"
DEFAULT_SEPARATOR = "<|endoftext|>"
_TEXT_SUFFIXES = (".txt", ".md", ".text")
_JSON_SUFFIXES = (".jsonl", ".json")
_MAX_DOCUMENT_CHARS = 200_000
"""A document longer than this is cut into pieces (at line ends) so memory stays bounded."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreConfig:
    """How activations are harvested from text and served as batches."""

    sites: tuple[str, ...]
    """Sites to capture, in the TransformerLens vocabulary (e.g. ('blocks.0.hook_resid_post',))."""

    context_length: int = 128
    """Tokens per window (each window starts with BOS); at most the model's maximum positions."""

    batch_size: int = 4096
    """Tokens per served batch."""

    buffer_tokens: int = 65_536
    """Rows in the mixing buffer (at least 2 * batch_size); memory is buffer_tokens * Σ widths * 4 bytes."""

    model_batch_size: int = 16
    """Windows per forward pass while harvesting."""

    drop_special_tokens: bool = True
    """Drop positions holding special tokens (BOS, EOS, padding) from the served activations."""

    separator: str = DEFAULT_SEPARATOR
    """Document separator inside plain-text files (TinyStories uses '<|endoftext|>'); a file
    without it is one long document."""

    text_field: str = "text"
    """Field holding the text in JSONL files and Hugging Face datasets."""

    seed: int = 0
    """Seed of the buffer's shuffling."""

    dtype: str = "float32"
    """dtype of the stored and served activations ('float32', 'bfloat16', 'float16')."""

    def __post_init__(self) -> None:
        sites = (self.sites,) if isinstance(self.sites, (str, Site)) else tuple(self.sites)
        object.__setattr__(self, "sites", tuple(s.name if isinstance(s, Site) else s for s in sites))
        problems = _store_config_problems(self)
        if problems:
            raise ValueError("invalid StoreConfig: " + "; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


_HARVEST_FIELDS = ("context_length", "model_batch_size", "drop_special_tokens", "separator", "text_field", "dtype")
"""StoreConfig fields that change what a harvest writes (recorded in the manifest)."""


def _store_config_problems(cfg: StoreConfig) -> list[str]:
    problems = []
    if not cfg.sites or not all(isinstance(s, str) and s for s in cfg.sites):
        problems.append(f"sites must name at least one site, e.g. ('blocks.0.hook_resid_post',); got {cfg.sites!r}")
    for name, minimum in (("context_length", 2), ("batch_size", 1), ("buffer_tokens", 2), ("model_batch_size", 1)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"{name} must be an int >= {minimum}, got {value!r}")
    if not problems and cfg.buffer_tokens < 2 * cfg.batch_size:
        problems.append(f"buffer_tokens ({cfg.buffer_tokens}) must be at least 2 * batch_size "
                        f"({2 * cfg.batch_size}) so that each refill serves a whole batch")
    if cfg.dtype not in ("float32", "bfloat16", "float16", "float64"):
        problems.append(f"dtype must be 'float32', 'bfloat16', 'float16' or 'float64', got {cfg.dtype!r}")
    return problems


# --------------------------------------------------------------------------------------------
# Documents and token windows
# --------------------------------------------------------------------------------------------


def iter_documents(corpus, *, separator: str = DEFAULT_SEPARATOR, text_field: str = "text") -> Iterator[str]:
    """Documents from a text/JSONL file, a folder of them, a list of texts, or (online) the
    name of a Hugging Face dataset (its 'train' split, streamed). Empty documents are skipped."""
    if isinstance(corpus, (list, tuple)):
        yield from (doc for doc in corpus if isinstance(doc, str) and doc.strip())
        return
    path = Path(corpus)
    if path.is_dir():
        for file in _corpus_files(path):
            yield from _file_documents(file, separator, text_field)
    elif path.is_file():
        yield from _file_documents(path, separator, text_field)
    else:
        yield from _hf_documents(str(corpus), text_field)


def _corpus_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES + _JSON_SUFFIXES)
    if not files:
        raise ValueError(f"corpus folder {folder} holds no {'/'.join(_TEXT_SUFFIXES + _JSON_SUFFIXES)} files")
    return files


def _file_documents(path: Path, separator: str, text_field: str) -> Iterator[str]:
    if path.suffix in _JSON_SUFFIXES:
        yield from _jsonl_documents(path, text_field)
    else:
        yield from _text_documents(path, separator)


def _text_documents(path: Path, separator: str) -> Iterator[str]:
    """Stream a text file line by line, splitting documents at `separator`."""
    parts: list[str] = []
    size = 0
    with _utf8_lines(path) as lines:
        for line in lines:
            pieces = line.split(separator) if separator else [line]
            for i, piece in enumerate(pieces):
                if i > 0:  # a separator ended the document
                    yield from _nonempty("".join(parts))
                    parts, size = [], 0
                parts.append(piece)
                size += len(piece)
            if size > _MAX_DOCUMENT_CHARS:
                yield from _nonempty("".join(parts))
                parts, size = [], 0
    yield from _nonempty("".join(parts))


@contextlib.contextmanager
def _utf8_lines(path: Path) -> Iterator[Iterator[str]]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 is an error naming the file (never
    replaced silently: a wrong encoding would feed the model garbage tokens)."""
    try:
        with open(path, encoding="utf-8") as f:
            yield f
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start} of a block); "
                            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _nonempty(text: str) -> Iterator[str]:
    text = text.strip()
    if text:
        yield text


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with _utf8_lines(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ArtifactError(f"{path}:{number}: not valid JSON ({err.msg}); a JSONL corpus holds one "
                                    "JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{number}: expected a JSON object with a string field "
                                 f"{text_field!r}; pass text_field= to name another field")
            yield from _nonempty(record[text_field])


def _hf_documents(name: str, text_field: str) -> Iterator[str]:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1" or "/" not in name:
        raise ValueError(f"corpus {name!r} is not a file or folder; give a text/JSONL file, a folder of them, "
                         "or (online) a Hugging Face dataset name such as 'roneneldan/TinyStories'")
    try:
        import datasets
    except ImportError as error:
        raise ImportError("reading a Hugging Face dataset needs `pip install datasets`") from error
    for record in datasets.load_dataset(name, split="train", streaming=True):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"dataset {name!r} has no string field {text_field!r}; pass text_field=")
        yield from _nonempty(text)


def start_token_id(tokenizer) -> int | None:
    """The token each window and document starts with: BOS, else EOS, else none."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def iter_windows(tokenizer, documents: Iterable[str], context_length: int) -> Iterator[list[int]]:
    """Fixed windows of `context_length` token ids, each starting with BOS (see the module docstring)."""
    bos = start_token_id(tokenizer)
    pending: list[int] = []
    for group in _groups(documents, 64):
        for ids in tokenizer(group, add_special_tokens=False)["input_ids"]:
            pending.extend(([bos] if bos is not None else []) + list(ids))
        while True:
            window, pending = _cut_window(pending, context_length, bos)
            if window is None:
                break
            yield window


def _cut_window(pending: list[int], context_length: int, bos: int | None) -> tuple[list[int] | None, list[int]]:
    """Take one window from the front of the token stream, or None when too few tokens remain."""
    starts_with_bos = bos is None or (pending and pending[0] == bos)
    need = context_length if starts_with_bos else context_length - 1
    if len(pending) < need:
        return None, pending
    head = pending[:need] if starts_with_bos else [bos] + pending[:need]
    return head, pending[need:]


def _groups(items: Iterable[str], size: int) -> Iterator[list[str]]:
    group: list[str] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def corpus_windows(model, corpus, *, context_length: int = 128, n_contexts: int | None = None,
                   skip_contexts: int = 0, separator: str = DEFAULT_SEPARATOR,
                   text_field: str = "text") -> Int[Tensor, "n context_length"]:
    """Token windows of a corpus as one (n, context_length) tensor: windows skip_contexts ..
    skip_contexts + n_contexts (all the rest when n_contexts is None)."""
    model = as_loaded(model)
    check_context_length(model, context_length)
    tokenizer = model.require_tokenizer()
    windows = iter_windows(tokenizer, iter_documents(corpus, separator=separator, text_field=text_field),
                           context_length)
    stop = None if n_contexts is None else skip_contexts + n_contexts
    rows = [w for i, w in enumerate(_islice(windows, stop)) if i >= skip_contexts]
    if not rows:
        raise ValueError(_empty_corpus_message(corpus, context_length, skip_contexts))
    return torch.tensor(rows, dtype=torch.long)


def _islice(iterator: Iterator, stop: int | None) -> Iterator:
    for i, item in enumerate(iterator):
        if stop is not None and i >= stop:
            return
        yield item


def _empty_corpus_message(corpus, context_length: int, skip: int = 0) -> str:
    where = f" after skipping {skip} windows" if skip else ""
    name = f"{len(corpus)} texts" if isinstance(corpus, (list, tuple)) else repr(str(corpus))
    return (f"the corpus {name} gave no window of {context_length} tokens{where}: it is empty or too short; "
            "give more text or a smaller context_length")


def check_context_length(model: LoadedModel, context_length: int) -> None:
    """Refuse windows longer than the model's position limit, before any work starts."""
    check_context(model, context_length, what="windows",
                  hint="use a context_length within the model's context window")


# --------------------------------------------------------------------------------------------
# Harvesting: windows -> activations at sites
# --------------------------------------------------------------------------------------------


@dataclass
class ActivationChunk:
    """Activations of a set of tokens at several sites, with where each token came from."""

    acts: dict[str, Float[Tensor, "n _width"]]  # _width: sites differ in width
    """Site name -> (n, width) activations (attn.hook_z is flattened to n_heads * d_head)."""
    tokens: Int[Tensor, " n"]
    """Token id of each row."""
    contexts: Int[Tensor, " n"]
    """Index of the window each row came from (counted from the start of the corpus)."""
    positions: Int[Tensor, " n"]
    """Position of each row inside its window."""

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def head(self, n: int) -> "ActivationChunk":
        """The first `n` rows (all of them when n >= len)."""
        return ActivationChunk({k: v[:n] for k, v in self.acts.items()}, self.tokens[:n], self.contexts[:n],
                               self.positions[:n])


def site_width(model: LoadedModel, site: Site | str) -> int:
    """Width of one token's activation at `site`, flattened (attn.hook_z: n_heads * d_head)."""
    site = model.site(site)
    if site.read_only:
        raise ValueError(f"site {site.name} holds attention patterns, not one vector per token; "
                         "SAEs read residual, attention-output, MLP or hook_z sites")
    return math.prod(model.site_shape(site))


class Harvester:
    """Runs windows through the model and reads the sites; the forward stops after the deepest."""

    def __init__(self, model, sites: Sequence[str], *, dtype: torch.dtype = torch.float32,
                 drop_special_tokens: bool = True) -> None:
        self.model = as_loaded(model)
        self.sites = [self.model.site(s) for s in sites]
        self.widths = {s.name: site_width(self.model, s) for s in self.sites}
        self.dtype = dtype
        tokenizer = self.model.tokenizer
        special = special_token_ids(tokenizer) if (drop_special_tokens and tokenizer is not None) else set()
        self.special = torch.tensor(sorted(special), dtype=torch.long)
        self._read: dict[str, Tensor] = {}
        deepest = max(self.sites, key=lambda s: s.depth(self.model.n_layers))
        self.session = HookSession(self.model, {s: [self._reader(s.name)] for s in self.sites}, stop_after=deepest)

    def _reader(self, name: str):
        def read(act: Tensor, ctx) -> None:
            self._read[name] = act.detach()

        return read

    @torch.no_grad()
    def run(self, windows: Int[Tensor, "b t"], first_context: int) -> ActivationChunk:
        """Activations of every non-special token of `windows` (whose first has index first_context)."""
        self._read.clear()
        self.session.attach()
        try:
            self.model.hf(input_ids=windows.to(self.model.device), use_cache=False)
        except StopForward:
            pass
        finally:
            self.session.remove()
        keep = ~torch.isin(windows, self.special)  # (b, t)
        contexts = torch.arange(first_context, first_context + windows.shape[0])[:, None].expand_as(windows)
        positions = torch.arange(windows.shape[1]).expand_as(windows)
        acts = {name: self._read[name].reshape(*windows.shape, -1)[keep.to(self._read[name].device)]  # (b, t, ...) -> (n, width)
                .to(device="cpu", dtype=self.dtype) for name in self.widths}
        return ActivationChunk(acts, windows[keep], contexts[keep], positions[keep])


def harvest_chunks(model, corpus, cfg: StoreConfig, *, start_context: int = 0,
                   max_tokens: int | None = None, share: tuple[int, int] | None = None) -> Iterator[ActivationChunk]:
    """Activations of the corpus's windows from `start_context` on, one chunk per forward pass
    of cfg.model_batch_size windows, until the corpus ends or exactly max_tokens rows were produced
    (the last chunk is cut).

    share=(rank, world_size): only the forward passes number rank, rank + world_size, ... (a
    disjoint, deterministic share per rank); start_context then counts this share's windows.
    Chunks keep the window indices of the whole corpus."""
    model = as_loaded(model)
    rank, world = _check_share(share)
    harvester, windows = _prepare_harvest(model, corpus, cfg)
    produced, index, mine = 0, 0, 0
    for number, batch in enumerate(_window_batches(windows, cfg.model_batch_size)):
        if number % world == rank:
            if mine >= start_context:
                chunk = harvester.run(batch, index)
                if max_tokens is not None:
                    chunk = chunk.head(max_tokens - produced)
                produced += len(chunk)
                yield chunk
                if max_tokens is not None and produced >= max_tokens:
                    return
            mine += batch.shape[0]
        index += batch.shape[0]


def _check_share(share: tuple[int, int] | None) -> tuple[int, int]:
    if share is None:
        return 0, 1
    rank, world = share
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise UserInputError(f"share must be (rank, world_size) with 0 <= rank < world_size, got {share!r}")
    return rank, world


def _prepare_harvest(model: LoadedModel, corpus, cfg: StoreConfig) -> tuple[Harvester, Iterator[list[int]]]:
    """Check everything and read the first window before any forward pass."""
    check_context_length(model, cfg.context_length)
    harvester = Harvester(model, cfg.sites, dtype=cfg.torch_dtype, drop_special_tokens=cfg.drop_special_tokens)
    documents = iter_documents(corpus, separator=cfg.separator, text_field=cfg.text_field)
    windows = iter_windows(model.require_tokenizer(), documents, cfg.context_length)
    first = next(windows, None)
    if first is None:
        raise ValueError(_empty_corpus_message(corpus, cfg.context_length))
    return harvester, _chain_one(first, windows)


def _chain_one(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _window_batches(windows: Iterator[list[int]], size: int) -> Iterator[Tensor]:
    batch: list[list[int]] = []
    for window in windows:
        batch.append(window)
        if len(batch) == size:
            yield torch.tensor(batch, dtype=torch.long)
            batch = []
    if batch:
        yield torch.tensor(batch, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# The mixing buffer
# --------------------------------------------------------------------------------------------


class ShuffleBuffer:
    """A fixed-size buffer that turns a stream of chunks into shuffled batches (SAELens' scheme:
    fill, shuffle, serve half, refill). Its tensors are allocated once."""

    def __init__(self, widths: dict[str, int], *, capacity: int, batch_size: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        if capacity < 2 * batch_size:
            raise ValueError(f"buffer capacity {capacity} must be at least 2 * batch_size ({2 * batch_size})")
        self.capacity, self.batch_size = capacity, batch_size
        self.acts = {name: torch.empty(capacity, width, dtype=dtype) for name, width in widths.items()}
        self.meta = {name: torch.empty(capacity, dtype=torch.long) for name in ("tokens", "contexts", "positions")}
        self.filled = 0
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffer's tensors (constant)."""
        return sum(t.numel() * t.element_size() for t in (*self.acts.values(), *self.meta.values()))

    def mix(self, chunks: Iterable[ActivationChunk]) -> Iterator[ActivationChunk]:
        """Shuffled batches of batch_size rows; the last one may be smaller."""
        for chunk in chunks:
            start = 0
            while start < len(chunk):
                take = min(self.capacity - self.filled, len(chunk) - start)
                self._write(chunk, start, take)
                start += take
                if self.filled == self.capacity:
                    yield from self._serve(self.capacity // 2)
        yield from self._serve(self.filled, final=True)

    def _write(self, chunk: ActivationChunk, start: int, n: int) -> None:
        rows = slice(self.filled, self.filled + n)
        for name, tensor in self.acts.items():
            tensor[rows] = chunk.acts[name][start:start + n]
        for name, tensor in self.meta.items():
            tensor[rows] = getattr(chunk, name)[start:start + n]
        self.filled += n

    def _serve(self, n: int, final: bool = False) -> Iterator[ActivationChunk]:
        """Shuffle the filled rows, hand out batches from n of them, keep the rest at the front."""
        order = torch.randperm(self.filled, generator=self.generator)
        n_served = n if final else (n // self.batch_size) * self.batch_size
        served = order[:n_served]
        batches = [self._gather(served[i:i + self.batch_size]) for i in range(0, n_served, self.batch_size)]
        kept = order[n_served:]
        for tensor in (*self.acts.values(), *self.meta.values()):
            tensor[: kept.shape[0]] = tensor[kept]
        self.filled = kept.shape[0]
        yield from batches

    def _gather(self, rows: Tensor) -> ActivationChunk:
        return ActivationChunk({name: t[rows] for name, t in self.acts.items()},
                               self.meta["tokens"][rows], self.meta["contexts"][rows], self.meta["positions"][rows])


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class ActivationStore:
    """Shuffled activation batches from a live harvest or an on-disk harvest.

    >>> store = ActivationStore.from_corpus(model, "stories.txt", StoreConfig(sites=("blocks.0.hook_resid_post",)))
    >>> sae = train_sae(sae_cfg, store.batches(), train_cfg)      # (batch_size, d_model) tensors
    """

    def __init__(self, chunks, widths: dict[str, int], *, batch_size: int, buffer_tokens: int, seed: int,
                 dtype: torch.dtype, repeat: bool = False) -> None:
        self._chunks = chunks
        """A function returning a fresh iterator of ActivationChunk (called once per pass)."""
        self.widths = dict(widths)
        self.repeat = repeat
        self.buffer = ShuffleBuffer(self.widths, capacity=buffer_tokens, batch_size=batch_size, seed=seed, dtype=dtype)
        self.tokens_read = 0
        """Rows taken from the source so far (across passes)."""

    @classmethod
    def from_corpus(cls, model, corpus, cfg: StoreConfig, *, max_tokens: int | None = None,
                    repeat: bool = False, share: tuple[int, int] | None = None) -> "ActivationStore":
        """A store that harvests `corpus` with `model` as it is read. `max_tokens` bounds the rows
        read per pass; `repeat` starts over when the corpus (or max_tokens) is exhausted;
        `share=(rank, world_size)` reads only that rank's windows (see `harvest_chunks`)."""
        model = as_loaded(model)
        _check_share(share)
        _prepare_harvest(model, corpus, cfg)  # fail now, not at the first batch
        widths = {model.site(s).name: site_width(model, s) for s in cfg.sites}
        return cls(lambda: harvest_chunks(model, corpus, cfg, max_tokens=max_tokens, share=share), widths,
                   batch_size=cfg.batch_size, buffer_tokens=cfg.buffer_tokens, seed=cfg.seed,
                   dtype=cfg.torch_dtype, repeat=repeat)

    @classmethod
    def from_disk(cls, path, *, sites: Sequence[str] | None = None, batch_size: int = 4096,
                  buffer_tokens: int = 65_536, seed: int = 0, repeat: bool = False,
                  share: tuple[int, int] | None = None) -> "ActivationStore":
        """A store that reads a folder written by `harvest_to_disk` (complete or not, by one rank
        or several). `share=(rank, world_size)` reads shards rank, rank + world_size, ... only."""
        _check_share(share)
        manifest = read_manifest(path)
        widths = manifest["sites"]
        chosen = list(widths) if sites is None else list(sites)
        missing = [s for s in chosen if s not in widths]
        if missing:
            raise ValueError(f"{path} holds sites {sorted(widths)}, not {missing}")
        if not manifest["shards"]:
            raise ValueError(f"{path} holds no complete shard yet; run harvest_to_disk first")
        dtype = getattr(torch, manifest["harvest"]["dtype"])
        return cls(lambda: disk_chunks(path, chosen, share=share), {s: widths[s] for s in chosen}, batch_size=batch_size,
                   buffer_tokens=buffer_tokens, seed=seed, dtype=dtype, repeat=repeat)

    def __iter__(self) -> Iterator[ActivationChunk]:
        return self.buffer.mix(self._source())

    def _source(self) -> Iterator[ActivationChunk]:
        while True:
            for chunk in self._chunks():
                self.tokens_read += len(chunk)
                yield chunk
            if not self.repeat:
                return

    def batches(self, site: str | None = None) -> Iterator[Float[Tensor, "batch width"]]:
        """The activations of one site only (the only site when there is one), as plain tensors."""
        if site is None:
            if len(self.widths) != 1:
                raise ValueError(f"this store holds several sites {sorted(self.widths)}; name one")
            site = next(iter(self.widths))
        if site not in self.widths:
            raise ValueError(f"site {site!r} is not in this store; it holds {sorted(self.widths)}")
        return (chunk.acts[site] for chunk in self)


# --------------------------------------------------------------------------------------------
# On disk
# --------------------------------------------------------------------------------------------


def harvest_to_disk(model, corpus, out_dir, cfg: StoreConfig, *, n_tokens: int | None = None,
                    contexts_per_shard: int = 256, progress: bool = False,
                    share: tuple[int, int] | None = None, group=None) -> Path:
    """Harvest activations into `out_dir` (see the module docstring), resuming a harvest that
    was stopped. Stops when the corpus ends or exactly `n_tokens` rows were written (the last
    shard is cut). Shards hold a multiple of cfg.model_batch_size windows, so a resumed
    harvest runs exactly the same forward passes as an uninterrupted one.

    Under torchrun (`group`, default the job this process joined) each rank harvests its share
    of the windows into out_dir/rank_XXX/ and one manifest in out_dir lists every shard
    (`interplab.sae.parallel.harvest_ranks`). `share=(rank, world_size)` harvests one share only."""
    from interplab.sae import parallel

    group = parallel.current() if group is None else group
    if group.distributed:
        return parallel.harvest_ranks(model, corpus, out_dir, cfg, n_tokens=n_tokens,
                                      contexts_per_shard=contexts_per_shard, progress=progress, group=group)
    model = as_loaded(model)
    if contexts_per_shard < 1:
        raise ValueError(f"contexts_per_shard must be >= 1, got {contexts_per_shard}")
    out = Path(out_dir)
    contexts_per_shard = math.ceil(contexts_per_shard / cfg.model_batch_size) * cfg.model_batch_size
    manifest = _start_manifest(model, corpus, out, cfg, contexts_per_shard, n_tokens, _check_share(share))
    if manifest["complete"]:
        return out
    start = len(manifest["shards"]) * contexts_per_shard
    written = sum(s["n_tokens"] for s in manifest["shards"])
    chunks = harvest_chunks(model, corpus, cfg, start_context=start, share=share)
    bar = progress_bar(progress, total=n_tokens, initial=written, unit="tok", desc="harvest")
    for shard in _group_shards(chunks, contexts_per_shard, cfg.model_batch_size):
        if n_tokens is not None:
            shard = shard.head(n_tokens - written)
        entry = _write_shard(out, len(manifest["shards"]), shard)
        manifest["shards"].append(entry)
        written += entry["n_tokens"]
        bar.update(entry["n_tokens"])
        if n_tokens is not None and written >= n_tokens:
            break
        write_json(out / MANIFEST_FILE, manifest)  # after the shard: the manifest only lists whole shards
    bar.close()
    manifest["complete"] = True
    write_json(out / MANIFEST_FILE, manifest)
    return out


def _group_shards(chunks: Iterator[ActivationChunk], contexts_per_shard: int, batch: int) -> Iterator[ActivationChunk]:
    """Concatenate the chunks of contexts_per_shard // batch forward passes into one shard."""
    per_shard = contexts_per_shard // batch
    group: list[ActivationChunk] = []
    for chunk in chunks:
        group.append(chunk)
        if len(group) == per_shard:
            yield _concat(group)
            group = []
    if group:
        yield _concat(group)


def _concat(chunks: list[ActivationChunk]) -> ActivationChunk:
    return ActivationChunk({name: torch.cat([c.acts[name] for c in chunks]) for name in chunks[0].acts},
                           torch.cat([c.tokens for c in chunks]), torch.cat([c.contexts for c in chunks]),
                           torch.cat([c.positions for c in chunks]))


def _write_shard(out: Path, index: int, chunk: ActivationChunk) -> dict:
    """Write one shard atomically; its manifest entry records the file's size and digest, which
    the reader checks (a shard that is not the one the manifest lists is refused)."""
    name = f"shard_{index:05d}.safetensors"
    tensors = {**chunk.acts, "tokens": chunk.tokens, "contexts": chunk.contexts, "positions": chunk.positions}
    path = save_tensors(out / name, tensors, metadata={"format": "interplab.activations"})
    return {"file": name, "n_tokens": len(chunk), "bytes": path.stat().st_size, "digest": file_digest(path)}


def _start_manifest(model: LoadedModel, corpus, out: Path, cfg: StoreConfig, contexts_per_shard: int,
                    n_tokens: int | None, share: tuple[int, int] = (0, 1)) -> dict:
    """The manifest of a new harvest, or that of the harvest to resume (after checking it matches)."""
    fresh = {
        "format_version": FORMAT_VERSION, "type": "interplab.activations", "model_id": model.model_id,
        "corpus": _corpus_name(corpus), "sites": {model.site(s).name: site_width(model, s) for s in cfg.sites},
        "harvest": {name: getattr(cfg, name) for name in _HARVEST_FIELDS},
        "contexts_per_shard": contexts_per_shard, "n_tokens": n_tokens, "shards": [], "complete": False,
    }
    if share != (0, 1):  # one rank's share of a torchrun harvest (see interplab.sae.parallel)
        fresh["share"] = list(share)
    _prepare_harvest(model, corpus, cfg)  # checks and reads the first window before anything is written
    if (out / MANIFEST_FILE).is_file():
        saved = read_manifest(out)
        _check_same_harvest(out, saved, fresh)
        return saved
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not an activation harvest (no {MANIFEST_FILE}); choose an empty folder")
    write_json(out / MANIFEST_FILE, fresh)
    return fresh


def _check_same_harvest(out: Path, saved: dict, fresh: dict) -> None:
    if saved.get("world_size", 1) != 1:
        raise UserInputError(f"{out} holds a harvest by {saved['world_size']} torchrun processes; resume it under "
                             f"torchrun with {saved['world_size']} processes, or harvest into another folder")
    keys = ("model_id", "corpus", "sites", "harvest", "contexts_per_shard", "n_tokens", "share")
    changed = [k for k in keys if saved.get(k) != fresh.get(k)]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} there, {fresh.get(k)!r} now" for k in changed)
        raise ValueError(f"{out} holds a harvest with other settings ({details}); resume with the same "
                         "settings or harvest into another folder")


def _corpus_name(corpus) -> str:
    if isinstance(corpus, (list, tuple)):
        return f"<{len(corpus)} texts>"
    path = Path(corpus)
    return str(path.resolve()) if path.exists() else str(corpus)


def read_manifest(path) -> dict:
    """The manifest of an on-disk harvest, checked for its format version and field types."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise ArtifactError(f"{path} is not an activation harvest: {MANIFEST_FILE} is missing")
    manifest = read_json_object(file, "activation manifest")
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("type") != "interplab.activations":
        raise ArtifactError(f"{file}: not an interplab activation manifest of format_version {FORMAT_VERSION}")
    config_field(manifest, "sites", dict, file, what="activation manifest")
    for shard in config_field(manifest, "shards", list, file, what="activation manifest"):
        if not isinstance(shard, dict):
            raise ArtifactError(f"{file}: every entry of 'shards' must be a JSON object, got {shard!r}")
        config_field(shard, "file", str, file, what="shard entry")
        config_field(shard, "n_tokens", int, file, what="shard entry")
    return manifest


def disk_chunks(path, sites: Sequence[str] | None = None, *,
                share: tuple[int, int] | None = None) -> Iterator[ActivationChunk]:
    """The shards of an on-disk harvest, in order, one chunk each (only `sites`, when given;
    only shards rank, rank + world_size, ... with share=(rank, world_size)).
    Each shard is checked against its manifest entry (size, digest, rows) before it is used."""
    from safetensors import safe_open

    rank, world = _check_share(share)
    manifest = read_manifest(path)
    names = list(manifest["sites"]) if sites is None else list(sites)
    for number, shard in enumerate(manifest["shards"]):
        if number % world != rank:
            continue
        file = Path(path) / shard["file"]
        _check_shard(file, shard, Path(path) / MANIFEST_FILE)
        try:
            with safe_open(str(file), framework="pt") as f:
                chunk = ActivationChunk({s: f.get_tensor(s) for s in names}, f.get_tensor("tokens"),
                                        f.get_tensor("contexts"), f.get_tensor("positions"))
        except Exception as err:  # safetensors' own error types, or a missing tensor
            raise ArtifactError(f"{file} is not a readable activation shard ({err}); harvest again") from None
        if len(chunk) != shard["n_tokens"]:
            raise ArtifactError(f"{file} holds {len(chunk)} rows but {MANIFEST_FILE} lists {shard['n_tokens']}")
        yield chunk


def _check_shard(file: Path, shard: dict, manifest: Path) -> None:
    if not file.is_file():
        raise ArtifactError(f"{file} is listed in {manifest} but missing; harvest again into a new folder")
    if "bytes" in shard and file.stat().st_size != shard["bytes"]:
        raise ArtifactError(f"{file} has {file.stat().st_size} bytes but {manifest} lists {shard['bytes']}: "
                            "the shard was changed or truncated; harvest again")
    if "digest" in shard:
        check_digest(shard["digest"], file_digest(file), manifest, file)
