import pytest
import torch

from interplab import capture
from interplab.analysis import direct_logit_attribution, final_norm, lens_logits, logit_lens
from interplab.analysis.tasks import Task
from tests.analysis.tiny_tasks import tiny_task
from tests.tiny import tiny_model

TEXTS = ["w4 w5 w6 w7 w8", "w9 w10 w11"]

DECOMPOSABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neo", "gpt_neox")


def test_logit_lens_at_the_last_layer_equals_the_models_logits(any_model):
    last = f"blocks.{any_model.n_layers - 1}.hook_resid_post"
    cache = capture(any_model, last, TEXTS, logits=True)
    torch.testing.assert_close(lens_logits(any_model, cache[last]), cache.logits, atol=1e-5, rtol=1e-5)
    result = logit_lens(any_model, TEXTS, answer="w5", top_k=3)
    assert result.rows[0] == "embed" and result.rows[-1] == f"L{any_model.n_layers - 1}"
    assert result.top_ids.shape == (2, any_model.n_layers + 1, 5, 3)
    answer = any_model.tokenizer.convert_tokens_to_ids("w5")
    for b, n in enumerate((5, 3)):
        top = cache.logits[b, :n].topk(3)
        assert torch.equal(result.top_ids[b, -1, :n], top.indices)
        probs = cache.logits[b, :n].softmax(-1)
        log_probs = cache.logits[b, :n].float().log_softmax(-1)
        torch.testing.assert_close(result.answer_log_prob[b, -1, :n], log_probs[:, answer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.top_log_probs[b, -1, :n], log_probs.topk(3).values, atol=1e-5, rtol=1e-4)
        assert torch.equal(result.answer_rank[b, -1, :n], (probs > probs[:, answer:answer + 1]).sum(-1))


def test_lens_keeps_probabilities_that_float32_would_round_to_zero():
    model = tiny_model("llama", seed=7)  # a private copy: its unembedding is sharpened below
    with torch.no_grad():
        model.unembed.weight.mul_(300.0)
    result = logit_lens(model, TEXTS, answer="w5", top_k=3)
    values = result.answer_log_prob[0]  # (rows, seq): every layer, every position of prompt 0
    assert torch.isfinite(values).all()
    assert float(values.min()) < -110  # exp() of this is 0 in float32: a probability would say 0
    assert float(values.min().exp()) == 0.0
    last = f"blocks.{model.n_layers - 1}.hook_resid_post"
    cache = capture(model, last, TEXTS[0], logits=True)
    answer = model.tokenizer.convert_tokens_to_ids("w5")
    torch.testing.assert_close(values[-1], cache.logits[0].float().log_softmax(-1)[:, answer], atol=1e-3, rtol=1e-5)
    assert result.grid(0, "answer_log_prob").values.shape == (model.n_layers + 1, 5)


def test_lens_grid_and_annotations(llama):
    result = logit_lens(llama, TEXTS, answer=["w5", "w6"], top_k=2)
    grid = result.grid(1, "answer_rank")
    assert grid.values.shape == (4, 3) and grid.col_labels == ["0 w9", "1 w10", "2 w11"]
    answer = llama.tokenizer.convert_tokens_to_ids("w6")
    first = result.top_ids[1, :, :3, 0]
    assert torch.equal(result.answer_rank[1, :, :3] == 0, first == answer)
    table = result.top_token_table(1)
    assert len(table) == 4 and len(table[0]) == 3 and all(isinstance(t, str) for t in table[0])
    with pytest.raises(ValueError, match="is 2 tokens"):
        logit_lens(llama, TEXTS, answer="w5 w6")
    with pytest.raises(ValueError, match="one per prompt"):
        logit_lens(llama, TEXTS, answer=["w5"])


@pytest.mark.parametrize("arch", DECOMPOSABLE)
def test_direct_logit_attribution_adds_up_to_the_logit_difference(arch):
    model = tiny_model(arch)
    task = tiny_task(n=3)
    dla = direct_logit_attribution(model, task)
    assert dla.total == pytest.approx(dla.readout, abs=1e-4)
    assert dla.heads.shape == (model.n_layers, model.n_heads) and dla.mlps.shape == (model.n_layers,)
    enc = task.encode(model)
    cache = capture(model, "ln_final.hook_normalized", list(task.clean), logits=True)
    rows, last = torch.arange(3), enc.last("clean")
    own = cache.logits[rows, last, enc.correct] - cache.logits[rows, last, enc.incorrect]
    assert dla.readout == pytest.approx(float(own.mean()), abs=1e-4)
    per_prompt = dla.per_prompt
    total = per_prompt["heads"].sum((1, 2)) + per_prompt["mlps"].sum(1) + per_prompt["embed"] + per_prompt["biases"]
    torch.testing.assert_close(total, own, atol=1e-4, rtol=1e-4)
    assert dla.grid().values.shape == (model.n_layers, model.n_heads + 1)


def test_dla_head_term_is_the_frozen_norm_readout_of_that_head(llama):
    task = tiny_task(n=2)
    dla = direct_logit_attribution(llama, task)
    enc = task.encode(llama)
    last = enc.last("clean")
    cache = capture(llama, ["blocks.1.attn.hook_z", "blocks.2.hook_resid_post"], list(task.clean))
    z = cache["blocks.1.attn.hook_z"][torch.arange(2), last, 3]  # (batch, d_head)
    w_o = llama.block(1).self_attn.o_proj.weight[:, 3 * 8:4 * 8]  # (d_model, d_head)
    head_out = z @ w_o.T
    final = cache["blocks.2.hook_resid_post"][torch.arange(2), last]
    norm = final_norm(llama)
    scale = (final.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    w_u = llama.unembed.weight
    expected = ((head_out * norm.gain / scale) * (w_u[enc.correct] - w_u[enc.incorrect])).sum(-1)
    torch.testing.assert_close(dla.per_prompt["heads"][:, 1, 3], expected.detach(), atol=1e-5, rtol=1e-4)


def test_dla_without_incorrect_answers_attributes_the_answer_logit(llama):
    task = Task(clean=["w4 w5 w6"], correct=["w7"], metric="prob")
    dla = direct_logit_attribution(llama, task)
    cache = capture(llama, "ln_final.hook_normalized", "w4 w5 w6", logits=True)
    assert dla.readout == pytest.approx(float(cache.logits[0, -1, llama.tokenizer.convert_tokens_to_ids("w7")]), abs=1e-4)
    assert dla.total == pytest.approx(dla.readout, abs=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "olmo2"])
def test_dla_refuses_post_norm_architectures(arch):
    with pytest.raises(ValueError, match="normalises attention/MLP outputs"):
        direct_logit_attribution(tiny_model(arch), tiny_task())
