import dataclasses

import pytest
import torch
from torch import nn

from interplab.models.arch import ARCHITECTURES, Architecture, guess_architecture, resolve_architecture
from tests.tiny import arch_params, tiny_model

REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
            "gpt2", "gpt_neo", "gpt_neox"}


def test_table_covers_required_families():
    assert REQUIRED <= set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", arch_params())
def test_table_paths_exist_in_real_hf_classes(model_type):
    model = tiny_model(model_type)
    assert model.arch.model_type == model_type
    assert model.n_layers == 3 and model.d_model == 32 and model.n_heads == 4
    assert model.d_head == 8 and model.d_mlp == 64


def test_gpt_neox_parallel_flag_follows_config():
    model = tiny_model("gpt_neox")
    assert model.arch.parallel is True
    model.hf.config.use_parallel_residual = False
    try:
        assert resolve_architecture(model.hf).parallel is False
    finally:
        model.hf.config.use_parallel_residual = True


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_guess_matches_table_for_known_layouts(model_type):
    hf = tiny_model(model_type).hf
    guess = guess_architecture(hf)
    table = ARCHITECTURES[model_type]
    for field in ("blocks", "attn", "mlp", "ln_final"):
        assert getattr(guess, field) == getattr(table, field)


def test_unknown_unguessable_model_names_the_override():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "weird", "num_hidden_layers": 2})()
            self.stack = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    with pytest.raises(ValueError, match=r"architecture=Architecture\(model_type='weird'"):
        resolve_architecture(Weird())


def test_wrong_override_path_is_reported():
    hf = tiny_model("llama").hf
    bad = dataclasses.replace(ARCHITECTURES["llama"], attn_o="self_attn.nope")
    with pytest.raises(ValueError, match="no submodule 'self_attn.nope'"):
        resolve_architecture(hf, bad)
