"""Shared fixtures: a small tokenizer, tiny random-init models of every supported family, text data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lmpress.data import tokenize_documents, windows
from lmpress.distill.train import TrainConfig, train
from lmpress.sources import load_documents

torch.set_num_threads(int(os.environ.get("LMPRESS_TEST_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))))

TINY_ARCHS = (
    "llama",
    "mistral",
    "qwen2",
    "gpt2",
    "opt",
    "gpt_neox",
    "phi",
    "gemma",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "starcoder2",
    "stablelm",
    "smollm3",
    "olmo2",
    "olmo3",
    "granite",
    "ministral",
    "phi3",
    "lfm2",
    "gptj",
    "cohere",
    "cohere2",
    "gpt_bigcode",
    "falcon",
)


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Commands record runs by default; tests turn it on only where they test it (``--track``). The
    measurement cache of originals is the session's own, not the user's."""
    monkeypatch.setenv("LMPRESS_TRACK", "0")
    monkeypatch.setenv("LMPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "lmpress-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for quick in ("LMPRESS_MAX_WINDOWS", "LMPRESS_CALIB_WINDOWS", "LMPRESS_MAX_TRIALS"):  # a developer's shell
        monkeypatch.delenv(quick, raising=False)  # setting must not change the defaults tests rely on


@pytest.fixture(scope="session")
def tokenizer():  # type: ignore[no-untyped-def]
    """A 512-token byte-level BPE trained on a few stdlib modules (fast, deterministic)."""
    from lmpress.models.reference import train_tokenizer

    docs = [d for d in load_documents("stdlib") if d.path in ("json/decoder.py", "json/encoder.py", "abc.py")]
    return train_tokenizer(docs, 512)


def tiny_config(arch: str, vocab: int):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig

    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    small["max_position_embeddings"] = 512
    gqa = {**small, "num_key_value_heads": 2}  # grouped-query attention
    gqa16 = {**gqa, "head_dim": 16}  # a head width stated apart from hidden / heads
    kw: dict[str, dict[str, object]] = {
        "llama": {**gqa, "tie_word_embeddings": False},
        "mistral": {**gqa},
        "qwen2": {**gqa},
        "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512},
        "opt": {
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 512,
            "word_embed_proj_dim": 64,
        },
        "gpt_neox": {**small},
        "phi": {**small},
        "gemma": {**gqa16},
        "gemma2": {
            **gqa16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 32,
        },  # a window shorter than the tests' texts, so the sliding layer differs from the full one
        "gemma3_text": {
            **gqa16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 32,
            "layer_types": ["sliding_attention", "full_attention"],
        },  # a local and a global layer, each with its own rotary base
        "starcoder2": {**gqa},
        "stablelm": {**gqa, "use_qkv_bias": True},
        "qwen3": {**gqa16},
        "smollm3": {**gqa16, "pad_token_id": None},
        "olmo2": {**gqa16},
        # a local and a global layer: llama.cpp's olmo2 takes the window and its period
        "olmo3": {**gqa16, "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]},
        "granite": {
            **gqa16,
            "embedding_multiplier": 6.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 4.0,
        },
        "ministral": {**gqa16, "sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"]},
        "phi3": {**gqa, "partial_rotary_factor": 0.75, "pad_token_id": None},  # Phi-4-mini's rotary share
        "lfm2": {**gqa, "layer_types": ["conv", "full_attention"], "block_auto_adjust_ff_dim": False},
        "gptj": {"n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "n_positions": 512, "rotary_dim": 8},
        "cohere": {**gqa, "logit_scale": 0.25},
        "cohere2": {
            **gqa,
            "logit_scale": 0.25,
            "sliding_window": 32,
            "layer_types": ["sliding_attention", "full_attention"],
        },  # partial rotary (gptj); a window shorter than the tests' texts, rotary only on the sliding layer
        "gpt_bigcode": {"n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "n_positions": 512},  # multi-query
        "falcon": {  # Falcon-40B's layout: grouped key/value heads, a norm per sublayer, in parallel
            **{k: v for k, v in small.items() if k != "intermediate_size"},
            "ffn_hidden_size": 128,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
            "num_ln_in_parallel_attn": 2,
        },
    }
    return AutoConfig.for_model(arch, **common, **kw[arch])


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tokenizer) -> Callable[..., Path]:  # type: ignore[no-untyped-def]
    """Factory: save a tiny random-init model of ``arch`` (fp32, with tokenizer) and return its dir."""
    from transformers import AutoModelForCausalLM

    def make(arch: str = "llama", name: str | None = None) -> Path:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
        out = tmp_path / (name or f"tiny-{arch}")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return out

    return make


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A text file of a few thousand tokens (one stdlib module)."""
    path = tmp_path / "text.txt"
    path.write_text(next(d.text for d in load_documents("stdlib") if d.path == "json/decoder.py"))
    return path


# ---- tiny trained teachers (a few seconds of training): models with something to lose -----------
# They never see DISTILL_TEXT, the text the distillation and low-rank tests calibrate, train and evaluate on.

TEACHER_TEXT = {
    "json/encoder.py", "json/__init__.py", "json/scanner.py", "json/tool.py", "abc.py", "base64.py",
    "bisect.py", "colorsys.py", "copy.py", "csv.py", "dataclasses.py",
}  # fmt: skip


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Callable[[str], Path]:  # type: ignore[no-untyped-def]
    """Factory: a tiny model of ``arch`` trained with cross-entropy on json/decoder.py (cached per arch)."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("trained")
    docs = [d for d in load_documents("stdlib") if d.path in TEACHER_TEXT]
    data = windows(tokenize_documents(docs, tokenizer), 32)  # about 2300 windows

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))

            def ce(ids: Tensor) -> tuple[Tensor, dict[str, float]]:
                return model(input_ids=ids, labels=ids, use_cache=False).loss, {}

            cfg = TrainConfig(steps=200, batch_size=16, lr=3e-3, precision="fp32", eval_every=1000)
            train(dict(model.named_parameters()), ce, data, cfg)
            out = root / arch
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            made[arch] = out
        return made[arch]

    return make


DISTILL_TEXT = ("json/decoder.py", "heapq.py", "fnmatch.py", "glob.py", "shlex.py", "string.py", "textwrap.py")


@pytest.fixture(scope="session")
def distill_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text the teachers never saw (about 25k tokens): its first half trains, its second half evaluates."""
    docs = {d.path: d.text for d in load_documents("stdlib") if d.path in DISTILL_TEXT}
    path = tmp_path_factory.mktemp("distill") / "text.txt"
    path.write_text("\n".join(docs[p] for p in DISTILL_TEXT))
    return path
