"""The run-time type-check pass (scripts/typecheck.sh: INTERPLAB_TYPECHECK=1, hook installed in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

TYPECHECK = os.environ.get("INTERPLAB_TYPECHECK", "") not in ("", "0")
needs_typecheck = pytest.mark.skipif(not TYPECHECK, reason="INTERPLAB_TYPECHECK is off (scripts/typecheck.sh "
                                                             "runs the fast suite with it on)")


def test_annotations_are_checked_when_the_pass_is_on():
    from interplab.toy.superposition import feature_norms

    W = torch.ones(2, 3)  # two dimensions where "instances features hidden" asks for three
    if not TYPECHECK:
        assert feature_norms(W).shape == (2,)  # unchecked: the wrong shape goes through
        pytest.skip("INTERPLAB_TYPECHECK is off (scripts/typecheck.sh runs the fast suite with it on)")
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError, match="feature_norms"):
        feature_norms(W)


@needs_typecheck
def test_a_dimension_named_twice_must_agree_and_dtypes_are_checked():
    from jaxtyping import TypeCheckError

    from interplab.sae.metrics import mse

    x = torch.randn(4, 3)
    assert mse(x, x) == 0.0  # the right shapes pass
    with pytest.raises(TypeCheckError, match="mse"):
        mse(x, torch.randn(5, 3))  # "n d" and "n d": n is 4 in one and 5 in the other
    with pytest.raises(TypeCheckError, match="mse"):
        mse(x.long(), x.long())  # Float annotations refuse integer tensors


@pytest.mark.wrong_types
def test_wrong_types_tests_are_skipped_only_under_the_checker():
    assert not TYPECHECK  # conftest skips this test when the checker is on
