"""CUDA: capture stays on the GPU and equals HF, the sparse TopK path equals the dense one, bf16
matches float32 within tolerance, the training step never synchronises with the host, models spread
over two GPUs capture and steer like one, and 2-rank NCCL training equals one process."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import interplab
from interplab.interventions import add_vector, intervene
from interplab.sae import SAE, SAEConfig, TrainConfig, train_sae
from interplab.sae.steer import clamp_feature
from tests.gpu.conftest import gpus
from tests.tiny import tiny_model

SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
TEXTS = ["the cat sat on the mat", "hot weather is a cold dog"]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def cuda_llama(request):
    model = copy.deepcopy(tiny_model("llama"))
    model.hf.to(device="cuda", dtype=request.param)
    return model


def test_capture_stays_on_the_gpu_and_equals_hf(cuda_llama):
    ids = torch.randint(4, 90, (3, 10), generator=torch.Generator().manual_seed(0))
    cache = interplab.capture(cuda_llama, SITES, ids)
    with torch.no_grad():
        hidden = cuda_llama.hf(input_ids=ids.cuda(), output_hidden_states=True).hidden_states
    atol = 1e-5 if cuda_llama.dtype == torch.float32 else 1e-2
    for i, site in enumerate(SITES[:-1]):  # HF normalises the last block's output
        assert cache[site].is_cuda and cache[site].dtype == cuda_llama.dtype
        torch.testing.assert_close(cache[site], hidden[i + 1], atol=atol, rtol=0)


def test_steering_adds_in_the_activation_dtype_on_gpu(cuda_llama):
    direction = torch.randn(32)  # on the CPU: moved once to the GPU and the model's dtype
    plain = interplab.capture(cuda_llama, SITES[0], TEXTS)[SITES[0]]
    with intervene(cuda_llama, {SITES[0]: add_vector(direction, scale=2.0)}):
        steered = interplab.capture(cuda_llama, SITES[0], TEXTS)[SITES[0]]
    torch.testing.assert_close(steered, plain + (2.0 * direction).to("cuda", plain.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_topk_path_equals_dense_on_cuda(with_dead):
    sae = SAE(SAEConfig(d_in=64, d_sae=512, family="topk", k=16, auxk_k=24)).cuda()
    x = torch.randn(256, 64, device="cuda") * 2 + 1
    dead = torch.zeros(512, dtype=torch.bool, device="cuda")
    if with_dead:
        dead[::3] = True
    results = {}
    for sparse in (True, False):
        sae.zero_grad()
        sae.use_sparse_kernels = sparse
        out = sae(x, dead_mask=dead, host_sync=False)
        out.loss.backward()
        results[sparse] = (out, {n: p.grad.clone() for n, p in sae.named_parameters()})
    (fast, fast_grads), (slow, slow_grads) = results[True], results[False]
    assert fast.latent_indices is not None
    torch.testing.assert_close(fast.reconstruction, slow.reconstruction, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-4, atol=1e-4)
    for name, grad in slow_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_training_step_never_synchronises():
    from interplab.sae import parallel
    from interplab.sae.train import _new_run, _train_step

    cfg = TrainConfig(n_steps=10, device="cuda", precision="bf16", dead_after_tokens=512)
    run = _new_run("sae", SAE(SAEConfig(d_in=64, d_sae=512, family="topk", k=16)).cuda(), cfg)
    xs = [torch.randn(256, 64, device="cuda") for _ in range(6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = 0
        for step, x in enumerate(xs, 1):  # steps 3+ are past dead_free_until: the AuxK path runs too
            _train_step(run, x, step, cfg, tokens, x.shape[0], 1.0, parallel.Group.local())
            tokens += x.shape[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_training_matches_float32_quality_on_cuda():
    from tests.sae.test_train import SparseDictionary

    data = SparseDictionary()
    held_out = [x.cuda() for x in data.batches(4, seed=99)]
    fvu = {}
    for precision in ("float32", "bf16", "tf32"):
        cfg = TrainConfig(n_steps=300, lr=3e-3, progress=False, tensorboard=False, precision=precision, device="cuda")
        sae = train_sae(SAEConfig(d_in=32, d_sae=128, family="topk", k=4), data.batches(300), cfg)
        from interplab.sae import evaluate_sae

        fvu[precision] = evaluate_sae(sae, held_out).fvu
    assert fvu["float32"] < 0.3
    for precision in ("bf16", "tf32"):
        assert abs(fvu[precision] - fvu["float32"]) < 0.1 * fvu["float32"] + 0.01, fvu


@gpus(2)
def test_model_spread_over_two_gpus_captures_and_steers_like_one(tmp_path):
    tiny = tiny_model("llama")
    tiny.hf.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    one = interplab.load(str(tmp_path), device="cuda:0")
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
                  "model.norm": 1, "model.rotary_emb": 0, "lm_head": 1}
    two = interplab.load(str(tmp_path), device_map=device_map)
    a, b = (interplab.capture(m, SITES, TEXTS, logits=True) for m in (one, two))
    assert b[SITES[2]].device == torch.device("cuda:1")
    for site in SITES:
        torch.testing.assert_close(b[site].to("cuda:0"), a[site])
    sae = SAE(SAEConfig(d_in=32, d_sae=64, family="topk", k=6, site=SITES[1]))
    outputs = []
    for model in (one, two):
        with intervene(model, {SITES[1]: add_vector(torch.randn(32, generator=torch.Generator().manual_seed(0)), scale=3.0),
                               SITES[2]: clamp_feature(sae, 3, 2.0)}):
            outputs.append(interplab.capture(model, SITES[2], TEXTS, logits=True).logits.to("cuda:0"))
    torch.testing.assert_close(outputs[1], outputs[0])


@gpus(2)
@pytest.mark.slow
def test_two_rank_nccl_training_equals_one_process(tmp_path, tinystories, shared_dir):
    from interplab.sae.formats import load_sae
    from tests.sae import dist_worker
    from tests.sae.test_parallel import _assert_same_sae, _global_batches, _torchrun

    corpus = tmp_path / "stories.txt"
    corpus.write_text((shared_dir / "data" / "tinystories_sample.txt").read_text()[:60_000])
    done = _torchrun({"tasks": ["train"], "out": str(tmp_path / "out"), "corpus": str(corpus), "device": "cuda"}, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _, train_cfg, saes = dist_worker.settings(device="cuda")
    reference = train_sae(saes["sae_0"], _global_batches(tinystories, str(corpus))[dist_worker.SITES[0]], train_cfg)
    _assert_same_sae(load_sae(tmp_path / "out" / "train" / "sae").cuda(), reference)
    assert json.loads((tmp_path / "out" / "train" / "run.json").read_text())["world_size"] == 2
