"""Vocabulary pruning: same pieces and same predictions on the domain, any text still encodes, plain
transformers loads the result, later stages calibrate with the new tokenizer, bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.pipeline import compress
from lmpress.vocab import merge_closure

ANY_TEXT = "naïve café ☃ 日本語 \t\r\n \x00 emoji 🙂 and Ω"


def test_merge_closure_keeps_what_kept_tokens_are_merged_from() -> None:
    model = {"merges": [["a", "b"], ["ab", "c"], ["x", "y"], ["abc", "d"]]}
    assert merge_closure(model, {"abcd"}) == {"abcd", "abc", "d", "ab", "c", "a", "b"}
    assert merge_closure(model, {"xy", "q"}) == {"xy", "x", "y", "q"}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "gemma3_text"])  # Gemma: a scaled embedding
def test_domain_text_keeps_its_pieces_and_predictions_and_loads_in_plain_transformers(
    arch: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    src = tiny_model_dir(arch)
    out = tmp_path / "pruned"
    data = DataOptions(source=text_file, seq_len=32, eval_windows=16)
    result = compress(src, {"stages": [{"method": "vocab"}]}, data, output=out, measure_speed=False)
    report = result.stages[0]
    assert report["identical_tokenization"] == 1.0
    assert 256 < report["tokens_kept"] < report["tokens_before"] == 512  # the byte alphabet is always kept
    removed = report["parameters_removed"]
    assert result.metrics["original"]["parameters"] - result.metrics["compressed"]["parameters"] == removed
    assert result.metrics["compressed"]["kl"] < 1e-6  # the same distribution on the kept tokens
    assert result.metrics["compressed"]["top1_agreement"] == 1.0
    assert result.metrics["compressed"]["perplexity"] <= result.metrics["original"]["perplexity"] + 1e-4

    old_tok = AutoTokenizer.from_pretrained(src)
    new_tok = AutoTokenizer.from_pretrained(out)  # plain transformers, no lmpress
    new_model = AutoModelForCausalLM.from_pretrained(out).eval()
    old_model = AutoModelForCausalLM.from_pretrained(src).eval()
    assert new_model.config.vocab_size == len(new_tok) == report["tokens_kept"]
    if arch == "gpt2":
        assert new_model.lm_head.weight is new_model.transformer.wte.weight  # still tied
    text = text_file.read_text()[:3000]
    old_ids = old_tok(text, return_tensors="pt").input_ids
    new_ids = new_tok(text, return_tensors="pt").input_ids
    assert old_tok.convert_ids_to_tokens(old_ids[0]) == new_tok.convert_ids_to_tokens(new_ids[0])
    kept = torch.tensor(old_tok.convert_tokens_to_ids(new_tok.convert_ids_to_tokens(list(range(len(new_tok))))))
    with torch.no_grad():
        old_logits = old_model(old_ids[:, :256]).logits[..., kept]
        new_logits = new_model(new_ids[:, :256]).logits
    torch.testing.assert_close(new_logits, old_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(new_logits.argmax(-1), old_logits.argmax(-1))
    # any text still encodes and decodes exactly (byte-level alphabet)
    assert new_tok.decode(new_tok(ANY_TEXT).input_ids) == ANY_TEXT
    assert new_tok.eos_token == old_tok.eos_token and new_model.config.eos_token_id == new_tok.eos_token_id


def test_later_stages_calibrate_with_the_pruned_tokenizer_and_reload(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pruned-q"
    data = DataOptions(source=text_file, seq_len=32, eval_windows=16, calib_windows=16)
    recipe = {"stages": [{"method": "vocab"}, {"method": "gptq", "bits": 4, "group_size": 32}]}
    result = compress(tiny_model_dir("llama"), recipe, data, output=out, measure_speed=False)
    assert result.stages[1]["calib_tokens"] == 16 * 32
    assert result.metrics["compressed"]["kl"] < 0.05
    loaded = load_model(out)
    assert len(loaded.tokenizer) == result.stages[0]["tokens_kept"]
    ids = torch.randint(0, len(loaded.tokenizer), (1, 16))
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_min_count_drops_rare_tokens_and_reports_what_changed(
    tiny_model_dir: Callable[..., Path], text_file: Path
) -> None:
    data = DataOptions(source=text_file, seq_len=32, eval_windows=16)
    all_used = compress(tiny_model_dir("llama"), {"stages": [{"method": "vocab"}]}, data, run_eval=False)
    frequent = compress(
        tiny_model_dir("llama"), {"stages": [{"method": "vocab", "min_count": 20}]}, data, run_eval=False
    )
    assert frequent.stages[0]["tokens_kept"] < all_used.stages[0]["tokens_kept"]
    assert 0.5 < frequent.stages[0]["identical_tokenization"] < 1.0


def test_bad_corpora_and_tokenizers_are_refused_before_the_model_changes(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    src = tiny_model_dir("llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    data = DataOptions(source=text_file, seq_len=32, eval_windows=16)
    with pytest.raises(LmpressError, match="domain corpus is empty"):
        compress(src, {"stages": [{"method": "vocab", "data": str(empty)}]}, data, run_eval=False)
    # a BPE without byte-level alphabet or byte fallback cannot encode every text once pruned
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    spec["decoder"] = None
    (src / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(LmpressError, match="neither a byte-level alphabet nor byte fallback"):
        compress(src, {"stages": [{"method": "vocab"}]}, data, run_eval=False)
    spec["model"] = {"type": "WordLevel", "vocab": spec["model"]["vocab"], "unk_token": "<|endoftext|>"}
    (src / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(LmpressError, match="WordLevel tokenizers are not supported"):
        compress(src, {"stages": [{"method": "vocab"}]}, data, run_eval=False)
