"""The names a user needs for their own experiments are public, and behave."""

import subprocess
import sys

import pytest
import torch


def test_package_exports_the_helpers():
    import interplab.analysis as analysis
    import interplab.sae as sae
    import interplab.steering as steering

    for name in ("run_cells", "Target", "prepare", "PatchSetup", "capture_run", "final_logits"):
        assert name in analysis.__all__ and getattr(analysis, name)
    for name in ("l0", "dead_fraction", "mse"):
        assert name in sae.__all__ and callable(getattr(sae, name))
    for name in ("ab_positions", "caa_positions", "ab_prompts", "ab_scores"):
        assert name in steering.__all__ and callable(getattr(steering, name))


def test_types_are_importable_and_importing_the_package_stays_light():
    code = ("import sys, interplab; assert 'torch' not in sys.modules; "
            "from interplab.types import ModelLike, PositionsLike; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_l0_and_dead_fraction():
    from interplab.sae import dead_fraction, l0

    acts = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.5, 0.0, 0.0]])
    assert l0(acts) == pytest.approx(1.5)
    assert dead_fraction(acts) == pytest.approx(0.5)  # latents 0 and 2 never fire


def test_reuse_prefix_is_reachable_from_the_grids(llama):
    from interplab.analysis import patch_heads, patch_residual
    from tests.analysis.tiny_tasks import tiny_task

    task = tiny_task(n=2, changed=2)
    for grid_fn, kwargs in ((patch_residual, dict(layers=[1])), (patch_heads, dict(layers=[1]))):
        reused = grid_fn(llama, task, reuse_prefix=True, **kwargs)
        fresh = grid_fn(llama, task, reuse_prefix=False, **kwargs)
        torch.testing.assert_close(reused.values, fresh.values, atol=1e-5, rtol=1e-5)
