"""Direct tests of `interplab.hooks`: output normalisation, absolute positions, fn dispatch,
early stop, and that a failed attach leaves no hook behind."""

import functools

import pytest
import torch

from interplab.hooks import (HookContext, HookSession, PositionTracker, StopForward, _with_context,
                             get_hidden, set_hidden)
from tests.helpers import BASELINE_HOOKS, hook_count, random_ids
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_hidden_state_of_tuple_and_tensor_outputs():
    h, extra = torch.ones(2, 3), torch.zeros(1)
    assert get_hidden((h, extra)) is h and get_hidden(h) is h
    new = torch.full((2, 3), 5.0)
    replaced = set_hidden((h, extra), new)
    assert isinstance(replaced, tuple) and replaced[0] is new and replaced[1] is extra
    assert set_hidden(h, new) is new


def test_tracker_positions_with_left_padding_and_cache():
    tracker = PositionTracker()
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    tracker.on_forward(None, (), {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask})
    assert tracker.positions.tolist() == [[-1, -1, 0, 1], [0, 1, 2, 3]]
    assert tracker.prompt_len.tolist() == [2, 4]
    # a generate() step: one new token, the mask grows by one, a cache position says it continues
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    tracker.on_forward(None, (), {"input_ids": torch.ones(2, 1, dtype=torch.long), "attention_mask": step_mask,
                                  "cache_position": torch.tensor([4])})
    assert tracker.positions.tolist() == [[2], [4]]
    assert tracker.prompt_len.tolist() == [2, 4]  # still the prompt's length


def test_tracker_sees_a_new_prompt_and_a_cacheless_continuation():
    tracker = PositionTracker()
    first = torch.tensor([[5, 6, 7]])
    tracker.on_forward(None, (first,), {})
    assert tracker.positions.tolist() == [[0, 1, 2]] and tracker.prompt_len.tolist() == [3]
    # without a cache, generate() re-runs the whole sequence: it starts with the previous input
    tracker.on_forward(None, (torch.tensor([[5, 6, 7, 8]]),), {})
    assert tracker.prompt_len.tolist() == [3]
    # an unrelated input is a new prompt
    tracker.on_forward(None, (torch.tensor([[9, 9]]),), {})
    assert tracker.prompt_len.tolist() == [2]
    tracker.reset()
    assert tracker.positions is None and tracker.prompt_len is None


def test_context_falls_back_to_plain_positions(model):
    ctx = HookContext(model.site("blocks.0.hook_resid_post"), model, PositionTracker())
    act = torch.zeros(2, 3, 32)
    assert ctx.positions(act).tolist() == [[0, 1, 2]] * 2
    assert ctx.prompt_len(act).tolist() == [3, 3]
    assert ctx.mask(act, -1).tolist() == [[False, False, True]] * 2


class _Callable:
    def __call__(self, act, ctx):
        return ctx


@pytest.mark.parametrize("fn, gets_context", [
    (lambda act: "ctx-less", False),
    (lambda act, scale=2.0: scale, False),  # a default is not a place for the context
    (lambda act, ctx: ctx, True),
    (lambda act, ctx, scale=2.0: ctx, True),
    (lambda *args: args[-1], True),
    (_Callable(), True),
    (functools.partial(lambda k, act, ctx: ctx, 1), True),
    (functools.partial(lambda act, ctx: "ctx-less", ctx=None), False),
])
def test_fn_dispatch_counts_required_positional_parameters(fn, gets_context):
    result = _with_context(fn)("act", "CTX")
    assert (result == "CTX") is gets_context


def test_site_fn_sees_and_replaces_the_activation(model):
    ids = random_ids()
    seen, next_input = [], []

    def double(act, ctx):
        seen.append((ctx.site.name, tuple(act.shape)))
        return act * 2

    def record(act):
        next_input.append(act)

    def run(fns):
        session = HookSession(model, fns).attach()
        try:
            with torch.no_grad():
                model.hf(input_ids=ids)
        finally:
            session.remove()

    post, pre = model.site("blocks.1.hook_resid_post"), model.site("blocks.2.hook_resid_pre")
    run({post: [record]})
    run({post: [double, lambda act: act + 1], pre: [record]})
    assert seen == [("blocks.1.hook_resid_post", (2, 7, 32))]
    torch.testing.assert_close(next_input[1], next_input[0] * 2 + 1)  # the next block got the new one
    assert hook_count(model) == BASELINE_HOOKS["llama"]


def test_stop_after_ends_the_forward_pass_at_that_site(model):
    reached = []
    sites = {model.site("blocks.0.hook_resid_post"): [lambda act: reached.append(0)],
             model.site("blocks.2.hook_resid_post"): [lambda act: reached.append(2)]}
    session = HookSession(model, sites, stop_after=model.site("blocks.0.hook_resid_post")).attach()
    try:
        with pytest.raises(StopForward), torch.no_grad():
            model.hf(input_ids=random_ids())
    finally:
        session.remove()
    assert reached == [0]


class _FailsOnThirdSite(HookSession):
    def _attach_site(self, site):
        if len(self._handles) >= 3:
            raise RuntimeError("module missing")
        super()._attach_site(site)


def test_an_attach_that_fails_half_way_leaves_no_hooks(model):
    before = hook_count(model)
    sites = {model.site(f"blocks.{i}.hook_resid_post"): [lambda act: act] for i in range(3)}
    session = _FailsOnThirdSite(model, sites)
    with pytest.raises(RuntimeError, match="module missing"):
        session.attach()
    assert hook_count(model) == before and not session.attached


def test_attach_twice_is_refused_and_remove_is_idempotent(model):
    session = HookSession(model, {model.site("hook_embed"): [lambda act: act]}).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        session.attach()
    session.remove()
    session.remove()
    assert hook_count(model) == BASELINE_HOOKS["llama"]
