"""torch.distributed for harvesting and SAE training, launched with `torchrun`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `init_from_env()` reads
them and joins the process group (gloo on CPUs, NCCL on GPUs). Without torchrun (or with one
process) everything runs through the same code with a `Group` of size 1, whose collectives do
nothing.

Data parallel training (`train_saes` under torchrun): every rank reads a disjoint, deterministic
share of the corpus windows (model batch b belongs to rank b mod world_size), computes the
gradient of its local mean loss, and the gradients are averaged with weights n_rank / n_total, so
every rank takes the step a single process would take on the concatenated global batch. Which
latents fired is OR-reduced, so dead-latent statistics are those of the global batch. Rank 0
writes the log, the checkpoints and the SAEs; every rank reads the checkpoint when resuming.
(BatchTopK is the exception to exact equality: each rank keeps the top k·B of its own share and
the inference threshold is averaged over the ranks.)

Distributed sites (`train_distributed_sites`): each rank owns the SAEs of some sites; every step
the ranks' batches of each site are gathered at every rank (all_gather), and each rank trains
only its own sites on the global batch, without gradient reduction.

Control messages (which rank has a batch, how big) go through a gloo group on the CPU, so the
GPU never waits for the host because of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import Tensor, nn

from interplab.errors import UserInputError

_TIMEOUT = timedelta(minutes=int(os.environ.get("INTERPLAB_DIST_TIMEOUT_MIN", "30")))


class RankFailure(RuntimeError):
    """Another rank stopped (killed, crashed, out of memory) while this one waited for it."""


@dataclass
class Group:
    """Who this process is among the processes of one job, and the collectives it needs."""

    rank: int = 0
    world_size: int = 1
    control: object = field(default=None, repr=False)
    """A gloo process group for small CPU messages (None at world size 1)."""

    @classmethod
    def local(cls) -> "Group":
        """One process: every collective is a no-op."""
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes logs, checkpoints and results."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item `index` of a round-robin split (windows batches, shards, sites) is ours."""
        return index % self.world_size == self.rank

    # --- collectives (no-ops at world size 1) --------------------------------------------------

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order (small picklable objects; CPU)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        _guarded(lambda: torch.distributed.all_gather_object(out, obj, group=self.control))
        return out

    def batch_sizes(self, n: int) -> list[int]:
        """Every rank's batch size this step (0: its stream ended)."""
        if not self.distributed:
            return [n]
        local = torch.tensor([n], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        _guarded(lambda: torch.distributed.all_gather(sizes, local, group=self.control))
        return [int(s) for s in sizes]

    def reduce_gradients_(self, params: Sequence[nn.Parameter], weight: float) -> None:
        """grad ← Σ_ranks weight_rank · grad_rank, in one flat all-reduce."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(weight)
        _guarded(lambda: torch.distributed.all_reduce(flat))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def reduce_fired(self, fired: Tensor) -> Tensor:
        """Latents that fired on any rank."""
        if not self.distributed:
            return fired
        counts = fired.to(torch.int32)
        _guarded(lambda: torch.distributed.all_reduce(counts))
        return counts > 0

    def reduce_mean_(self, tensor: Tensor) -> Tensor:
        if self.distributed:
            _guarded(lambda: torch.distributed.all_reduce(tensor))
            tensor.div_(self.world_size)
        return tensor

    def broadcast_(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere."""
        if not self.distributed:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            _guarded(lambda t=tensor: torch.distributed.broadcast(t.data, src=0))

    def gather_rows(self, x: Tensor) -> Tensor:
        """The ranks' (n_r, d) tensors concatenated in rank order (sizes may differ)."""
        if not self.distributed:
            return x
        sizes = self.batch_sizes(x.shape[0])
        padded = x.new_zeros(max(sizes), *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        group = None if x.is_cuda else self.control  # CPU rows go through gloo even in an NCCL job
        _guarded(lambda: torch.distributed.all_gather(parts, padded, group=group))
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def barrier(self) -> None:
        if self.distributed:
            _guarded(lambda: torch.distributed.barrier(group=self.control))


def _guarded(collective) -> None:
    """Run a collective; a peer that went away becomes a RankFailure that says what to do."""
    try:
        collective()
    except (RuntimeError, OSError) as error:  # gloo/NCCL report a lost peer as RuntimeError
        raise RankFailure(
            f"rank {_env_int('RANK', 0)}: another rank stopped during a collective ({error}); the job "
            "cannot continue. Relaunch the same torchrun command with --resume (same number of "
            "processes) to continue from the last checkpoint"
        ) from error


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value is not None and value.isdigit() else default


def init_from_env(device: str | None = None) -> Group:
    """Join the torchrun job described by the environment, or return a one-process Group.

    `device`: where this rank computes; 'cuda' picks cuda:LOCAL_RANK and NCCL, anything else gloo."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Group.local()
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    on_gpu = device is not None and str(device).startswith("cuda")
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if on_gpu else "gloo", timeout=_TIMEOUT)
    control = _gloo_group() if dist.get_backend() == "nccl" else dist.group.WORLD
    return Group(rank=rank, world_size=world, control=control)


def current() -> Group:
    """The job this process already joined (init_from_env or init_process_group), else size 1."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Group.local()
    control = dist.group.WORLD if dist.get_backend() == "gloo" else _gloo_group()
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), control=control)


_GLOO: dict[str, object] = {}


def _gloo_group():
    if "group" not in _GLOO:
        _GLOO["group"] = torch.distributed.new_group(backend="gloo", timeout=_TIMEOUT)
    return _GLOO["group"]


def device_for_rank(device: str) -> str:
    """'cuda' becomes this rank's GPU (cuda:LOCAL_RANK); other devices are returned as they are."""
    if device == "cuda" and _env_int("WORLD_SIZE", 1) > 1:
        return f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return device


# --------------------------------------------------------------------------------------------
# Distributed sites: each rank owns some sites' SAEs
# --------------------------------------------------------------------------------------------


def site_owners(sites: Sequence[str], world_size: int) -> dict[str, int]:
    """Round-robin owner rank of each site, in the given order."""
    return {site: i % world_size for i, site in enumerate(sites)}


def gathered_site_batches(local: Iterator[dict[str, Tensor]], owned: Sequence[str],
                          group: Group) -> Iterator[dict[str, Tensor]]:
    """Per step: every rank's batch of every site gathered (all_gather), keeping only `owned`.

    Every rank takes part in every gather, so all ranks stop together when any stream ends."""
    while True:
        batch = next(local, None)
        sizes = group.batch_sizes(0 if batch is None else next(iter(batch.values())).shape[0])
        if 0 in sizes:
            return
        out = {}
        for site in sorted(batch):
            rows = group.gather_rows(batch[site])
            if site in owned:
                out[site] = rows
        yield out


def train_distributed_sites(sae_configs, site_batches: Iterator[dict[str, Tensor]], train_config, *,
                            out_dir=None, resume: bool = False, group: Group | None = None) -> dict:
    """Train SAEs of several sites with each rank owning the SAEs of some sites (round robin over
    the sites in the order first named). `site_batches` yields this rank's {site: (n, d)} batches;
    each step the owner of a site trains on every rank's batch of it, concatenated in rank order,
    which is what one process training on the concatenated batches would do. SAE number i (in the
    order given) is initialised with seed + i on whichever rank owns it, so the result does not
    depend on the number of processes.

    Rank r keeps its log, checkpoints and SAEs in out_dir/rank_XXX/ (see `rank_dir`); resuming
    needs the same number of processes. Returns this rank's SAEs by name."""
    from pathlib import Path

    from interplab.sae.train import _named_configs, train_saes

    group = current() if group is None else group
    configs = _named_configs(sae_configs)
    sites = list(dict.fromkeys(cfg.site for cfg in configs.values()))
    if "" in sites:
        raise UserInputError("distributed sites need every SAEConfig to name its site (SAEConfig(site=...))")
    owners = site_owners(sites, group.world_size)
    mine = {name: cfg for name, cfg in configs.items() if owners[cfg.site] == group.rank}
    if not mine:
        raise UserInputError(f"rank {group.rank} owns no site: {len(sites)} sites for {group.world_size} processes; "
                         "launch at most as many processes as sites")
    out = None if out_dir is None else Path(out_dir) / rank_dir(group.rank)
    if out is not None:
        _check_owners(Path(out_dir), owners, group, resume)
    if out is not None and resume:
        _agree_on_checkpoint(out, group)
    stream = gathered_site_batches(iter(site_batches), [s for s in sites if owners[s] == group.rank], group)
    seeds = {name: i for i, name in enumerate(configs)}  # as in one train_saes call, whoever owns it
    return train_saes(mine, stream, train_config, out_dir=out, resume=resume, group=_Owner(group), seed_index=seeds)


def _check_owners(out, owners: dict[str, int], group: Group, resume: bool) -> None:
    """OUT/sites.json records which rank owns which site; a resumed job must have the same."""
    import json

    from interplab.files import write_json

    path = out / "sites.json"
    record = {"world_size": group.world_size, "owners": owners}
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        if saved != record:
            raise UserInputError(
                f"cannot resume: {out} was trained by {saved.get('world_size')} processes owning sites "
                f"{saved.get('owners')}; this job has {group.world_size} processes ({owners}). Relaunch with "
                f"{saved.get('world_size')} processes and the same sites, or train into a new folder")
    group.barrier()
    if group.is_writer:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, record)


def rank_dir(rank: int) -> str:
    return f"rank_{rank:03d}"


class _Owner(Group):
    """A rank training SAEs no other rank has: no gradient or statistics reduction (its batches
    are global already), but it writes its own results and must stop when the others stop."""

    def __init__(self, group: Group) -> None:
        super().__init__(rank=0, world_size=1, control=None)

    def batch_sizes(self, n: int) -> list[int]:
        return [n]


def _agree_on_checkpoint(out, group: Group) -> None:
    """Ranks that were killed at different times may hold checkpoints of different steps: resume
    all from the newest step every rank has, removing newer ones (they are recomputed)."""
    import shutil

    from interplab.sae.train import _checkpoints

    steps = group.gather_objects({int(p.name.split("_")[1]) for p in _checkpoints(out)})
    common = set.intersection(*steps)
    newest = max(common) if common else 0
    for path in _checkpoints(out):
        if int(path.name.split("_")[1]) > newest:
            shutil.rmtree(path)
    group.barrier()


# --------------------------------------------------------------------------------------------
# Harvesting to disk under torchrun
# --------------------------------------------------------------------------------------------


def harvest_ranks(model, corpus, out_dir, cfg, *, n_tokens: int | None, contexts_per_shard: int,
                  progress: bool, group: Group):
    """Each rank harvests its share of the windows (`harvest_chunks(share=...)`) into
    out_dir/rank_XXX/ (resumable like any harvest); then rank 0 writes out_dir/manifest.json,
    which lists every rank's shards (shard i of rank 0, of rank 1, ..., then shard i + 1), so
    `ActivationStore.from_disk(out_dir)` reads them all. n_tokens is split evenly over the ranks."""
    import math
    from pathlib import Path

    from interplab.files import write_json
    from interplab.sae.store import MANIFEST_FILE, harvest_to_disk, read_manifest

    out = Path(out_dir)
    if group.is_writer and (out / MANIFEST_FILE).is_file():
        saved = read_manifest(out).get("world_size", 1)
        problem = None if saved == group.world_size else saved
    else:
        problem = None
    problem = group.gather_objects(problem)[0]
    if problem is not None:
        raise UserInputError(f"{out} holds a harvest by {problem} process(es) and this job has {group.world_size}; "
                         f"resume it with {problem} processes, or harvest into another folder")
    share_tokens = None if n_tokens is None else math.ceil(n_tokens / group.world_size)
    harvest_to_disk(model, corpus, out / rank_dir(group.rank), cfg, n_tokens=share_tokens,
                    contexts_per_shard=contexts_per_shard, progress=progress and group.is_writer,
                    share=(group.rank, group.world_size), group=Group.local())
    group.barrier()
    if group.is_writer:
        parts = [read_manifest(out / rank_dir(r)) for r in range(group.world_size)]
        write_json(out / MANIFEST_FILE, _joint_manifest(parts, group.world_size, n_tokens))
    group.barrier()
    return out


def _joint_manifest(parts: list[dict], world_size: int, n_tokens: int | None) -> dict:
    shards = []
    for i in range(max(len(p["shards"]) for p in parts)):
        for rank, part in enumerate(parts):
            if i < len(part["shards"]):
                entry = part["shards"][i]
                shards.append({**entry, "file": f"{rank_dir(rank)}/{entry['file']}"})
    joint = {key: value for key, value in parts[0].items() if key not in ("shards", "share", "complete", "n_tokens")}
    return {**joint, "n_tokens": n_tokens, "world_size": world_size, "shards": shards,
            "complete": all(p["complete"] for p in parts)}
