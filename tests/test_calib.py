"""The calibration driver reproduces the model's own forward block by block, on every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpress.arch import Adapter
from lmpress.calib import InputStats, SquareNorm, blockwise, collect
from tests.conftest import TINY_ARCHS, tiny_config


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_blockwise_outputs_match_the_model(arch: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 300)).eval()
    windows = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=windows, output_hidden_states=True).hidden_states
    seen = []
    for i, _block, inputs in blockwise(model, windows, batch_size=2):
        assert len(inputs.hidden) == 3 and inputs.n_tokens == 5 * 24
        torch.testing.assert_close(torch.cat(inputs.hidden), expected[i], rtol=1e-4, atol=1e-5)
        seen.append(i)
    assert seen == [0, 1]
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0  # every hook removed


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "cohere2"])
def test_each_layer_type_runs_with_its_own_mask(arch: str) -> None:
    """Sliding-window and full layers (Gemma 3's each with its own rotary base): each block runs with
    its own type's mask and rotary, so on windows longer than the window every block's inputs are
    still the model's hidden states."""
    torch.manual_seed(0)
    config = tiny_config(arch, 300)
    config.num_hidden_layers = 3
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    model = AutoModelForCausalLM.from_config(config).eval()
    windows = torch.randint(0, 300, (3, 2 * config.sliding_window), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=windows, output_hidden_states=True).hidden_states
    for i, _block, inputs in blockwise(model, windows, batch_size=2):
        torch.testing.assert_close(torch.cat(inputs.hidden), expected[i], rtol=1e-4, atol=1e-5)
    assert model.config.layer_types[0] == "sliding_attention"  # relabelled only while capturing


def test_input_stats_match_direct_formulas() -> None:
    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 5, 8), torch.randn(3, 8)
    h, sq = InputStats.empty(8, torch.device("cpu")), SquareNorm.empty(8, torch.device("cpu"))
    for x in (x1, x2):
        h.update(x)
        sq.update(x)
    x = torch.cat([x1.reshape(-1, 8), x2])
    torch.testing.assert_close(h.H, 2 * x.T @ x / 13)
    torch.testing.assert_close(sq.mean_sq, x.pow(2).mean(0))
    torch.testing.assert_close(sq.abs_max, x.abs().amax(0))
    assert h.n_tokens == sq.n_tokens == 13


def test_collect_sees_every_linear_of_a_block() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 300)).eval()
    adapter = Adapter(model)
    windows = torch.randint(0, 300, (2, 16))
    for i, block, inputs in blockwise(model, windows):
        layers = adapter.block_linears(i)
        stats = collect(block, inputs, layers, lambda m: InputStats.empty(m.in_features, torch.device("cpu")))
        assert all(s.n_tokens == 32 for s in stats.values())


@pytest.mark.parametrize("width", [96, 1030, 2053])
def test_the_gram_of_a_wide_layer_in_pieces_is_the_whole_product(width: int) -> None:
    from lmpress.calib import add_gram

    torch.manual_seed(0)
    x = torch.randn(300, width)
    H = torch.randn(width, width)
    H = H + H.T
    want = H + 0.5 * x.T @ x
    add_gram(H, x, 0.5)
    torch.testing.assert_close(H, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(H, H.T)
