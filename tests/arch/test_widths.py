"""Cutting attention units keeps every tensor that spans the heads consistent with them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpress.arch import Adapter, linear_weight
from lmpress.arch.widths import attention_counts, keep_attention_units, uniform_config_update, unit_heads
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


def test_q_k_norms_with_a_weight_row_per_head_lose_the_removed_heads() -> None:
    """Cohere's q/k LayerNorms hold one weight row per head: cutting a unit keeps the rows of the
    kept heads, and the cut model computes what the whole one does without the removed heads."""
    torch.manual_seed(0)
    config = tiny_config("cohere", 256)
    config.use_qk_norm = True
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_norm" in name:
                p.copy_(torch.randn_like(p))
    a = Adapter(model)
    q_norm = a.role(0, "attn_q_norm").weight.detach().clone()  # (4 heads, 16)
    k_norm = a.role(0, "attn_k_norm").weight.detach().clone()  # (2 key/value heads, 16)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        for i in range(a.num_blocks):  # the whole model without unit 0's heads: their output columns zeroed
            a.role(i, "attn_output").weight[:, :32] = 0
        want = model(ids).logits
        for i in range(a.num_blocks):
            keep_attention_units(a, i, [1])  # the second key/value head and its two query heads
        assert torch.equal(a.role(0, "attn_q_norm").weight, q_norm[2:])
        assert torch.equal(a.role(0, "attn_k_norm").weight, k_norm[1:])
        torch.testing.assert_close(model(ids).logits, want)


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "gpt_neox", "llama"])
def test_fused_and_separate_qkv_lose_the_rows_of_the_removed_unit(arch: str) -> None:
    """Phi-3's [q | k | v] with grouped-query widths, GPT-2's [q | k | v], GPT-NeoX's per-head
    triples, Llama's separate projections: the cut model computes what the whole one does with the
    removed unit's output columns zeroed (exactly the rows of the kept heads stay), and a Phi-3 block
    splits its fused rows by heads of its own while the model's config keeps its count."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 256)).eval()
    a = Adapter(model)
    n_q, n_kv = attention_counts(a, 0)
    removed = unit_heads(a, 0)[0]
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        out = linear_weight(a.role(0, "attn_output"))  # (hidden, heads x head_dim)
        for h in removed:
            out[:, h * 16 : (h + 1) * 16] = 0
        want = model(ids).logits
        keep_attention_units(a, 0, list(range(1, n_kv)))
        assert attention_counts(a, 0) == (n_q - len(removed), n_kv - 1)
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-6)
    assert model.config.num_attention_heads == n_q  # block 0 alone changed
