"""`Shapes`: the parameter count a config implies, without loading weights, matches the model
transformers builds, for families with a spec and for decoders found by structure (gated MLPs)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmpress.arch import Shapes
from lmpress.arch.registry import is_supported
from tests.conftest import tiny_config

SIZES = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def _real(config: object) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["helium", "exaone4"])
def test_a_generic_gated_model_is_counted_from_its_discovered_linears(model_type: str) -> None:
    config = AutoConfig.for_model(model_type, **SIZES, **HEADS)
    assert not is_supported(model_type)  # no spec: found by structure
    s = Shapes.of(config.to_dict())
    q, kv, h, i = 64, 32, 64, 128  # 4 x 16 query, 2 x 16 key/value widths
    assert s.discovered == h * (q + 2 * kv) + q * h + 3 * h * i  # gate, up and down: three projections
    real = _real(config)
    assert s.params == pytest.approx(real, rel=5e-3)  # only the norms' weights are not counted


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_family_with_a_spec_is_counted_from_its_sizes(arch: str) -> None:
    config = tiny_config(arch, 512)
    s = Shapes.of(config.to_dict())
    assert s.discovered is None
    assert s.params == pytest.approx(_real(config), rel=0.02)  # norms and biases aside
