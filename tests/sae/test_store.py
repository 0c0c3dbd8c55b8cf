"""Activation store: windows, harvesting, the mixing buffer and the on-disk harvest."""

from __future__ import annotations

import json
import random

import pytest
import torch

import interplab
from interplab.errors import ArtifactError
from interplab.sae import store as store_module
from interplab.sae.store import (
    ActivationStore, Harvester, StoreConfig, corpus_windows, harvest_chunks, harvest_to_disk,
    iter_documents, iter_windows, read_manifest,
)
from tests.tiny import tiny_model

SITE = "blocks.1.hook_resid_post"
WORDS = ["the", "cat", "dog", "sat", "on", "mat", "hot", "cold", "weather", "is", "a", "."] + [f"w{i}" for i in range(40)]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n<|endoftext|>\n".join(documents(120)))
    return path


def test_windows_start_with_bos_and_keep_the_token_stream(llama):
    docs = documents(30)
    tokenizer = llama.tokenizer
    windows = list(iter_windows(tokenizer, docs, 16))
    stream = []
    for doc in docs:
        stream += [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
    assert all(len(w) == 16 and w[0] == tokenizer.bos_token_id for w in windows)
    rebuilt = []
    for w in windows:  # drop the BOS put in front of windows that start inside a document
        rebuilt += w if len(rebuilt) < len(stream) and stream[len(rebuilt)] == w[0] else w[1:]
    assert rebuilt == stream[:len(rebuilt)]
    assert len(stream) - len(rebuilt) < 16  # only the last partial window is left out


def test_text_file_documents_split_at_separator(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nline two\n<|endoftext|>\nsecond<|endoftext|>third\n\n<|endoftext|>\n")
    assert list(iter_documents(path)) == ["first doc\nline two", "second", "third"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.jsonl").write_text(json.dumps({"text": "from json"}) + "\n\n" + json.dumps({"text": "again"}) + "\n")
    (folder / "a.txt").write_text("plain text")
    assert list(iter_documents(folder)) == ["plain text", "from json", "again"]


def test_harvest_drops_bos_and_matches_capture(llama):
    windows = corpus_windows(llama, documents(40), context_length=12, n_contexts=6)
    chunk = Harvester(llama, [SITE]).run(windows, 0)
    bos = llama.tokenizer.bos_token_id
    assert (windows[:, 0] == bos).all()
    assert bos not in chunk.tokens.tolist()
    keep = windows != bos
    assert len(chunk) == int(keep.sum())
    reference = interplab.capture(llama, SITE, windows)[SITE]
    torch.testing.assert_close(chunk.acts[SITE], reference[keep])
    assert torch.equal(chunk.contexts, torch.arange(6)[:, None].expand_as(windows)[keep])
    assert torch.equal(chunk.positions, torch.arange(12).expand_as(windows)[keep])
    everything = Harvester(llama, [SITE], drop_special_tokens=False).run(windows, 0)
    assert len(everything) == windows.numel()


def test_harvest_stops_after_the_deepest_site(llama):
    calls = []
    handle = llama.block(2).register_forward_hook(lambda *a: calls.append(1))
    try:
        cfg = StoreConfig(sites=("blocks.0.hook_resid_post", "blocks.1.attn.hook_z"), context_length=12,
                          model_batch_size=4, batch_size=8, buffer_tokens=16)
        chunks = list(harvest_chunks(llama, documents(40), cfg))
    finally:
        handle.remove()
    assert calls == []
    assert chunks[0].acts["blocks.1.attn.hook_z"].shape[1] == llama.n_heads * llama.d_head
    assert chunks[0].acts["blocks.0.hook_resid_post"].shape[1] == llama.d_model


def test_buffer_memory_is_constant_and_every_token_is_served_once(llama):
    cfg = StoreConfig(sites=(SITE,), context_length=16, batch_size=32, buffer_tokens=128, model_batch_size=4)
    store = ActivationStore.from_corpus(llama, documents(200), cfg)
    pointers = {name: t.data_ptr() for name, t in store.buffer.acts.items()}
    nbytes = store.buffer.nbytes
    served, keys = 0, set()
    for batch in store:
        assert store.buffer.nbytes == nbytes
        assert {n: t.data_ptr() for n, t in store.buffer.acts.items()} == pointers
        assert store.buffer.filled <= store.buffer.capacity
        served += len(batch)
        keys |= set(zip(batch.contexts.tolist(), batch.positions.tolist()))
    assert store.tokens_read > 10 * store.buffer.capacity
    assert served == store.tokens_read == len(keys)  # nothing lost, nothing served twice


def test_shuffling_mixes_contexts(llama):
    cfg = StoreConfig(sites=(SITE,), context_length=16, batch_size=32, buffer_tokens=480, model_batch_size=4, seed=1)
    batches = list(ActivationStore.from_corpus(llama, documents(200), cfg))
    first = batches[0]
    assert len(set(first.contexts.tolist())) >= 12  # 32 rows drawn from ~30 windows in the buffer
    order = first.contexts * 100 + first.positions
    assert not torch.equal(order, order.sort().values)
    again = list(ActivationStore.from_corpus(llama, documents(200), cfg))
    assert all(torch.equal(a.acts[SITE], b.acts[SITE]) for a, b in zip(batches, again))  # seeded


def test_store_batches_feed_plain_tensors(llama):
    cfg = StoreConfig(sites=(SITE,), context_length=16, batch_size=32, buffer_tokens=64, model_batch_size=4)
    store = ActivationStore.from_corpus(llama, documents(50), cfg, max_tokens=100, repeat=True)
    stream = store.batches()
    got = [next(stream) for _ in range(20)]  # more than one pass: repeat starts over
    assert all(x.shape == (32, llama.d_model) for x in got)
    assert store.tokens_read > 100


def test_killed_disk_harvest_resumes_to_the_same_shards(llama, corpus_file, tmp_path, monkeypatch):
    cfg = StoreConfig(sites=(SITE, "blocks.0.hook_mlp_out"), context_length=16, model_batch_size=4)
    whole = harvest_to_disk(llama, corpus_file, tmp_path / "whole", cfg, contexts_per_shard=8)
    real_write, written = store_module._write_shard, []

    def dying_write(out, index, chunk):
        if index == 3:  # killed while writing the fourth shard: a temporary file is left behind
            (out / f".shard_{index:05d}.safetensors.partial").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        written.append(index)
        return real_write(out, index, chunk)

    monkeypatch.setattr(store_module, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        harvest_to_disk(llama, corpus_file, tmp_path / "resumed", cfg, contexts_per_shard=8)
    assert written == [0, 1, 2]
    stopped = read_manifest(tmp_path / "resumed")
    assert len(stopped["shards"]) == 3 and not stopped["complete"]
    monkeypatch.setattr(store_module, "_write_shard", real_write)
    resumed = harvest_to_disk(llama, corpus_file, tmp_path / "resumed", cfg, contexts_per_shard=8)
    a, b = read_manifest(whole), read_manifest(resumed)
    assert a["shards"] == b["shards"] and a["complete"] and b["complete"] and len(a["shards"]) > 4
    for shard in a["shards"]:
        assert (whole / shard["file"]).read_bytes() == (resumed / shard["file"]).read_bytes()
    served = sum(len(x) for x in ActivationStore.from_disk(resumed, sites=[SITE], batch_size=32, buffer_tokens=96).batches())
    assert served == sum(s["n_tokens"] for s in a["shards"])


def test_n_tokens_stops_at_exactly_the_number_asked_for(llama, corpus_file, tmp_path):
    cfg = StoreConfig(sites=(SITE,), context_length=16, model_batch_size=4)
    chunks = list(store_module.harvest_chunks(llama, corpus_file, cfg, max_tokens=37))
    assert sum(len(c) for c in chunks) == 37  # not a whole number of forward passes
    whole = list(store_module.harvest_chunks(llama, corpus_file, cfg))
    torch.testing.assert_close(torch.cat([c.acts[SITE] for c in chunks]),
                               torch.cat([c.acts[SITE] for c in whole])[:37])
    harvest_to_disk(llama, corpus_file, tmp_path / "h", cfg, contexts_per_shard=8, n_tokens=101)
    manifest = read_manifest(tmp_path / "h")
    assert sum(s["n_tokens"] for s in manifest["shards"]) == 101 and manifest["complete"]


def test_disk_harvest_refuses_other_settings(llama, corpus_file, tmp_path):
    cfg = StoreConfig(sites=(SITE,), context_length=16, model_batch_size=4)
    harvest_to_disk(llama, corpus_file, tmp_path / "h", cfg, contexts_per_shard=8, n_tokens=100)
    with pytest.raises(ValueError, match="context_length"):
        harvest_to_disk(llama, corpus_file, tmp_path / "h", StoreConfig(sites=(SITE,), context_length=8,
                                                                         model_batch_size=4),
                        contexts_per_shard=8, n_tokens=100)


def test_bad_inputs_fail_before_any_work(llama, tmp_path):
    with pytest.raises(ValueError, match="allows"):
        ActivationStore.from_corpus(llama, documents(10), StoreConfig(sites=(SITE,), context_length=65))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n<|endoftext|>\n  \n")
    with pytest.raises(ValueError, match="empty or too short"):
        ActivationStore.from_corpus(llama, empty, StoreConfig(sites=(SITE,), context_length=16))
    with pytest.raises(ValueError, match="empty or too short"):
        corpus_windows(llama, ["   "], context_length=8)
    with pytest.raises(ValueError, match="neither|not a file"):
        list(iter_documents(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="buffer_tokens"):
        StoreConfig(sites=(SITE,), batch_size=64, buffer_tokens=100)
    with pytest.raises(ValueError, match="out of range"):
        ActivationStore.from_corpus(llama, documents(10), StoreConfig(sites=("blocks.7.hook_resid_post",),
                                                                      context_length=16))


def test_a_shard_that_is_not_the_one_listed_is_refused(llama, corpus_file, tmp_path):
    cfg = StoreConfig(sites=(SITE,), context_length=16, model_batch_size=4)
    out = harvest_to_disk(llama, corpus_file, tmp_path / "h", cfg, contexts_per_shard=4, n_tokens=150)
    manifest = read_manifest(out)
    assert all(s["digest"].startswith("sha256:") and s["bytes"] > 0 for s in manifest["shards"])
    assert sum(len(c) for c in store_module.disk_chunks(out)) == sum(s["n_tokens"] for s in manifest["shards"])
    first, second = (out / s["file"] for s in manifest["shards"][:2])
    data = bytearray(second.read_bytes())
    data[-1] ^= 0xFF  # same size, one value changed: only the digest tells
    second.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"shard_00001.safetensors does not belong to"):
        list(store_module.disk_chunks(out))
    second.write_bytes(first.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"shard_00001.safetensors has 100 bytes"):
        list(store_module.disk_chunks(out))


def test_non_utf8_corpus_names_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ArtifactError, match=r"latin1.txt is not UTF-8"):
        list(iter_documents(bad))
    broken = tmp_path / "c.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ArtifactError, match=r"c.jsonl:2: not valid JSON"):
        list(iter_documents(broken))
