"""A head tied to the token embeddings through a GGUF mix: one table, quantized once with the head's
type (as llama-quantize does for a file with no ``output.weight``), shared in the lmpress model, saved
once, reloaded tied, written once in the GGUF file and run by llama.cpp."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lmpress
from lmpress.export import export
from lmpress.io.load import LoadedModel
from lmpress.nn.gguf_linear import GGUFEmbedding, GGUFLinear
from lmpress.quant.mix import mix_layer_types

from .test_gguf import KL_MAX, _llama_check, _lmpress_logits, _reader_tensors, needs_llama

TEXT = "def parse(text):\n    return [line.split(',') for line in text.splitlines() if line]\n" * 6


@pytest.fixture
def tied_llama(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> Path:
    """A random tied Llama 256 wide, so that the head's Q4_K_M type is Q6_K (Q8_0 below 256)."""
    src = tiny_model_dir("llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    (src / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(src, safe_serialization=True)
    return src


@needs_llama
@pytest.mark.parametrize("arch", ["gemma2", "llama256"])
def test_tied_table_is_quantized_once(
    arch: str, tiny_model_dir: Callable[..., Path], tied_llama: Path, tmp_path: Path
) -> None:
    src = tied_llama if arch == "llama256" else tiny_model_dir(arch)
    loaded = lmpress.load(src, device="cpu")
    head_type = mix_layer_types(loaded.model, "q4_k_m")["lm_head"]
    assert head_type == ("q6_k" if arch == "llama256" else "q8_0")
    out = tmp_path / "q"
    r = lmpress.compress(src, "gguf-q4_k_m", lmpress.DataOptions(calib_windows=4), output=out, run_eval=False)
    model = r.model
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, GGUFEmbedding) and isinstance(head, GGUFLinear)
    assert embed.gtype.name == head.gtype.name == head_type
    assert head.blocks is embed.blocks  # the head computes with the table's codes

    # saved once: the head's blocks are not among the saved tensors, and the files hold the table once
    state = model.state_dict()
    assert "lm_head.blocks" not in state
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    on_disk = json.loads((out / "lmpress.json").read_text())["bytes_on_disk"]
    assert tensor_bytes <= on_disk < tensor_bytes + min(embed.blocks.numel(), 64 * 1024)  # + the header

    # reloads tied, with identical logits
    back = lmpress.load(out, device="cpu")
    assert back.model.get_output_embeddings().blocks is back.model.get_input_embeddings().blocks
    ids = loaded.tokenizer(TEXT)["input_ids"][:120]
    assert torch.equal(_lmpress_logits(model, ids), _lmpress_logits(back.model, ids))

    # one table in the GGUF file, of the head's type, and llama.cpp runs it as lmpress does
    path = tmp_path / f"{arch}.gguf"
    export(LoadedModel(model, loaded.tokenizer, str(src), src), "gguf", path)
    tensors = _reader_tensors(path)
    assert "output.weight" not in tensors
    assert tensors["token_embd.weight"].tensor_type.name.lower() == head_type
    kl = _llama_check(path, model, loaded.tokenizer, ids)
    assert kl < KL_MAX, (arch, kl)
