"""Mixtures of experts (issue 32, first slice): the four families' experts described in their specs,
quantized by RTN and HQQ into the packed `QuantExperts` (exactly what the dense experts module
computes with its decoded weights, 4.5-5 bits a weight), saved and reloaded to identical logits;
routers kept in float; calibrated quantizers refused on experts in one line."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmpress.arch import Adapter, spec_for
from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.nn import LAYER_FORMATS, QuantExperts
from lmpress.pipeline import compress
from lmpress.quant.base import QuantError
from lmpress.quant.grid import quantize
from lmpress.quant.hqq import hqq_quantize

# not in TINY_ARCHS: structured pruning refuses experts, and no GGUF / ONNX export has them yet
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
EXPERTS = 4
MOE = {
    "qwen3_moe": {"num_experts": EXPERTS, "moe_intermediate_size": 32, "head_dim": 16},
    "qwen2_moe": {"num_experts": EXPERTS, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
    "mixtral": {"num_local_experts": EXPERTS, "intermediate_size": 32},
    "olmoe": {"num_experts": EXPERTS, "intermediate_size": 32},
}


def moe_config(arch: str, vocab: int):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig

    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "max_position_embeddings": 512}
    return AutoConfig.for_model(arch, **common, **small, **MOE[arch], num_experts_per_tok=2)


def moe_model(arch: str, vocab: int = 300) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(moe_config(arch, vocab)).eval()


@pytest.fixture
def moe_dir(tmp_path: Path, tokenizer) -> Callable[[str], Path]:  # type: ignore[no-untyped-def]
    def make(arch: str) -> Path:
        out = tmp_path / f"tiny-{arch}"
        moe_model(arch, len(tokenizer)).save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    return make


@pytest.fixture
def data(text_file: Path) -> DataOptions:
    return DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)


def _stage(method: str, **extra: object) -> dict[str, object]:
    return {"name": f"{method}-moe", "stages": [{"method": method, "bits": 4, "group_size": 32, **extra}]}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_the_spec_finds_each_blocks_experts_and_keeps_routers_in_float(arch: str) -> None:
    model = moe_model(arch)
    adapter = Adapter(model)
    spec = spec_for(arch).experts
    assert spec is not None and spec.fused and not spec.transposed
    assert list(adapter.experts(1)) == ["model.layers.1.mlp.experts"]
    module = adapter.experts(1)["model.layers.1.mlp.experts"]
    assert module.get_parameter(spec.gate_up).shape == (EXPERTS, 64, 64)  # (E, 2·I, H)
    assert module.get_parameter(spec.down).shape == (EXPERTS, 64, 32)  # (E, H, I)
    assert getattr(model.config, spec.count_key) == EXPERTS and getattr(model.config, spec.top_k_key) == 2
    floats = {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    if arch == "qwen2_moe":  # the shared expert's gate too; its linears are ordinary linears
        floats |= {"model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"}
        assert set(adapter.shared_expert_linears(0)) == {f"model.layers.0.{p}" for p in spec.shared}
        assert set(adapter.shared_expert_linears(0)) <= set(adapter.block_linears(0))
    assert adapter.float_modules() == floats


def _packed(module: torch.nn.Module, symmetric: bool = False, hqq: bool = False) -> QuantExperts:
    """A `QuantExperts` of a dense experts module, every expert matrix W4 g32."""
    parts = {}
    for p, name in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
        w = module.get_parameter(name).detach()
        parts[p] = [hqq_quantize(m, 4, 32) if hqq else quantize(m, 4, 32, symmetric) for m in w]
    return QuantExperts.from_quantized(parts, symmetric, "silu", float_zeros=hqq)


@pytest.mark.parametrize(("arch", "grid"), [("qwen3_moe", "sym"), ("mixtral", "asym"), ("olmoe", "hqq")])
def test_the_packed_layer_computes_what_the_dense_experts_module_computes(arch: str, grid: str) -> None:
    model = moe_model(arch)
    block = model.model.layers[0].mlp
    packed = _packed(block.experts, symmetric=grid == "sym", hqq=grid == "hqq")
    dense = copy.deepcopy(block.experts)
    for name, w in zip(("gate_up_proj", "down_proj"), packed.dense_tensors().values(), strict=True):
        dense.get_parameter(name).data.copy_(w)
    dense.config._experts_implementation = "eager"  # the loop QuantExperts runs, op for op
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    _, weights, index = block.gate(x)
    with torch.no_grad():
        ours, theirs = packed(x, index, weights), dense(x, index, weights)
        assert float((ours - theirs).abs().max()) == 0.0
        dense.config._experts_implementation = "grouped_mm"  # transformers' default: other sums, same numbers
        assert float((packed(x, index, weights) - dense(x, index, weights)).abs().max()) < 1e-5
        # only routed experts run: tokens sent nowhere but expert 3 see expert 3 alone
        only = torch.full_like(index, 3)
        one = packed(x, only, weights)
        gate, up = torch.nn.functional.linear(x, packed.expert_weight("gate_up", 3)).chunk(2, dim=-1)
        alone = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, packed.expert_weight("down", 3))
        assert torch.allclose(one, alone * weights.sum(-1, keepdim=True), atol=1e-6)
    # 4-bit codes and a float16 scale per 32 (4.5 bits), plus a zero: float16 (HQQ, 5.0) or 4-bit,
    # packed in 4-byte words (2 and 1 zeros a row here, 5.17; 4.625 at 256 columns and more), not 32
    stored = sum(b.numel() * b.element_size() for b in packed.buffers())
    bits = 8 * stored / packed.num_logical_params()
    assert bits == pytest.approx({"sym": 4.5, "asym": 31 / 6, "hqq": 5.0}[grid])


def test_the_packed_layer_comes_back_exactly_from_its_record_and_tensors(tmp_path: Path) -> None:
    packed = _packed(moe_model("qwen3_moe").model.layers[0].mlp.experts, hqq=True)
    record = json.loads(json.dumps(packed.lmpress_format()))
    save_file({k: v.contiguous() for k, v in packed.state_dict().items()}, str(tmp_path / "layer.safetensors"))
    with torch.device("meta"):
        empty = LAYER_FORMATS[record["format"]].from_format(record, torch.float32)
    empty.load_state_dict(load_file(str(tmp_path / "layer.safetensors")), strict=True, assign=True)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    index, weights = torch.tensor([[0, 2], [1, 3], [3, 0]] * 3), torch.rand(9, 2)
    with torch.no_grad():
        assert torch.equal(empty(x, index, weights), packed(x, index, weights))
    assert empty.lmpress_format() == record and torch.equal(empty.dense_weight(), packed.dense_weight())
    assert packed.dense_weight(torch.bfloat16).shape == (EXPERTS, 64, 64)
    assert packed.to(torch.bfloat16).get_buffer("gate_up_scales").dtype == torch.float16  # the format stays


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_compressed_experts_save_and_reload_to_identical_logits(  # type: ignore[no-untyped-def]
    moe_dir, data: DataOptions, tmp_path: Path, arch: str, method: str
) -> None:
    src = moe_dir(arch)
    original = load_model(src, device="cpu").model
    out = tmp_path / "out"
    result = compress(src, _stage(method), data, output=out, measure_speed=False)
    counts = result.stages[0]["layers"]
    assert counts["experts w4g32"] == 2  # one experts module per block
    records = json.loads((out / "lmpress.json").read_text())["modules"]
    assert records["model.layers.1.mlp.experts"]["format"] == "quant_experts"
    assert "model.layers.0.mlp.gate" not in records  # the router: float, as it was
    again = load_model(out, device="cpu").model
    assert isinstance(again.get_submodule("model.layers.1.mlp.experts"), QuantExperts)
    for name in Adapter(again).float_modules():
        assert torch.equal(again.get_submodule(name).weight, original.get_submodule(name).weight)
    ids = torch.arange(48)[None] % 300
    with torch.no_grad():
        before, after = result.model(input_ids=ids).logits, again(input_ids=ids).logits
    assert float((after - before).abs().max()) == 0.0
    assert result.metrics["compressed"]["kl"] < 0.01  # random weights, W4: close to the original


def test_calibrated_quantizers_refuse_experts_in_one_line_unless_ignored(  # type: ignore[no-untyped-def]
    moe_dir, data: DataOptions, tmp_path: Path
) -> None:
    src = moe_dir("qwen3_moe")
    for method in ("gptq", "awq"):
        with pytest.raises(QuantError, match=rf"^{method.upper()} on experts needs expert-aware calibration") as e:
            compress(src, _stage(method), data, output=tmp_path / method, measure_speed=False)
        assert "\n" not in str(e.value) and not (tmp_path / method).exists()
    with pytest.raises(LmpressError, match=r"^structured: mixtral has experts, which lmpress cannot cut yet"):
        compress(moe_dir("mixtral"), {"name": "s", "stages": [{"method": "structured"}]}, data, measure_speed=False)
    # GPTQ on the attention, the experts left out (to a later RTN stage)
    recipe = _stage("gptq", ignore=["lm_head", "re:.*\\.experts$"])
    recipe["stages"].append({"method": "rtn", "bits": 4, "group_size": 32})  # type: ignore[union-attr]
    result = compress(src, recipe, data, output=tmp_path / "mixed", measure_speed=False)
    assert result.stages[0]["layers"] == {"w4g32": 8} and result.stages[1]["layers"] == {"experts w4g32": 2}


@pytest.mark.parametrize(
    ("arch", "recipe"),
    [
        ("qwen3_moe", _stage("rtn")),
        ("mixtral", _stage("hqq")),  # the checkpoint's block_sparse_moe.experts.{e}.w1/w3/w2
        ("qwen2_moe", _stage("rtn", ignore=["lm_head", "re:.*\\.experts$"])),  # float experts, stacked
        ("mixtral", _stage("rtn", ignore=["lm_head", "re:.*\\.experts$"])),
    ],
)
def test_streamed_equals_whole(  # type: ignore[no-untyped-def]
    moe_dir, data: DataOptions, tmp_path: Path, arch: str, recipe: dict[str, object]
) -> None:
    """The checkpoint stores each expert apart; streamed, a block's experts are stacked from those
    tensors as transformers stacks them, and the result loads to the whole run's tensors and logits.
    (The files name them apart: a whole save writes transformers' checkpoint names, Mixtral's
    ``block_sparse_moe`` and float experts one by one; a streamed one the model's.)"""
    src = moe_dir(arch)
    runs = [
        compress(src, recipe, data, output=tmp_path / f"out-{s}", stream=s, measure_speed=False) for s in (False, True)
    ]
    for s in (False, True):
        assert json.loads((tmp_path / f"out-{s}" / "lmpress.json").read_text()).get("streamed", False) is s
    whole, streamed = (load_model(tmp_path / f"out-{s}", device="cpu").model.state_dict() for s in (False, True))
    assert set(whole) == set(streamed)
    for k, t in whole.items():
        assert torch.equal(t, streamed[k]), k
    kl = [r.metrics["compressed"]["kl"] for r in runs]
    assert kl[1] == pytest.approx(kl[0], rel=1e-3)
    again = load_model(tmp_path / "out-True", device="cpu").model
    ids = torch.arange(48)[None] % 300
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, runs[0].model(input_ids=ids).logits)


def test_inspect_describes_the_experts(moe_dir) -> None:  # type: ignore[no-untyped-def]
    from lmpress.cli.inspection import layout_lines
    from lmpress.inspection import layout

    src = moe_dir("qwen2_moe")
    lines = layout_lines(layout(src))
    assert (
        "experts: mlp.experts: 2 of 4 experts, gate_up_proj [gate | up], down_proj (E, out, in); shared expert "
        "mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj, mlp.shared_expert.down_proj; kept in float: "
        "mlp.gate, mlp.shared_expert_gate"
    ) in lines
    assert "stream: yes" in lines[-2]
