"""Evaluation metrics: perplexity matches the model's own loss, KL/agreement, size, speed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.evaluation import count_parameters, evaluate, quality, tensor_bytes
from lmpress.io.load import load_model


def test_perplexity_matches_model_loss(tiny_model_dir: Callable[..., Path]) -> None:
    model = load_model(tiny_model_dir("llama")).model
    torch.manual_seed(0)
    w = torch.randint(0, 500, (4, 32))
    m = quality(model, w, batch_size=3)
    with torch.no_grad():
        loss = model(input_ids=w, labels=w).loss
    assert m["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert m["eval_tokens"] == 4 * 31
    assert 0 <= m["accuracy"] <= 1


def test_kl_and_agreement_against_self_and_other(tiny_model_dir: Callable[..., Path]) -> None:
    model = load_model(tiny_model_dir("gpt2")).model
    w = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    same = quality(model, w, reference=model)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0
    noisy = load_model(tiny_model_dir("gpt2")).model
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other = quality(noisy, w, reference=model)
    assert other["kl"] > 1e-4 and other["top1_agreement"] < 1.0


def test_size_counts_tied_weights_once(tiny_model_dir: Callable[..., Path]) -> None:
    model = load_model(tiny_model_dir("gpt2")).model  # GPT-2 ties lm_head to wte
    unique = {id(p): p for p in model.parameters()}
    assert count_parameters(model) == sum(p.numel() for p in unique.values())
    assert tensor_bytes(model) >= 4 * count_parameters(model)


def test_evaluate_reports_every_metric(tiny_model_dir: Callable[..., Path]) -> None:
    path = tiny_model_dir("qwen2")
    model = load_model(path).model
    w = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    m = evaluate(model, w, reference=model, saved_dir=path)
    for key in (
        "perplexity",
        "accuracy",
        "kl",
        "top1_agreement",
        "parameters",
        "bytes_on_disk",
        "bits_per_weight",
        "prefill_tokens_per_s",
        "batched_prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_memory_mb",
    ):
        assert key in m and m[key] >= 0, key
    assert m["bytes_on_disk"] == (path / "model.safetensors").stat().st_size
    assert 31.9 < m["bits_per_weight"] < 32.5  # fp32 on disk, plus the safetensors header
