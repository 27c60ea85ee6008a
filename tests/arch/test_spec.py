"""Every family's spec matches the modules transformers builds for it, and a new family is one file."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lmpress.arch import Adapter, is_conv1d, linear_weight, registry, spec_for, specs, supporting
from lmpress.arch.spec import group_order
from lmpress.quant.awq import fold_scales
from tests.conftest import TINY_ARCHS, tiny_config


def computes(norm: nn.Module, kind: str) -> bool:
    """The norm computes what its declared kind says (checked with random weights, on a copy)."""
    import copy

    norm = copy.deepcopy(norm).float()
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
        x = torch.randn(3, norm.weight.shape[0])
        eps = float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-6)
        if kind == "layernorm":
            bias = norm.bias if getattr(norm, "bias", None) is not None else 0
            want = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
            want = want * norm.weight + bias
        else:
            gain = norm.weight + 1 if kind == "rmsnorm_1p" else norm.weight
            want = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * gain
        return torch.allclose(norm(x), want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(request.param, 256))


def test_spec_names_every_linear_and_norm_of_a_block(tiny: nn.Module) -> None:
    """No linear or norm of a block is left without a role, and each norm is of its declared kind."""
    a = Adapter(tiny)
    found = set()
    for block in a.blocks():  # a hybrid family's blocks have only their own kind's optional linears
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
        assert linears == {p for p in a.spec.linears if p not in a.spec.optional_linears or p in linears}
        found |= linears
    assert found == set(a.spec.linears)
    block = a.blocks()[0]
    norms = {n for n, m in block.named_modules() if "Norm" in type(m).__name__}
    assert norms == {n.path for n in a.spec.norms if not n.optional or n.path in norms}
    for name, module in a.block_norms(0).items():
        kind = a.norm_kind(name)
        assert kind is not None and computes(module, kind), (name, kind)
    assert a.norm_kind(a.final_norm()[0]) == a.spec.final_norm.kind
    assert computes(a.final_norm()[1], a.spec.final_norm.kind)
    roles = a.linear_roles(1)
    assert len(roles) == len(a.block_linears(1)) and all(n.startswith(a.block_name(1) + ".") for n in roles)
    for name, role in roles.items():
        assert a.role_name(1, role) == name and a.role(1, role) is tiny.get_submodule(name)


def test_spec_config_keys_and_widths(tiny: nn.Module) -> None:
    a = Adapter(tiny)
    config = tiny.config
    mlp_out = linear_weight(tiny.get_submodule(f"{a.block_name(0)}.{a.spec.mlp[-1]}"))
    assert mlp_out.shape[1] == (getattr(config, a.spec.mlp_width_key, None) or 4 * config.hidden_size)
    assert a.spec.gated == (len(a.spec.mlp) == 3 or a.spec.gate_up)  # Phi-3: gate and up fused
    assert a.embedding_roles()[a.spec.token_embedding()] == "token_embd"
    assert tiny.get_submodule(a.spec.token_embedding()) is tiny.get_input_embeddings()


def test_supported_lists() -> None:
    assert registry.supported_architectures() == sorted(specs())
    assert set(TINY_ARCHS) <= set(specs())
    assert supporting("onnx") == [
        *("gemma", "gemma2", "gemma3_text", "gpt2", "granite", "llama", "ministral", "mistral"),
        *("olmo2", "olmo3", "qwen2", "qwen3", "smollm3", "stablelm", "starcoder2"),
    ]
    assert supporting("hidden_prunable") == ["granite", "llama", "ministral", "mistral", "qwen2", "qwen3", "smollm3"]
    assert spec_for("gpt_neox").gguf is not None and spec_for("gpt_neox").gguf.arch == "gptneox"
    assert spec_for("opt").gguf is None


def test_gguf_row_orders() -> None:
    """Llama q/k rows interleave the rotary halves per head; NeoX's per-head q/k/v regroup."""

    class Cfg:
        num_attention_heads = 2
        num_key_value_heads = 1

    perm = spec_for("llama").gguf_row_order("attn_q", 8, Cfg())
    assert perm is not None and perm.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert spec_for("qwen2").gguf_row_order("attn_q", 8, Cfg()) is None
    perm = spec_for("gpt_neox").gguf_row_order("attn_qkv", 12, Cfg())
    assert perm is not None and perm.tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
    # fewer key/value groups than heads (Falcon's layout): per group [q q | k | v], heads of 2 rows
    assert group_order(16, 4, 2).tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]

    class GPTJ:  # two heads of 8, the first 4 dimensions of each rotary: neighbouring pairs -> halves
        n_embd, n_head, rotary_dim = 16, 2, 4

    perm = spec_for("gptj").gguf_row_order("attn_k", 16, GPTJ())
    assert perm is not None and perm.tolist() == [0, 2, 1, 3, 4, 5, 6, 7, 8, 10, 9, 11, 12, 13, 14, 15]
    assert spec_for("gptj").gguf_row_order("attn_v", 16, GPTJ()) is None


def test_fold_into_a_one_plus_w_norm_keeps_the_function() -> None:
    """A scale folded into a norm that multiplies by 1 + w (Gemma) leaves the block's output as it was."""
    torch.manual_seed(0)
    width = 8
    w = torch.randn(width) * 0.1
    lin = nn.Linear(width, 4, bias=False)
    x = torch.randn(5, width)
    x_hat = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    class OnePlusNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(w.clone())

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return (1 + self.weight) * t

    norm = OnePlusNorm()
    before = lin(norm(x_hat)).detach()
    sc = torch.rand(width) + 0.5
    with torch.no_grad():
        fold_scales(norm, {"lin": lin}, sc, "rmsnorm_1p")
    torch.testing.assert_close(lin(norm(x_hat)).detach(), before, atol=1e-5, rtol=1e-5)


def test_a_parallel_block_folds_into_the_norm_both_sublayers_read() -> None:
    """StableLM with a parallel residual: one norm feeds attention and MLP, so its scale group takes
    q, k, v, gate and up, the absent second norm has none, and folding keeps the model's function."""
    torch.manual_seed(0)
    config = tiny_config("stablelm", 256)
    config.use_parallel_residual = True
    model = AutoModelForCausalLM.from_config(config).eval()
    a = Adapter(model)
    groups = {name.split(".", 3)[-1]: set(linears) for name, _, linears in a.scale_groups(0)}
    assert "post_attention_layernorm" not in groups
    reads = {n.rsplit(".", 1)[-1] for n in groups["input_layernorm"]}
    assert reads == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for i in range(a.num_blocks):
            for name, prev, linears in a.scale_groups(i):
                width = linear_weight(next(iter(linears.values()))).shape[1]
                fold_scales(prev, linears, torch.rand(width) + 0.5, a.norm_kind(name))
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_a_new_family_is_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module dropped into the families package is found by every consumer, with no other edit."""
    from lmpress.arch import families

    (tmp_path / "tinyfam.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import replace
            from lmpress.arch.families.llama import LLAMA
            SPECS = (replace(LLAMA, model_types=("tinyfam",), gguf=None, onnx=None),)
            """
        )
    )
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    registry.specs.cache_clear()
    try:
        assert registry.is_supported("tinyfam") and spec_for("tinyfam").blocks == "model.layers"
        model = AutoModelForCausalLM.from_config(tiny_config("llama", 256))
        model.config.model_type = "tinyfam"
        assert len(Adapter(model).linears()) == 14
    finally:
        monkeypatch.undo()
        registry.specs.cache_clear()
        sys.modules.pop("lmpress.arch.families.tinyfam", None)
    assert not registry.is_supported("tinyfam")


def test_smollm3_layers_without_rope_llama_cpp_would_rotate_are_refused() -> None:
    """llama.cpp's smollm3 skips rope on every fourth layer only; another pattern is refused."""
    from lmpress.errors import ExportError

    config = tiny_config("smollm3", 256)
    gguf = spec_for("smollm3").gguf
    assert gguf is not None and "smollm3.block_count" in gguf.metadata(config, 256)
    config.no_rope_layers = [1, 0]
    with pytest.raises(ExportError, match="every fourth layer"):
        gguf.metadata(config, 256)


def test_ministral_sliding_window_is_the_gguf_context() -> None:
    """llama.cpp's llama attends over its whole context: a window shorter than the context becomes it."""
    config = tiny_config("ministral", 256)
    gguf = spec_for("ministral").gguf
    assert gguf is not None and gguf.metadata(config, 256)["llama.context_length"].value == 512
    config.sliding_window = 128
    assert gguf.metadata(config, 256)["llama.context_length"].value == 128
    config.layer_types = ["full_attention", "full_attention"]
    assert gguf.metadata(config, 256)["llama.context_length"].value == 512
