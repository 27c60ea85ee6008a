"""Falcon's and GPT BigCode's fused qkv, one layout per key/value group [q… | k | v] in each of their
configs: Falcon-7B (multi-query: one group, one norm feeding both parallel sublayers), Falcon-40B
(TINY_ARCHS: groups of two query heads, a norm per sublayer), multi-head Falcon in sequence and
GPT BigCode without multi-query (per-head triples). Scales fold without changing the function, and
cutting a group leaves exactly the kept heads' computation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpress.arch import Adapter, linear_weight
from lmpress.arch.widths import attention_counts, keep_attention_units, unit_heads
from lmpress.data_options import DataOptions
from lmpress.io.load import load_model
from lmpress.pipeline import compress
from lmpress.prune.masks import PruneError
from lmpress.quant.awq import fold_scales
from tests.conftest import tiny_config

ONE_NORM = {"new_decoder_architecture": False, "num_ln_in_parallel_attn": None, "num_kv_heads": None}
FALCON_7B = {**ONE_NORM, "multi_query": True}
MULTI_HEAD = {**ONE_NORM, "multi_query": False}
SEQUENTIAL = {**MULTI_HEAD, "parallel_attn": False}
LAYOUTS = {  # id -> (arch, config changes, scale groups of a block: the norms the linears read)
    "falcon-40b": ("falcon", {}, ["ln_attn", "ln_mlp"]),
    "falcon-7b": ("falcon", FALCON_7B, ["input_layernorm"]),
    "falcon-sequential": (
        "falcon",
        {**MULTI_HEAD, "parallel_attn": False},
        ["input_layernorm", "post_attention_layernorm"],
    ),
    "bigcode-multi-query": ("gpt_bigcode", {}, ["ln_1", "ln_2"]),
    "bigcode-multi-head": ("gpt_bigcode", {"multi_query": False}, ["ln_1", "ln_2"]),
}


def layout_model(arch: str, vocab: int, changes: dict[str, Any], init: float = 0.02) -> torch.nn.Module:
    """A tiny random ``arch`` model of its TINY_ARCHS config with ``changes`` (keys derived from them,
    the key/value head count, computed again)."""
    base = tiny_config(arch, vocab)
    given = {k: v for k, v in base.to_dict().items() if k != "num_key_value_heads"}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(type(base)(**{**given, **changes, "initializer_range": init})).eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scales_fold_into_each_layouts_norms(layout: str) -> None:
    arch, changes, norms = LAYOUTS[layout]
    model = layout_model(arch, 300, changes, init=0.2)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        a = Adapter(model)
        groups = a.scale_groups(0)
        assert [name.rpartition(".")[2] for name, _, _ in groups] == norms
        if layout == "falcon-7b":  # the one norm feeds qkv and the MLP alike
            assert len(groups[0][2]) == 2
        for i in range(a.num_blocks):
            for name, prev, linears in a.scale_groups(i):
                width = linear_weight(next(iter(linears.values()))).shape[1]
                fold_scales(prev, linears, torch.rand(width) + 0.5, a.norm_kind(name))
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["falcon-40b", "falcon-sequential", "bigcode-multi-head"])
def test_cutting_a_group_keeps_the_other_heads(layout: str) -> None:
    arch, changes, _ = LAYOUTS[layout]
    model = layout_model(arch, 256, changes, init=0.2)
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
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["falcon-7b", "bigcode-multi-query"])
def test_multi_query_is_one_unit(layout: str) -> None:
    """Every query head reads the one key/value head: structured pruning has no head to remove."""
    arch, changes, _ = LAYOUTS[layout]
    a = Adapter(layout_model(arch, 256, changes))
    assert attention_counts(a, 0) == (4, 1) and unit_heads(a, 0) == [[0, 1, 2, 3]]


def test_alibi_falcon_keeps_its_heads(tokenizer, text_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """ALiBi builds one slope per head of the config's count: structured refuses to remove heads in
    one line, nothing written, and removes MLP neurons alone when asked to; the result reloads."""
    model = layout_model("falcon", len(tokenizer), {**SEQUENTIAL, "alibi": True}, init=0.2)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    data = DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)
    stage: dict[str, Any] = {"method": "structured", "target": 0.3, "multiple_of": 8}
    with pytest.raises(PruneError, match="ALiBi.*set attention: false") as e:
        compress(src, {"stages": [stage]}, data, output=tmp_path / "no", measure_speed=False)
    assert "\n" not in str(e.value) and not (tmp_path / "no").exists()
    r = compress(src, {"stages": [{**stage, "attention": False}]}, data, output=tmp_path / "o", measure_speed=False)
    assert [b["heads"] for b in r.stages[0]["blocks"]] == [4, 4] and r.stages[0]["blocks"][0]["mlp"] < 128
    ids = torch.arange(40)[None] % 300
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "o").model(input_ids=ids).logits, r.model(input_ids=ids).logits)
