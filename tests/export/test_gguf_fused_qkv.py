"""Falcon's and GPT BigCode's other fused-qkv layouts in llama.cpp: Falcon-7B (one key/value head,
one norm for both parallel sublayers), multi-head Falcon and GPT BigCode without multi-query
(per-head [q | k | v] triples, regrouped as llama.cpp reads them); what llama.cpp's falcon cannot
compute refused in one line. (The TINY_ARCHS configs, Falcon-40B's layout and multi-query
StarCoder, are checked in test_gguf.test_families_in_llama_cpp.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lmpress.data import tokenize_documents
from lmpress.export import ExportError, export
from lmpress.io.load import LoadedModel
from lmpress.sources import load_documents
from tests.arch.test_qkv_groups import FALCON_7B, MULTI_HEAD, layout_model
from tests.export.test_gguf import KL_MAX, _llama_check, _reader_tensors, needs_llama


@needs_llama
@pytest.mark.parametrize(
    ("arch", "changes", "kv_heads"),
    [("falcon", FALCON_7B, 1), ("falcon", MULTI_HEAD, 4), ("gpt_bigcode", {"multi_query": False}, 4)],
    ids=["falcon-7b", "falcon-multi-head", "bigcode-multi-head"],
)
def test_qkv_layouts_in_llama_cpp(arch: str, changes: dict[str, Any], kv_heads: int, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = layout_model(arch, len(tokenizer), changes, init=0.2)
    assert model.config.num_key_value_heads == kv_heads
    out = tmp_path / f"{arch}.gguf"
    export(LoadedModel(model, tokenizer, arch, tmp_path), "gguf", out)
    tensors = _reader_tensors(out)
    assert "blk.0.attn_norm.weight" in tensors and "blk.0.attn_norm_2.weight" not in tensors
    docs = [d for d in load_documents("stdlib") if d.path == "json/decoder.py"]
    ids = tokenize_documents(docs, tokenizer)[:200].tolist()
    assert _llama_check(out, model, tokenizer, ids) < KL_MAX


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({**MULTI_HEAD, "alibi": True}, "ALiBi"),
        ({**MULTI_HEAD, "parallel_attn": False}, "then the MLP"),
        ({**FALCON_7B, "bias": True}, "biases"),
    ],
)
def test_falcon_gguf_refusals(changes: dict[str, Any], says: str, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = layout_model("falcon", len(tokenizer), changes)
    out = tmp_path / "falcon.gguf"
    with pytest.raises(ExportError, match=says) as e:
        export(LoadedModel(model, tokenizer, "falcon", tmp_path), "gguf", out)
    assert "\n" not in str(e.value) and not out.exists()
