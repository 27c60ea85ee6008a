"""The reference model: training pieces, and the shipped checkpoint itself."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from lmpress.distill.train import lr_at
from lmpress.io.load import BUILTIN_DIR, load_model
from lmpress.models.reference import EOS, epoch_batches


def test_lr_schedule_warmup_then_cosine() -> None:
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_epoch_batches_cover_the_stream_once() -> None:
    stream = torch.arange(1000)
    b = epoch_batches(stream, seq_len=10, batch_size=4, gen=torch.Generator().manual_seed(0))
    assert b.shape == (24, 4, 10)
    flat = b.reshape(-1, 10)
    assert len(set(flat[:, 0].tolist())) == flat.shape[0]  # no window twice
    assert ((flat[:, 1:] - flat[:, :-1]) == 1).all()  # windows are contiguous text


def test_builtin_checkpoint_loads_and_is_described() -> None:
    loaded = load_model("builtin")
    cfg = loaded.model.config
    assert cfg.model_type == "llama" and not cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.hidden_size % 128 == 0 and cfg.intermediate_size % 128 == 0
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.tokenizer.eos_token == EOS
    info = json.loads((BUILTIN_DIR / "reference" / "training.json").read_text())
    card = (BUILTIN_DIR / "reference" / "README.md").read_text()
    ppl = info["card"]["eval"]["perplexity"]
    assert ppl < 30
    assert f"{ppl:.3f}" in card and f"{info['train_minutes']:.1f} minutes" in card
    # compression must show on it: 3-bit and 2-bit RTN cost clearly more than 4-bit
    rtn = {b: m["perplexity"] / ppl - 1 for b, m in info["card"]["rtn_g128"].items()}
    assert 0 < rtn["4"] < rtn["3"] < rtn["2"]


def test_builtin_generates_python() -> None:
    loaded = load_model("builtin")
    ids = loaded.tokenizer("def ", return_tensors="pt").input_ids
    out = loaded.model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
    text = loaded.tokenizer.decode(out[0])
    assert "(" in text and ":" in text
