"""Structured pruning and block removal: smaller dense models on every family, reloadable."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.arch import Adapter
from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.pipeline import compress
from tests.conftest import TINY_ARCHS


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(40)[None] % 300).logits


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("uniform", [True, False])
def test_structured_removes_the_target_and_reloads(
    arch: str, uniform: bool, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=4, calib_windows=8)
    src = tiny_model_dir(arch)
    before = Adapter(load_model(src).model).non_embedding_parameters()
    stage = {"method": "structured", "target": 0.3, "uniform": uniform, "multiple_of": 8}
    out = tmp_path / "o"
    if arch == "lfm2":  # attention and convolution blocks: refused in one line, nothing written
        with pytest.raises(LmpressError, match="lfm2 blocks are of several kinds"):
            compress(src, {"stages": [stage]}, data, output=out, measure_speed=False)
        assert not out.exists()
        return
    r = compress(src, {"stages": [stage]}, data, output=out, measure_speed=False)
    report = r.stages[0]
    after = Adapter(r.model).non_embedding_parameters()
    assert after == report["non_embedding_parameters"]
    assert 0.26 <= 1 - after / before <= 0.34  # the target, within the rounding to multiples of 8
    assert r.metrics["compressed"]["kl"] < 5  # still a language model
    assert torch.equal(_logits(load_model(out).model), _logits(r.model))
    meta = json.loads((out / "lmpress.json").read_text())
    assert ("structure" in meta) == (not report["plain_transformers"])
    if uniform:  # MLP widths always go into the config; heads where it has head_dim
        assert report["plain_transformers"] == (
            arch in ("llama", "mistral", "qwen2") or report["blocks"][0]["heads"] == 4
        )


def test_uniform_llama_loads_in_plain_transformers(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    data = DataOptions(source=text_file, seq_len=64, eval_windows=4, calib_windows=8)
    stage = {"method": "structured", "target": 0.5, "attention_share": 1.0, "multiple_of": 8}
    r = compress(tiny_model_dir("llama"), {"stages": [stage]}, data, output=tmp_path / "o", measure_speed=False)
    assert r.stages[0]["blocks"][0] == {"heads": 2, "kv_heads": 1, "mlp": r.stages[0]["blocks"][0]["mlp"]}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert plain.config.num_attention_heads == 2 and plain.config.num_key_value_heads == 1
    assert torch.equal(_logits(plain), _logits(r.model))


@pytest.mark.parametrize("score", ["angular", "last", "random"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_drop_blocks(
    arch: str, score: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    data = DataOptions(source=text_file, seq_len=64, eval_windows=4, calib_windows=8)
    stage = {"method": "drop_blocks", "blocks": 1, "score": score}
    r = compress(tiny_model_dir(arch), {"stages": [stage]}, data, output=tmp_path / "o", measure_speed=False)
    assert Adapter(r.model).num_blocks == 1 and r.stages[0]["dropped"] == [1]  # block 0 is kept
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert plain.config.num_hidden_layers == 1
    assert torch.equal(_logits(plain), _logits(r.model))
    with torch.no_grad():  # generation with the KV cache works on the renumbered blocks
        out = r.model.generate(torch.arange(5)[None], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"method": "drop_blocks", "blocks": 2}, "cannot remove 2 of 2 blocks"),
        ({"method": "drop_blocks"}, "exactly one of blocks"),
        ({"method": "structured", "target": 0.9}, "every MLP neuron"),
        ({"method": "structured", "target": 0.3, "mlp": False, "attention": False}, "attention or mlp"),
    ],
)
def test_structured_bad_input(
    stage: dict[str, object], message: str, tiny_model_dir: Callable[..., Path], text_file: Path
) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=2, calib_windows=4)
    with pytest.raises(LmpressError, match=message):
        compress(tiny_model_dir("llama"), {"stages": [stage]}, data, run_eval=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hidden_channels_removed_everywhere_load_in_plain_transformers(
    arch: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "narrow"
    data = DataOptions(source=text_file, seq_len=32, eval_windows=16, calib_windows=16)
    stage = {"method": "hidden", "share": 0.25, "multiple_of": 16}
    r = compress(tiny_model_dir(arch), {"stages": [stage]}, data, output=out, measure_speed=False)
    assert r.model.config.hidden_size == 48 and r.stages[0]["removed_channels"] == 16
    assert r.model.model.embed_tokens.weight.shape[1] == 48
    assert r.model.model.layers[0].self_attn.q_proj.weight.shape == (64, 48)  # heads unchanged
    before, after = r.metrics["original"]["parameters"], r.metrics["compressed"]["parameters"]
    assert 0.72 * before < after < 0.78 * before  # every weight matrix lost a quarter of one side
    assert r.metrics["compressed"]["kl"] < 0.5  # a random-init model: bounded, not free
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(plain(input_ids=ids).logits, r.model(input_ids=ids).logits)


def test_hidden_refuses_families_with_position_embeddings(tiny_model_dir: Callable[..., Path], text_file: Path) -> None:
    data = DataOptions(source=text_file, seq_len=32, eval_windows=16, calib_windows=16)
    with pytest.raises(LmpressError, match="hidden: removing hidden channels is supported for granite, llama"):
        compress(tiny_model_dir("gpt2"), {"stages": [{"method": "hidden"}]}, data, run_eval=False)
