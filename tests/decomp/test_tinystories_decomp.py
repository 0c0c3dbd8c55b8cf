"""Skip transcoders on the real TinyStories-656K, trained here for both MLPs from one harvest pass;
spliced in for every MLP they recover >= 0.8 of the CE loss; an attribution graph built with them
is complete, prunes to the influence it reports, and its top features move the logit as it says:
exactly with attention and norms frozen when no other latent switches, within bounds otherwise, and
in the predicted direction in the real model.
"""

from __future__ import annotations

import time

import pytest
import torch

from interplab.graph.attribution import attribute
from interplab.graph.check import check_interventions
from interplab.graph.prune import prune
from interplab.sae.store import corpus_windows
from interplab.sae.train import TrainConfig
from interplab.sae.transcoder import load_transcoders, save_transcoders
from interplab.sae.transcoder_train import evaluate_transcoders, train_transcoders

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play with her"
EXACT_RTOL = 1e-3
"""Constrained runs where no other latent switches on or off: the graph's prediction is exact (up to
float error), so measured / predicted must be 1 to this tolerance."""
CONSTRAINED_RATIO = (0.5, 1.5)
"""Bounds of constrained / predicted Δlogit when latents downstream do switch (the TopK selection
responds): 0.58–1.14 when this test was written."""
FREE_MAX_RATIO = 1.5
"""Upper bound of free / predicted: attention, norms and latents respond in the real model and
shrink the change (0.10–0.69 when this test was written; the sign must always agree)."""


@pytest.fixture(scope="module")
def transcoders(tinystories, corpus, tmp_path_factory):
    torch.manual_seed(0)
    started, cpu = time.perf_counter(), time.process_time()
    trained = train_transcoders(tinystories, corpus, [0, 1], TrainConfig(n_steps=200, lr=2e-3, progress=False,
                                tensorboard=False), d_sae=1024, k=32, skip=True, max_tokens=100_000,
                                batch_size=1024)
    print(f"\ntranscoders trained in {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")
    path = save_transcoders(trained, tmp_path_factory.mktemp("tc") / "transcoders")
    return load_transcoders(path)


def test_spliced_for_every_mlp_they_recover_the_loss(tinystories, corpus, transcoders):
    windows = corpus_windows(tinystories, corpus, context_length=128, skip_contexts=3600, n_contexts=32)
    result = evaluate_transcoders(tinystories, transcoders, windows)
    print(f"\nCE clean {result.clean_loss:.3f}, transcoders {result.transcoder_loss:.3f}, MLPs zero-ablated "
          f"{result.ablated_loss:.3f}: CE loss recovered {result.ce_loss_recovered:.3f}, KL {result.kl:.3f}")
    assert result.layers == [0, 1]
    assert result.ce_loss_recovered >= 0.8


@pytest.fixture(scope="module")
def graph_and_ids(tinystories, transcoders):
    ids = tinystories.tokenizer(PROMPT, return_tensors="pt")["input_ids"][0]
    return attribute(tinystories, transcoders, ids, batch_size=128), ids


def test_graph_is_complete(graph_and_ids):
    graph, _ = graph_and_ids
    targets = [i for i, n in enumerate(graph.nodes) if n["kind"] in ("feature", "logit")]
    recomposed = graph.adjacency.double()[targets].sum(1) + graph.biases()[targets]
    torch.testing.assert_close(recomposed, graph.values()[targets], rtol=1e-3, atol=1e-3)


def test_pruning_and_interventions(tinystories, transcoders, graph_and_ids):
    graph, ids = graph_and_ids
    pruned = prune(graph, node_threshold=0.8)
    assert pruned.meta["node_influence_kept"] >= 0.8
    assert pruned.meta["features_kept"] < pruned.meta["features_total"]
    checks = check_interventions(tinystories, transcoders, graph, ids, top=3, scales=(0.0, 2.0))
    for check in checks:
        print(f"features {check.nodes} x{check.scale}: predicted {check.predicted:+.3f}, constrained "
              f"{check.constrained:+.3f} ({check.crossings} latents switched), free {check.measured:+.3f}")
    assert any(check.crossings == 0 for check in checks)  # the exact case is exercised
    for check in checks:
        ratio = check.constrained / check.predicted
        if check.crossings == 0:
            assert ratio == pytest.approx(1.0, abs=EXACT_RTOL)
        else:
            assert CONSTRAINED_RATIO[0] <= ratio <= CONSTRAINED_RATIO[1]
        free = check.measured / check.predicted
        assert 0 < free <= FREE_MAX_RATIO  # the direction, always
