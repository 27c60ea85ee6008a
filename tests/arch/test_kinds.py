"""Models lmpress does not compress, refused at the door in one line that says what they are and
what lmpress can do with them instead (exit code 2, nothing written): an encoder (BERT), an
encoder-decoder (T5), a state-space model without attention (Mamba). `lmpress inspect` still reads
them and says the same."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel
from typer.testing import CliRunner

from lmpress.cli import app
from tests.robustness.conftest import FAST, assert_refused, tree
from tests.robustness.conftest import lmpress as run_cli

# model_type -> (tiny config keys, what the refusal says it is)
NOT_DECODERS = {
    "bert": (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        "bert is an encoder (a masked language model",
    ),
    "t5": (
        {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16},
        "t5 is an encoder-decoder (sequence-to-sequence) model",
    ),
    "mamba": (
        {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 8},
        "mamba has no attention layers (a state-space or recurrent model)",
    ),
}
INSTEAD = ("docs/architectures.md", "`lmpress inspect` shows what this one holds")


@pytest.fixture
def not_a_decoder(tmp_path: Path, tokenizer) -> Callable[[str], Path]:  # type: ignore[no-untyped-def]
    """Factory: a tiny random model of ``model_type`` (its base class when it has no causal LM),
    saved with the test tokenizer."""

    def make(model_type: str) -> Path:
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **NOT_DECODERS[model_type][0])
        out = tmp_path / model_type
        AutoModel.from_config(config).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return out

    return make


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
@pytest.mark.parametrize("model_type", sorted(NOT_DECODERS))
def test_compress_refuses_it_in_one_line(  # type: ignore[no-untyped-def]
    model_type: str, stream: str, not_a_decoder, text_file: Path, tmp_path: Path, capsys
) -> None:
    src = not_a_decoder(model_type)
    before = tree(tmp_path)
    out = run_cli(capsys, "compress", src, "-r", "w4", "--data", text_file, "-o", tmp_path / "out", stream, *FAST)
    assert_refused(out, NOT_DECODERS[model_type][1], *INSTEAD, before=before, root=tmp_path, max_seconds=30)


@pytest.mark.parametrize("model_type", ["bert", "t5"])
def test_export_and_eval_refuse_it_too(model_type: str, not_a_decoder, text_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    src = not_a_decoder(model_type)
    before = tree(tmp_path)
    out = run_cli(capsys, "export", src, "--to", "gguf", "-o", tmp_path / "m.gguf")
    assert_refused(out, NOT_DECODERS[model_type][1], before=before, root=tmp_path)
    out = run_cli(capsys, "eval", src, "--data", text_file, "--seq-len", "32", "--max-windows", "2", "--no-speed")
    assert_refused(out, NOT_DECODERS[model_type][1], before=before, root=tmp_path)


@pytest.mark.parametrize("model_type", sorted(NOT_DECODERS))
def test_inspect_says_what_it_is(model_type: str, not_a_decoder) -> None:  # type: ignore[no-untyped-def]
    r = CliRunner().invoke(app, ["inspect", str(not_a_decoder(model_type))])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"family: none found ({NOT_DECODERS[model_type][1]}" in text
    assert "every family and what lmpress does with it: docs/architectures.md" in text
