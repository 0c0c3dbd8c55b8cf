"""The run-time type-check pass (scripts/typecheck.sh: INTERPLAB_TYPECHECK=1, hook installed in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch


def test_annotations_are_checked_when_the_pass_is_on():
    from interplab.toy.superposition import feature_norms

    W = torch.ones(2, 3)  # two dimensions where "instances features hidden" asks for three
    if os.environ.get("INTERPLAB_TYPECHECK", "") in ("", "0"):
        assert feature_norms(W).shape == (2,)  # unchecked: the wrong shape goes through
        pytest.skip("INTERPLAB_TYPECHECK is off (scripts/typecheck.sh runs the fast suite with it on)")
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError, match="feature_norms"):
        feature_norms(W)
