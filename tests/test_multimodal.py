"""Multimodal checkpoints whose text decoder lmpress knows (Gemma 3 4B+, LLaVA over Llama): the
language model is compressed, the vision tower and the projector are kept bit for bit, and the saved
directory loads whole again, in lmpress and in transformers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText

import lmpress
from lmpress.arch import Adapter, spec_for
from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError, ModelLoadError
from lmpress.io import load_model
from lmpress.nn import CompressedLayer
from lmpress.pipeline import compress
from lmpress.preflight import why_whole
from lmpress.recipe import load_recipe
from lmpress.sources import load_documents

TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION |= {"image_size": 28, "patch_size": 14}
GEMMA3_TEXT = {"query_pre_attn_scalar": 16, "sliding_window": 32}
GEMMA3_TEXT |= {"layer_types": ["sliding_attention", "full_attention"]}  # a local and a global layer


def multimodal_config(model_type: str, vocab: int):  # type: ignore[no-untyped-def]
    """A tiny image-text model: Gemma 3 (Gemma 3 text + SigLIP) or LLaVA (Llama + CLIP)."""
    image_tokens = {"image_token_index": vocab - 1}
    if model_type == "gemma3":
        return AutoConfig.for_model(
            "gemma3",
            text_config={**TEXT, **GEMMA3_TEXT, "vocab_size": vocab},
            vision_config={**VISION, "model_type": "siglip_vision_model"},
            mm_tokens_per_image=4,
            boi_token_index=vocab - 3,
            eoi_token_index=vocab - 2,
            **image_tokens,
        )
    return AutoConfig.for_model(
        "llava",
        text_config={**TEXT, "model_type": "llama", "vocab_size": vocab},
        vision_config={**VISION, "model_type": "clip_vision_model", "projection_dim": 32},
        **image_tokens,
    )


OTHERS = {  # model_type -> (its text decoder's family, its config beside the text config)
    "mistral3": ("mistral", {"vision_config": {"model_type": "pixtral", **VISION, "head_dim": 16}}),
    "paligemma": ("gemma", {"vision_config": {"model_type": "siglip_vision_model", **VISION, "projection_dim": 64}}),
    "llava_next": ("llama", {"vision_config": {"model_type": "clip_vision_model", **VISION}}),
    "idefics3": ("llama", {"vision_config": VISION}),
}


@pytest.fixture
def multimodal_dir(tmp_path: Path, tokenizer) -> Callable[[str], Path]:  # type: ignore[no-untyped-def]
    def make(model_type: str) -> Path:
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(multimodal_config(model_type, len(tokenizer)))
        out = tmp_path / model_type
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    return make


def _stored(path: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys() if keep(k)})  # noqa: SIM118
    return out


def _vision(name: str) -> bool:
    return "vision_tower" in name or "multi_modal_projector" in name


IDS = torch.arange(40)[None] % 300
STAGES = {
    "rtn": {"method": "rtn", "bits": 4, "group_size": 32},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 32},
    "awq": {"method": "awq", "bits": 4, "group_size": 32},  # scales folded into the text norms (Gemma's 1 + w)
}


@pytest.mark.parametrize("model_type", ["gemma3", "llava"])
@pytest.mark.parametrize("method", list(STAGES))
def test_language_model_compressed_vision_kept_reloads_whole(  # type: ignore[no-untyped-def]
    model_type: str, method: str, multimodal_dir, text_file: Path, tmp_path: Path
) -> None:
    src = multimodal_dir(model_type)
    data = DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)
    r = compress(src, {"stages": [STAGES[method]]}, data, output=tmp_path / "o", measure_speed=False)
    adapter = Adapter(r.model)
    assert adapter.spec.blocks == "model.language_model.layers"
    assert all(not isinstance(m, nn.Linear) for m in adapter.linears().values())
    assert len(adapter.linears()) == 2 * 7
    vision = [m for n, m in r.model.named_modules() if _vision(n)]
    assert sum(isinstance(m, nn.Linear) for m in vision) >= 6  # the vision part's linears stay float
    assert not any(isinstance(m, CompressedLayer) for m in vision)
    assert r.metrics["compressed"]["kl"] < 0.05
    saved = AutoConfig.from_pretrained(tmp_path / "o")
    assert saved.model_type == model_type and saved.vision_config is not None
    reloaded = lmpress.load(tmp_path / "o").model
    assert type(reloaded) is type(r.model)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, r.model(input_ids=IDS).logits)
    before = _stored(src, _vision)
    after = {k: v for k, v in reloaded.state_dict().items() if _vision(k)}
    assert len(before) == len(after) > 10
    for k, v in before.items():  # the file's names are the legacy ones save_pretrained writes
        assert torch.equal(after[k if k in after else f"model.{k}"], v), k


def test_dense_result_loads_in_transformers(multimodal_dir, text_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A result stored dense (here pruned) is a plain checkpoint: transformers' image-text-to-text
    class loads it whole with the same text logits."""
    src = multimodal_dir("gemma3")
    data = DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)
    stage = {"method": "magnitude", "sparsity": 0.5, "storage": "dense"}
    r = compress(src, {"stages": [stage]}, data, output=tmp_path / "o", measure_speed=False)
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "o")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, r.model(input_ids=IDS).logits)
    q_proj = plain.model.language_model.layers[0].self_attn.q_proj.weight
    assert (q_proj == 0).float().mean() == 0.5
    assert _stored(src, _vision).keys() == _stored(tmp_path / "o", _vision).keys()
    assert all(torch.equal(v, _stored(tmp_path / "o", _vision)[k]) for k, v in _stored(src, _vision).items())


RESHAPING = {  # stage -> the text_config key it lowers
    "structured": ({"method": "structured"}, "intermediate_size"),
    "drop_blocks": ({"method": "drop_blocks", "blocks": 1}, "num_hidden_layers"),
}


@pytest.mark.parametrize("model_type", ["gemma3", "llava"])
@pytest.mark.parametrize("method", list(RESHAPING))
def test_new_widths_go_into_the_text_config(  # type: ignore[no-untyped-def]
    model_type: str, method: str, multimodal_dir, text_file: Path, tmp_path: Path
) -> None:
    """Structured pruning and dropping blocks write the language model's new sizes into
    ``text_config``: transformers' image-text class loads the result as it is, with the same logits."""
    src = multimodal_dir(model_type)
    data = DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)
    stage, key = RESHAPING[method]
    r = compress(src, {"stages": [stage]}, data, output=tmp_path / "o", measure_speed=False)
    saved = AutoConfig.from_pretrained(tmp_path / "o")
    assert getattr(saved.get_text_config(decoder=True), key) < TEXT[key]
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "o")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, r.model(input_ids=IDS).logits)


@pytest.mark.parametrize(("method", "what"), [("hidden", "hidden width"), ("vocab", "image tokens")])
def test_what_the_vision_part_reads_is_not_changed(  # type: ignore[no-untyped-def]
    method: str, what: str, multimodal_dir, text_file: Path, tmp_path: Path
) -> None:
    src = multimodal_dir("llava")
    with pytest.raises(LmpressError, match=f"stage 1 \\({method}\\) would change the .*{what}.* multimodal llava"):
        compress(src, {"stages": [{"method": method}]}, DataOptions(source=text_file), output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("model_type", ["gemma3", "llava"])
def test_streamed_equals_whole(model_type: str, multimodal_dir, text_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Streamed block by block from the files (the vision tower read and written as one unit of its
    own), the result is the whole run's, tensor for tensor."""
    src = multimodal_dir(model_type)
    data = DataOptions(source=text_file, seq_len=32, eval_windows=4, calib_windows=8)
    for name, stream in (("whole", False), ("streamed", True)):
        compress(src, {"stages": [STAGES["gptq"]]}, data, output=tmp_path / name, stream=stream, run_eval=False)
    whole = lmpress.load(tmp_path / "whole").model.state_dict()
    streamed = lmpress.load(tmp_path / "streamed").model.state_dict()
    assert whole.keys() == streamed.keys()
    assert all(torch.equal(whole[k], streamed[k]) for k in whole)
    assert sum(_vision(k) for k in whole) > 10


def test_a_broken_checkpoint_is_caught(multimodal_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The config-vs-weights check reads a multimodal checkpoint too: a language-model tensor the
    config implies but the files lack is named before anything is built."""
    from safetensors.torch import save_file

    src = multimodal_dir("llava")
    state = _stored(src, lambda k: True)
    del state["language_model.model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"implies tensor model\.language_model\.layers\.1\.mlp\.down_proj"):
        load_model(src)


def test_a_config_that_lies_about_the_vision_tower_is_caught(multimodal_dir) -> None:  # type: ignore[no-untyped-def]
    src = multimodal_dir("gemma3")
    config = json.loads((src / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"tensor vision_tower\.encoder\.layers\.0\.mlp\.fc1\..* implies \[96"):
        load_model(src)


@pytest.mark.parametrize("model_type", ["gemma3", "llava"])
def test_gguf_is_the_text_part_in_llama_cpp(model_type: str, multimodal_dir, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The GGUF file is the language model and head (llama.cpp keeps the vision part in its own
    mmproj file); llama.cpp's logits are lmpress's own of the compressed multimodal model."""
    from lmpress.export import export
    from lmpress.io import LoadedModel
    from tests.export.test_gguf import KL_MAX, _llama_check, _reader_tensors

    pytest.importorskip("llama_cpp")
    src = multimodal_dir(model_type)
    stage = {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}  # q4_0 exactly
    r = lmpress.compress(src, {"stages": [stage]}, DataOptions(calib_windows=4), run_eval=False)
    out = tmp_path / "m.gguf"
    export(LoadedModel(r.model, tokenizer, model_type, src), "gguf", out)
    names = set(_reader_tensors(out))
    assert "blk.1.attn_q.weight" in names and not any(n.startswith(("v.", "mm.")) for n in names)
    assert len(names) == 1 + 2 * (9 if model_type == "llava" else 13) + 1 + (model_type == "llava")
    ids = tokenizer(next(d.text for d in load_documents("stdlib") if d.path == "json/decoder.py")[:2000])["input_ids"]
    assert _llama_check(out, r.model, tokenizer, ids[:200]) < KL_MAX


@pytest.mark.parametrize("model_type", ["gemma3", "llava"])
def test_compressed_tensors_in_transformers(model_type: str, multimodal_dir, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The compressed-tensors checkpoint quantizes the language model's linears only (the vision
    part is listed as ignored) and transformers' image-text class loads it whole: lmpress's logits."""
    pytest.importorskip("compressed_tensors")
    from lmpress.export import export
    from lmpress.io import LoadedModel
    from tests.export.helpers import exact_fp32, kl

    src = multimodal_dir(model_type)
    r = lmpress.compress(src, {"stages": [STAGES["gptq"]]}, DataOptions(calib_windows=4), run_eval=False)
    out = tmp_path / "ct"
    report = export(LoadedModel(r.model, tokenizer, model_type, src), "compressed-tensors", out)
    assert report.type_counts() == {"w4 g32 asym": 2 * 7}
    theirs = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert type(theirs) is type(r.model)
    text = next(d.text for d in load_documents("stdlib") if d.path == "json/decoder.py")
    ids = torch.tensor(tokenizer(text[:3000])["input_ids"][:128])[None]
    with torch.no_grad():
        assert kl(exact_fp32(r.model)(input_ids=ids).logits, theirs(input_ids=ids).logits) < 1e-5
    before = _stored(src, _vision)
    state = theirs.state_dict()
    assert all(torch.equal(state[k if k.startswith("model.") else f"model.{k}"], v) for k, v in before.items())


@pytest.mark.parametrize("model_type", ["gemma3", "llava"])
def test_onnx_is_the_text_part_in_onnx_runtime(model_type: str, multimodal_dir, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The ONNX graph is the language model and head; ONNX Runtime computes lmpress's text logits."""
    pytest.importorskip("onnxruntime")
    from lmpress.export import export
    from lmpress.export.onnx_runtime import OnnxModel
    from lmpress.io import LoadedModel
    from tests.export.helpers import exact_fp32, kl

    src = multimodal_dir(model_type)
    r = lmpress.compress(src, {"stages": [STAGES["rtn"]]}, DataOptions(calib_windows=4), run_eval=False)
    out = tmp_path / "onnx"
    export(LoadedModel(r.model, tokenizer, model_type, src), "onnx", out)
    text = next(d.text for d in load_documents("stdlib") if d.path == "json/decoder.py")
    ids = torch.tensor(tokenizer(text[:3000])["input_ids"][:128])[None]
    with torch.no_grad():
        ours = exact_fp32(r.model)(input_ids=ids).logits
    assert kl(ours, OnnxModel(out)(input_ids=ids).logits) < 1e-5


WHY_NOT_STREAMED = "its vision part holds a tensor beside the language model, which lmpress does not stream"


@pytest.mark.parametrize("model_type", list(OTHERS))
def test_other_image_text_models_by_the_same_rule(model_type: str, tokenizer, text_file: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Mistral 3, PaliGemma, LLaVA-NeXT and Idefics 3 get their text decoder's spec by the same rule:
    RTN W4 on the language model only, reloaded whole with the same logits, the rest bit for bit."""
    text_type, kw = OTHERS[model_type]
    config = AutoConfig.for_model(
        model_type, text_config={**TEXT, "model_type": text_type, "vocab_size": len(tokenizer)}, **kw
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    data = DataOptions(source=text_file, seq_len=32, calib_windows=4)
    why = why_whole(src, load_recipe({"stages": [STAGES["rtn"]]}), tmp_path / "o")
    assert why == (None if model_type != "llava_next" else WHY_NOT_STREAMED)  # its image_newline is its model's own
    r = compress(src, {"stages": [STAGES["rtn"]]}, data, output=tmp_path / "o", run_eval=False, measure_speed=False)
    adapter = Adapter(r.model)
    assert adapter.spec.name == spec_for(text_type).name and len(adapter.linears()) == 2 * 7
    assert all(isinstance(m, CompressedLayer) for m in adapter.linears().values())
    reloaded = lmpress.load(tmp_path / "o").model
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, r.model(input_ids=IDS).logits)
    state = reloaded.state_dict()
    kept = {k: v for k, v in model.state_dict().items() if not adapter.is_text(k.rpartition(".")[0])}
    assert len(kept) > 10 and all(torch.equal(state[k], v) for k, v in kept.items())


def test_a_config_without_the_decoders_model_type_is_still_read() -> None:
    """Older LLaVA configs leave ``text_config.model_type`` out: transformers' default (Llama) holds."""
    from lmpress.arch import text_config, text_model_type

    config = {"model_type": "llava", "text_config": {"hidden_size": 64}}
    assert text_model_type(config) == "llama" and text_config(config) == {"hidden_size": 64}
    assert text_model_type({"model_type": "llama", "text_config": {"model_type": "llama"}}) is None
