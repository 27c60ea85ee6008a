"""Evaluation metrics: perplexity matches the model's own loss, KL/agreement, size, speed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmpress.evaluation import count_parameters, evaluate, kl_percentiles, quality, tensor_bytes
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
    assert same["kl_p999"] == pytest.approx(0.0, abs=1e-6) and same["kl_max"] == pytest.approx(0.0, abs=1e-6)
    # llama.cpp's --kl-divergence summary, from each predicted position's KL computed here directly
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=w).logits[:, :-1].float(), -1)
        got = F.log_softmax(noisy(input_ids=w).logits[:, :-1].float(), -1)
    per_token = (ref.exp() * (ref - got)).sum(-1).flatten().double().numpy()  # (2 * 15,)
    assert other["kl"] == pytest.approx(per_token.mean(), rel=1e-4)
    assert other["kl_median"] == pytest.approx(np.median(per_token), rel=1e-4)
    assert other["kl_p99"] == pytest.approx(np.percentile(per_token, 99), rel=1e-4)
    assert other["kl_p999"] == pytest.approx(np.percentile(per_token, 99.9), rel=1e-4)
    assert other["kl_max"] == pytest.approx(per_token.max(), rel=1e-4)
    assert other["kl_median"] < other["kl"] < other["kl_p99"] <= other["kl_p999"] <= other["kl_max"]
    top1 = (ref.argmax(-1) == got.argmax(-1)).double().mean().item()
    assert other["top1_agreement"] == pytest.approx(top1)


def test_kl_percentiles_interpolate_as_llama_cpp() -> None:
    kl = torch.tensor([0.4, 0.1, 0.3, 0.2])  # sorted 0.1 0.2 0.3 0.4: median between the middle two
    p = kl_percentiles(kl)
    assert p["kl_median"] == pytest.approx(0.25)
    assert p["kl_p99"] == pytest.approx(0.3 + 0.97 * 0.1)  # position 0.99 * 3 = 2.97
    assert p["kl_p999"] == pytest.approx(0.3 + 0.997 * 0.1)
    assert p["kl_max"] == pytest.approx(0.4)
    one = kl_percentiles(torch.tensor([0.5]))
    assert one["kl_median"] == one["kl_p999"] == pytest.approx(0.5)


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
        "kl_median",
        "kl_p99",
        "kl_p999",
        "kl_max",
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
