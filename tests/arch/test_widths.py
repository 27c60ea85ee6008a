"""Cutting attention units keeps every tensor that spans the heads consistent with them."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from lmpress.arch import Adapter
from lmpress.arch.widths import keep_attention_units, uniform_config_update
from tests.conftest import tiny_config


def test_q_k_norms_over_the_whole_projection_lose_the_removed_heads() -> None:
    """OLMo 2's q/k norms span all heads: they keep the rows of the kept heads, and the cut model
    is the model a config with fewer heads builds (loads strictly, same logits)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("olmo2", 256)).eval()
    a = Adapter(model)
    q_norm = a.role(0, "attn_q_norm").weight.detach().clone()
    for i in range(a.num_blocks):
        keep_attention_units(a, i, [1])  # the second key/value head and its two query heads
    assert torch.equal(a.role(0, "attn_q_norm").weight, q_norm[32:])
    assert a.role(0, "attn_k_norm").weight.shape == (16,)
    assert uniform_config_update(model) and model.config.num_attention_heads == 2
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
