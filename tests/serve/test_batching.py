"""The batched loop: greedy rows give the same text alone or batched with differently-steered rows,
unsteered rows are untouched, rows finish and cancel on their own."""

from __future__ import annotations

import pytest
import torch

from interplab.interventions import add_vector
from interplab.serve.batching import Row, Sampling, run_batch
from interplab.serve.rows import RowTable
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")

LLAMA_PROMPTS = ["the cat sat on the mat", "a dog", "the weather is hot . the cat", "cold"]
TS_PROMPTS = ["Once upon a time", "The little dog was very", "Lily and Tom went to the park. They", "Sam"]


def _rows(model, prompts, steerings, n=12):
    rows = []
    for prompt, steering in zip(prompts, steerings):
        ids = model.tokenizer(prompt)["input_ids"]
        edits = {}
        if steering is not None:
            layer, seed, scale, positions = steering
            v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed))
            site = model.site(f"blocks.{layer}.hook_resid_post")
            fn = add_vector(v, scale=scale, positions=positions)
            fn.bind(site, model)
            edits = {site: [fn]}
        rows.append(Row(ids, Sampling(n, temperature=0), edits=edits))
    return rows


STEERINGS = [None, (0, 1, 4.0, "all"), (1, 2, -6.0, "generated"), (0, 3, 8.0, "prompt")]


@pytest.mark.parametrize("which", ["llama", pytest.param("tinystories", marks=pytest.mark.slow)])
def test_greedy_rows_batched_equal_alone(which, request):
    model = tiny_model("llama") if which == "llama" else request.getfixturevalue("tinystories")
    prompts = LLAMA_PROMPTS if which == "llama" else TS_PROMPTS
    alone = []
    for prompt, steering in zip(prompts, STEERINGS):
        [row] = _rows(model, [prompt], [steering])
        run_batch(model, [row])
        alone.append(row.generated)
    batched = _rows(model, prompts, STEERINGS)
    run_batch(model, batched)
    assert [r.generated for r in batched] == alone
    # the steering really changed something, and the unsteered row equals an unsteered batch
    plain = _rows(model, prompts, [None] * 4)
    run_batch(model, plain)
    assert plain[0].generated == batched[0].generated
    assert sum(p.generated != b.generated for p, b in zip(plain[1:], batched[1:])) >= 2


@pytest.mark.slow
def test_unsteered_rows_match_library_generate(tinystories):
    import interplab

    rows = _rows(tinystories, TS_PROMPTS, STEERINGS, n=20)
    run_batch(tinystories, rows)
    expected = interplab.generate(tinystories, TS_PROMPTS[0], max_new_tokens=20, chat=False)[0]
    assert rows[0].text == expected


def test_row_table_leaves_rows_without_edits_bitwise_untouched(llama):
    site = llama.site("blocks.1.hook_resid_post")
    v = torch.randn(llama.d_model)
    fn = add_vector(v, scale=3.0)
    fn.bind(site, llama)
    table = RowTable([{}, {site: [fn]}, {}], [4, 4, 4])
    act = torch.randn(3, 4, llama.d_model)

    class Ctx:
        model = llama

        def positions(self, a):
            return torch.arange(4).expand(3, 4)

    out = table.site_fns()[site.name](act, Ctx())
    assert torch.equal(out[0], act[0]) and torch.equal(out[2], act[2])
    torch.testing.assert_close(out[1], act[1] + 3.0 * v)


@pytest.mark.slow
def test_rows_finish_on_their_own_and_cancelled_rows_leave(tinystories):
    rows = _rows(tinystories, TS_PROMPTS[:3], [None] * 3, n=20)
    rows[0].sampling = Sampling(3, temperature=0)
    seen = []

    def cancel_after_two(text):
        seen.append(text)
        if len(seen) == 2:
            rows[1].cancelled = True

    rows[1].on_text = cancel_after_two
    run_batch(tinystories, rows)
    assert len(rows[0].generated) == 3 and rows[0].finish_reason == "length"
    assert rows[1].finish_reason == "cancelled" and len(rows[1].generated) <= 4
    [alone] = _rows(tinystories, TS_PROMPTS[2:3], [None], n=20)
    run_batch(tinystories, [alone])
    assert rows[2].generated == alone.generated


@pytest.mark.slow
def test_stop_strings_end_the_row_and_are_never_streamed(tinystories):
    [probe] = _rows(tinystories, ["Once upon a time"], [None], n=30)
    run_batch(tinystories, [probe])
    stop = probe.text.split()[4]
    [row] = _rows(tinystories, ["Once upon a time"], [None], n=30)
    row.sampling = Sampling(30, temperature=0, stop=(stop,))
    pieces = []
    row.on_text = pieces.append
    run_batch(tinystories, [row])
    assert row.text == probe.text[:probe.text.index(stop)]
    assert "".join(pieces) == row.text and row.finish_reason == "stop"


def test_notebook_views_render_html(llama, tmp_path):
    """The lens result and the feature card render inline in Jupyter (`_repr_html_`)."""
    from interplab.analysis.lens import logit_lens
    from interplab.sae.card import feature_card
    from interplab.sae.config import SAEConfig
    from interplab.sae.features import build_feature_index
    from interplab.sae.model import SAE

    lens = logit_lens(llama, "the cat sat on the mat", top_k=2)
    page = lens._repr_html_()
    assert page.count("<tr>") == 1 + len(lens.rows)
    assert f">{lens.top_tokens[0][-1][0][0]}<" in page  # the last block's guess at the first token
    sae = SAE(SAEConfig(d_in=32, d_sae=16, family="topk", k=4, site="blocks.1.hook_resid_post"),
              generator=torch.Generator().manual_seed(0))
    windows = torch.randint(4, 96, (12, 10), generator=torch.Generator().manual_seed(0))
    with build_feature_index(llama, sae, windows, tmp_path / "f.db", n_top=3, n_bins=4) as index:
        feature = max(range(16), key=lambda f: index.summary(f).fire_count)
        card = feature_card(index, feature)
    assert card._repr_html_().startswith("<iframe srcdoc=")
    assert f"Feature {feature}" in card.html and "rgba(255, 120, 0" in card.html


def test_caa_positions_follow_each_rows_own_prompt_in_a_batch():
    """positions "caa" find the chat template's assistant header in each row's own prompt: batched
    rows of different lengths (one dropped early) steer exactly where the library does alone."""
    from interplab.generation import format_prompt
    from interplab.steering.vector import caa_positions
    from tests.steering.test_vector import _chat_llama

    model = _chat_llama()
    site = model.site("blocks.1.hook_resid_post")
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(5))
    caa = caa_positions(model)
    prompts = [format_prompt(model, p) for p in ("w10", "w10 w11 w12 w13", "w7 w8")]
    lengths = [3, 8, 6]                     # row 0 finishes first and leaves the batch

    def rows(steer: bool):
        out = []
        for prompt, n in zip(prompts, lengths):
            ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            edits = {}
            if steer:
                fn = add_vector(v, scale=6.0, positions=caa)
                fn.bind(site, model)
                edits = {site: [fn]}
            out.append(Row(ids, Sampling(n, temperature=0), edits=edits))
        return out

    batched = rows(True)
    run_batch(model, batched)
    alone = []
    for row in rows(True):
        run_batch(model, [row])
        alone.append(row.generated)
    assert [r.generated for r in batched] == alone
    plain = rows(False)
    run_batch(model, plain)
    assert any(p.generated != b.generated for p, b in zip(plain, batched))  # the edit did something
