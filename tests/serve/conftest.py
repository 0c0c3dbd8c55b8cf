"""A real server on a free loopback port, with TinyStories-656K, a vector, an SAE and its index."""

from __future__ import annotations

import threading
import time

import pytest
import torch

SAE_SITE = "blocks.1.hook_resid_post"


class RunningServer:
    """uvicorn in a thread, bound to port 0 (the OS picks a free port)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start(model, **kwargs) -> tuple[RunningServer, object]:
    from interplab.serve.app import create_app
    from interplab.serve.server import build_state

    cors = kwargs.pop("cors", None)
    state = build_state(model, **kwargs)
    return RunningServer(create_app(state, cors=cors)), state


@pytest.fixture(scope="session")
def ts_sae(tinystories, tmp_path_factory):
    """A random-init SAE on TinyStories' last block (saved as a folder) and its feature index."""
    from interplab.sae.config import SAEConfig
    from interplab.sae.features import build_feature_index
    from interplab.sae.formats import save_sae
    from interplab.sae.model import SAE

    folder = tmp_path_factory.mktemp("sae")
    sae = SAE(SAEConfig(d_in=128, d_sae=64, family="topk", k=8, site=SAE_SITE),
              generator=torch.Generator().manual_seed(0))
    save_sae(sae, folder / "sae")
    texts = [line for line in open(_sample(), encoding="utf-8").read().split("\n") if line.strip()][:200]
    index = build_feature_index(tinystories, sae, texts, folder / "features.db", n_contexts=48,
                                context_length=24, n_top=5, n_bins=8)
    index.close()
    return folder / "sae", folder / "features.db"


def _sample():
    import os
    from pathlib import Path

    return Path(os.environ["INTERPLAB_SHARED"]) / "data" / "tinystories_sample.txt"


@pytest.fixture(scope="session")
def ts_transcoders(tinystories, tmp_path_factory):
    """Random-init transcoders for both of TinyStories' blocks (a set folder), with input and output
    scales set from the model's MLP inputs and outputs on a sample (untrained, but their features
    write as much as the MLPs do, so the graphs have feature-to-feature edges worth drawing)."""
    from interplab.cache import capture
    from interplab.sae.features import build_feature_index, transcoder_index_path
    from interplab.sae.transcoder import Transcoder, TranscoderConfig, save_transcoders

    text = " ".join(open(_sample(), encoding="utf-8").read().split("\n")[:8])
    ids = tinystories.require_tokenizer()(text, return_tensors="pt")["input_ids"][:, :256]
    layers = range(tinystories.n_layers)
    cache = capture(tinystories, [f"blocks.{L}.{kind}" for L in layers for kind in ("hook_resid_mid", "hook_mlp_out")], ids)
    g = torch.Generator().manual_seed(0)
    transcoders = {}
    for L in layers:
        tc = Transcoder(TranscoderConfig(d_in=128, d_out=128, d_sae=64, layer=L, k=8), generator=g).eval()
        with torch.no_grad():
            x = tinystories.block_module(L, tinystories.arch.ln2)(cache[f"blocks.{L}.hook_resid_mid"][0])  # the MLP input
        tc.init_from_data_(x, cache[f"blocks.{L}.hook_mlp_out"][0])
        transcoders[L] = tc
    folder = save_transcoders(transcoders, tmp_path_factory.mktemp("transcoders") / "tc")
    texts = [line for line in open(_sample(), encoding="utf-8").read().split("\n") if line.strip()][:100]
    for L, tc in transcoders.items():  # each layer's feature index, where the server looks for it
        build_feature_index(tinystories, tc, texts, transcoder_index_path(folder, L), n_contexts=24,
                            context_length=24, n_top=5, n_bins=8).close()
    return folder


@pytest.fixture(scope="session")
def vectors_dir(tinystories, tmp_path_factory):
    """A registry folder with two vectors of the model's width (random directions, fixed seeds)."""
    from interplab.steering.vector import SteeringVector

    folder = tmp_path_factory.mktemp("vectors")
    for name, seed in (("happy", 1), ("sad", 2)):
        g = torch.Generator().manual_seed(seed)
        SteeringVector({0: torch.randn(128, generator=g), 1: torch.randn(128, generator=g)},
                       model_id=tinystories.model_id).save(folder / name)
    return folder


@pytest.fixture(scope="session")
def server(tinystories, ts_sae, vectors_dir, ts_transcoders):
    running, state = start(tinystories, vectors=str(vectors_dir), saes={"ts": str(ts_sae[0])},
                           features={"ts": str(ts_sae[1])}, gather_s=0.05, max_tokens=64,
                           transcoders={"tc": str(ts_transcoders)})
    running.state = state
    yield running
    running.stop()
