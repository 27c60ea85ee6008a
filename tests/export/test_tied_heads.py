"""A head tied to the embeddings is saved once, as the embeddings, and is not missing: a tied
GPT-NeoX (and its untied twin) compresses whole and streamed alike, saves, reloads, and exports to
GGUF (llama.cpp) and compressed-tensors (transformers); the llama.cpp architectures that read
``output.weight`` even where the head is tied get the table written again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import gguf
import lmpress
from lmpress.data import tokenize_documents
from lmpress.export import export
from lmpress.io.load import LoadedModel
from lmpress.sources import load_documents
from tests.conftest import tiny_config
from tests.export.test_compressed_tensors import KL_MAX as CT_KL_MAX
from tests.export.test_compressed_tensors import _check_in_transformers
from tests.export.test_gguf import KL_MAX, _llama_check, needs_llama

W4 = {"stages": [{"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}]}


def _tiny(arch: str, tokenizer, tied: bool, path=None):  # type: ignore[no-untyped-def]
    config = tiny_config(arch, len(tokenizer))
    config.tie_word_embeddings, config.initializer_range = tied, 0.2  # logits far from uniform
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if path is not None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return model


def _ids(tokenizer) -> list[int]:  # type: ignore[no-untyped-def]
    docs = [d for d in load_documents("stdlib") if d.path == "json/decoder.py"]
    return tokenize_documents(docs, tokenizer)[:200].tolist()


def _tensors(path) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})  # noqa: SIM118
    return out


@needs_llama
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt_neox_through_every_path(tokenizer, tmp_path, tied: bool) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "neox"
    _tiny("gpt_neox", tokenizer, tied, src)
    stored = _tensors(src)
    assert ("embed_out.weight" in stored) != tied  # a tied head is saved once, as the embeddings
    data = lmpress.DataOptions(calib_windows=8, seq_len=64)
    runs = {s: lmpress.compress(src, W4, data, output=tmp_path / f"w4-{s}", stream=s, run_eval=False) for s in (0, 1)}
    whole, streamed = _tensors(tmp_path / "w4-0"), _tensors(tmp_path / "w4-1")
    assert set(whole) == set(streamed) and all(torch.equal(t, streamed[k]) for k, t in whole.items())
    reloaded = lmpress.load(tmp_path / "w4-1", device="cpu")
    assert (reloaded.model.get_output_embeddings().weight is reloaded.model.get_input_embeddings().weight) == tied
    ids = torch.tensor([_ids(tokenizer)[:64]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(input_ids=ids).logits, runs[0].model(input_ids=ids).logits)
    loaded = LoadedModel(reloaded.model, reloaded.tokenizer, str(src), src)
    out = tmp_path / "neox.gguf"
    export(loaded, "gguf", out)
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert "output.weight" in names  # llama.cpp's gptneox requires it, tied or not
    assert _llama_check(out, reloaded.model, reloaded.tokenizer, _ids(tokenizer)) < KL_MAX
    export(loaded, "compressed-tensors", tmp_path / "ct")
    assert _check_in_transformers(loaded, tmp_path / "ct", ids) < CT_KL_MAX


@needs_llama
@pytest.mark.parametrize("arch", ["gpt_neox", "phi", "stablelm", "olmo2", "llama"])
def test_a_tied_head_in_llama_cpp(arch: str, tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Where the architecture reads output.weight (gptneox, phi2, stablelm, olmo2) it is the table
    again (Phi's head bias with it); where llama.cpp falls back to the table (llama), it is not written."""
    model = _tiny(arch, tokenizer, True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    out = tmp_path / f"{arch}.gguf"
    export(LoadedModel(model, tokenizer, arch, tmp_path), "gguf", out)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    if arch == "llama":
        assert "output.weight" not in tensors
    else:
        table = np.asarray(tensors["token_embd.weight"].data)
        assert np.array_equal(np.asarray(tensors["output.weight"].data), table)
        assert ("output.bias" in tensors) == (getattr(model.get_output_embeddings(), "bias", None) is not None)
    assert _llama_check(out, model, tokenizer, _ids(tokenizer)) < KL_MAX
