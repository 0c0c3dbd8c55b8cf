"""The per-rank program the distributed tests launch with `python -m torch.distributed.run`.

    python -m torch.distributed.run --standalone --nproc-per-node 2 dist_worker.py JOB.json

JOB.json: {"tasks": [...], "out": folder, "corpus": file, ...}; tasks are "train" (data-parallel
train_sae), "sites" (train_distributed_sites over two sites) and "harvest" (harvest_to_disk).
"kill_rank"/"kill_at" make that rank SIGKILL itself when its stream is asked for batch kill_at.
The settings are shared with the tests through `settings()`, so the single-process references
use the very same stores and configs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
MODEL = Path(os.environ.get("INTERPLAB_SHARED", "")) / "models" / "TinyStories-656K"


def settings(n_steps: int = 12, checkpoint_every: int = 0, device: str = "cpu"):
    from interplab.sae.config import SAEConfig
    from interplab.sae.store import StoreConfig
    from interplab.sae.train import TrainConfig

    store = StoreConfig(sites=SITES, context_length=32, batch_size=48, buffer_tokens=192, model_batch_size=2)
    train = TrainConfig(n_steps=n_steps, log_every=4, checkpoint_every=checkpoint_every, progress=False,
                        tensorboard=False, dead_after_tokens=300, n_init_batches=2, lr=1e-3, device=device)
    saes = {f"sae_{i}": SAEConfig(d_in=128, d_sae=192, family="topk", k=6, site=site) for i, site in enumerate(SITES)}
    return store, train, saes


def store_for(model, corpus, share):
    from interplab.sae.store import ActivationStore

    store_cfg = settings()[0]
    return ActivationStore.from_corpus(model, corpus, store_cfg, share=share, repeat=True)


def _killing(batches, at: int):
    for i, batch in enumerate(batches):
        if i == at:
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch


def main(job_file: str) -> None:
    import interplab
    from interplab.sae import parallel
    from interplab.sae.store import harvest_to_disk
    from interplab.sae.train import train_sae

    job = json.loads(Path(job_file).read_text())
    group = parallel.init_from_env(job.get("device"))
    model = interplab.load(str(MODEL), device="cpu")
    share = (group.rank, group.world_size)
    out = Path(job["out"])
    _, train_cfg, saes = settings(job.get("n_steps", 12), job.get("checkpoint_every", 0), job.get("device", "cpu"))
    if "train" in job["tasks"]:
        batches = store_for(model, job["corpus"], share).batches(SITES[0])
        if job.get("kill_rank") == group.rank:
            batches = _killing(batches, job["kill_at"])
        train_sae(saes["sae_0"], batches, train_cfg, out_dir=out / "train", resume=job.get("resume", False))
    if "sites" in job["tasks"]:
        chunks = store_for(model, job["corpus"], share)
        site_batches = ({site: chunk.acts[site] for site in SITES} for chunk in chunks)
        parallel.train_distributed_sites(saes, site_batches, train_cfg, out_dir=out / "sites")
    if "harvest" in job["tasks"]:
        harvest_to_disk(model, job["harvest_corpus"], out / "harvest", settings()[0], contexts_per_shard=4)
    group.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
