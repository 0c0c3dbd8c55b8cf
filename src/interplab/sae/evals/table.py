"""One results table per SAE (JSON) and a comparison plot across SAEs, SAEBench-style.

`bench_sae` runs every evaluation on the tokenizer tasks of `interplab.sae.evals.tasks` (and,
on request, the CAA behaviour tasks) and returns a JSON-ready dict:

    {"format_version": 1, "sae": {...config...}, "model": ..., "site": ...,
     "absorption": {"mean_absorption_rate": ..., "letters": [...]},
     "sparse_probing": {"mean_sae_accuracy": {"1": ..., ...}, "mean_raw_accuracy": ..., "tasks": [...]}}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from interplab.files import read_json_object, write_json

FORMAT_VERSION = 1


def bench_sae(model, sae, *, site: str | None = None, ks: Sequence[int] = (1, 2, 5, 10, 20),
              max_tokens: int = 4000, seed: int = 0, name: str = "", caa: Sequence = (),
              n_pairs: int | None = 100) -> dict:
    """Absorption and k-sparse probing of `sae` at its site (see the two modules' docstrings);
    `caa` adds a probing task per CAA behaviour (its first `n_pairs` A/B questions, `caa_task`)."""
    from interplab.models.handle import as_loaded
    from interplab.sae.downstream import resolve_sae_site
    from interplab.sae.evals.absorption import feature_absorption
    from interplab.sae.evals.probing import sparse_probing
    from interplab.sae.evals.tasks import caa_task, tokenizer_tasks

    model = as_loaded(model)
    resolved = resolve_sae_site(model, sae, site)
    acts, letters, tasks = tokenizer_tasks(model, resolved.name, max_tokens=max_tokens, seed=seed)
    tasks += [caa_task(model, resolved.name, behavior, n_pairs=n_pairs) for behavior in caa]
    absorption = feature_absorption(sae, acts, letters, seed=seed)
    probing = [sparse_probing(sae, task, ks=ks, seed=seed) for task in tasks]
    return {
        "format_version": FORMAT_VERSION, "name": name or sae.cfg.site, "model": model.model_id,
        "site": resolved.name, "sae": sae.cfg.to_dict(), "n_tokens": int(acts.shape[0]),
        "absorption": absorption.to_dict(), "sparse_probing": _probing_summary(probing, ks),
    }


def _probing_summary(results, ks) -> dict:
    mean = {str(k): sum(r.sae_accuracy[k] for r in results) / len(results) for k in sorted(set(ks))}
    return {"mean_sae_accuracy": mean,
            "mean_raw_accuracy": sum(r.raw_accuracy for r in results) / len(results),
            "tasks": [r.to_dict() for r in results]}


def write_results(path: str | Path, results: dict) -> Path:
    """Write one SAE's results table."""
    return write_json(path, results)


def read_results(path: str | Path) -> dict:
    """Read a results table written by `write_results`."""
    data = read_json_object(path, what="SAE bench results")
    if data.get("format_version") != FORMAT_VERSION or "absorption" not in data:
        from interplab.errors import ArtifactError

        raise ArtifactError(f"{path} is not an interplab SAE bench results file (format_version {FORMAT_VERSION})")
    return data


def plot_comparison(tables: Sequence[dict], path: str | Path) -> Path:
    """Two panels: mean sparse-probing accuracy against k (one line per SAE, the raw probe
    dashed), and the mean absorption rate per SAE."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for i, table in enumerate(tables):
        acc = table["sparse_probing"]["mean_sae_accuracy"]
        ks = sorted(int(k) for k in acc)
        line, = left.plot(ks, [acc[str(k)] for k in ks], marker="o", label=table["name"])
        left.axhline(table["sparse_probing"]["mean_raw_accuracy"], color=line.get_color(), ls="--", lw=0.8)
        right.bar(i, table["absorption"]["mean_absorption_rate"] or 0.0, color=line.get_color())
    left.set(xscale="log", xlabel="k latents", ylabel="mean test accuracy", title="k-sparse probing (dashed: raw probe)")
    left.legend(fontsize=8)
    right.set(xticks=range(len(tables)), ylabel="mean absorption rate", title="first-letter absorption")
    right.set_xticklabels([t["name"] for t in tables], rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
