"""Architecture adapters find the same parts in every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpress.arch import Adapter, is_conv1d, linear_weight
from lmpress.errors import ModelLoadError
from tests.conftest import TINY_ARCHS, tiny_config

EXPECTED_LINEARS = {
    "llama": 7,
    "mistral": 7,
    "qwen2": 7,
    "gpt2": 4,
    "opt": 6,
    "gpt_neox": 4,
    "phi": 6,
    "gemma": 7,
    "qwen3": 7,
    "smollm3": 7,
    "olmo2": 7,
    "olmo3": 7,
    "granite": 7,
    "ministral": 7,
    "gemma2": 7,
    "gemma3_text": 7,
    "starcoder2": 6,
    "stablelm": 7,
    "phi3": 4,  # fused qkv and gate_up
    "lfm2": 7,  # block 1 attends; block 0 convolves: in, out and the MLP's three
    "gptj": 6,
    "cohere": 7,
    "cohere2": 7,
    "gpt_bigcode": 4,
    "falcon": 4,
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_adapter_finds_parts(arch: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 256))
    a = Adapter(model)
    assert a.num_blocks == 2
    linears = a.block_linears(1)
    assert len(linears) == EXPECTED_LINEARS[arch]
    assert all(name.startswith(a.block_name(1)) for name in linears)
    for m in linears.values():
        w = linear_weight(m)
        assert w.ndim == 2 and 64 in w.shape
        assert is_conv1d(m) == (arch == "gpt2")
    # (out, in): feeding x of width in through the module matches x @ w.T (+ bias)
    first = next(iter(a.block_linears(0).values()))
    w = linear_weight(first)
    x = torch.randn(3, w.shape[1])
    bias = first.bias if first.bias is not None else 0
    torch.testing.assert_close(first(x), x @ w.T + bias)
    assert a.head()[1] is model.get_output_embeddings()
    assert model.get_input_embeddings() in a.embeddings().values()
    assert 0 < a.non_embedding_parameters() < sum(p.numel() for p in model.parameters())
    assert len(a.linears()) == {"lfm2": 12}.get(arch, 2 * EXPECTED_LINEARS[arch])


def test_unknown_architecture_is_a_clear_error() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(
        ModelLoadError,
        match="unknown architecture None.*supports: cohere, cohere2, falcon, gemma, gemma2, gemma3_text, gpt2,",
    ):
        Adapter(model)
