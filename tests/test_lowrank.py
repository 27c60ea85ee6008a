"""Low-rank factorization: the whitened truncation math, budget allocation, end to end, save/reload."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.lowrank import allocate, spectrum, whitening
from lmpress.nn import LowRankLinear
from lmpress.pipeline import compress


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    X = torch.randn(4096, 64) @ (torch.randn(64, 64) * 0.3 + torch.eye(64))
    X[:, :4] *= 8  # a few strong input directions, as in real activations
    return X, torch.randn(48, 64) / 8


def test_whitened_truncation_error_is_the_discarded_singular_values_and_beats_plain_svd() -> None:
    X, W = _problem()
    H = X.T.double() @ X.double()
    sp = spectrum(W, whitening(H, 1e-9))
    u, v = sp.factors(16)
    err = float((X.double() @ (W.double() - (u @ v).double()).T).pow(2).sum())
    assert err == pytest.approx(float(sp.s[16:].double().pow(2).sum()), rel=1e-3)  # truncation-aware
    assert float(sp.error()[16]) == pytest.approx(err / float(sp.s.double().pow(2).sum()), rel=1e-3)
    pu, pv = spectrum(W, None).factors(16)
    plain = float((X.double() @ (W.double() - (pu @ pv).double()).T).pow(2).sum())
    assert err < 0.6 * plain
    full_u, full_v = sp.factors(48)
    torch.testing.assert_close(full_u @ full_v, W, atol=1e-4, rtol=1e-3)  # full rank is exact


def test_allocation_meets_the_budget_and_gives_rank_where_it_matters() -> None:
    torch.manual_seed(0)
    flat = torch.randn(64, 64)  # every direction matters
    low = torch.randn(64, 4) @ torch.randn(4, 64) + 0.01 * torch.randn(64, 64)  # nearly rank 4
    spectra = {"flat": spectrum(flat, None), "low": spectrum(low, None)}
    ranks = allocate(spectra, budget=int(0.3 * 2 * 64 * 64))
    assert ranks["flat"] is None  # the whole budget comes from the nearly low-rank layer
    assert ranks["low"] == 12  # the largest rank that still saves 30% of both: 4096 - 12 * 128 >= 2457
    saved = sum(64 * 64 - (r * 128 if r is not None else 64 * 64) for r in ranks.values())
    assert saved >= 0.3 * 2 * 64 * 64
    with pytest.raises(LmpressError, match="lower target"):
        allocate(spectra, budget=2 * 64 * 64)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_end_to_end_activation_aware_beats_plain_and_reloads(
    arch: str, trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=distill_text, seq_len=32, eval_windows=64, calib_windows=32)
    src = trained_dir(arch)
    out = tmp_path / "lr"
    aware = compress(src, {"stages": [{"method": "lowrank", "target": 0.3}]}, data, output=out, measure_speed=False)
    plain = compress(
        src, {"stages": [{"method": "lowrank", "target": 0.3, "whiten": False}]}, data, measure_speed=False
    )
    layers = [m for m in aware.model.modules() if isinstance(m, LowRankLinear)]
    assert layers and all(m.rank * (m.in_features + m.out_features) < m.in_features * m.out_features for m in layers)
    assert aware.stages[0]["removed_share"] >= 0.3
    assert aware.metrics["compressed"]["kl"] < 0.5 * plain.metrics["compressed"]["kl"]
    assert aware.metrics["compressed"]["bytes"] < 0.9 * aware.metrics["original"]["bytes"]
    reloaded = load_model(out).model
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, aware.model(input_ids=ids).logits)


def test_distillation_recovers_a_factorized_model(trained_dir: Callable[[str], Path], distill_text: Path) -> None:
    data = DataOptions(source=distill_text, seq_len=32, eval_windows=64, calib_windows=32)
    src = trained_dir("llama")
    factorize = {"method": "lowrank", "target": 0.6}
    before = compress(src, {"stages": [factorize]}, data, measure_speed=False)
    train = {"method": "distill", "steps": 30, "batch_size": 8, "lr": 3e-4, "eval_every": 10, "precision": "fp32"}
    after = compress(src, {"stages": [factorize, train]}, data, measure_speed=False)
    assert after.metrics["compressed"]["kl"] < 0.7 * before.metrics["compressed"]["kl"]
    ranks = [m.rank for m in after.model.modules() if isinstance(m, LowRankLinear)]
    assert ranks == [m.rank for m in before.model.modules() if isinstance(m, LowRankLinear)]  # same shapes
