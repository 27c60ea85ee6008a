"""A Hessian that does not factor at the configured damping: every second-order solver raises the
damping step by step (as GPTQModel does) until it factors, says so, and reports the damping it used."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lmpress.cluster import assign_with_feedback
from lmpress.data_options import DataOptions
from lmpress.lowrank import whitening
from lmpress.pipeline import compress
from lmpress.prune.sparsegpt import sparsegpt_prune
from lmpress.quant.base import QuantError
from lmpress.quant.damping import MAX_DAMP, damp_steps, with_damping
from lmpress.quant.gptq import gptq_solve
from lmpress.quant.grid import quantize


def indefinite(n: int = 64, negative: float = -0.05) -> Tensor:
    """Q diag(1, ..., 1, negative) Qᵀ: mean diagonal about 1, so damp 0.01 leaves it indefinite and
    0.1 makes it positive definite.  (n, n)"""
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    eig = torch.ones(n, dtype=torch.float64)
    eig[-1] = negative
    return ((Q * eig) @ Q.T).float()


def test_the_steps_grow_tenfold_up_to_the_cap() -> None:
    assert list(damp_steps(0.01)) == pytest.approx([0.01, 0.1, 1.0])
    assert list(damp_steps(0.05)) == pytest.approx([0.05, 0.5, MAX_DAMP])
    assert list(damp_steps(2.0)) == [2.0]


def test_gptq_raises_the_damping_until_the_hessian_factors(caplog: pytest.LogCaptureFixture) -> None:
    H = indefinite()
    assert torch.linalg.cholesky_ex(H + 0.01 * H.diagonal().mean() * torch.eye(64)).info != 0  # fails as given
    W = torch.randn(16, 64)
    with caplog.at_level(logging.WARNING, logger="lmpress.quant.damping"):
        q, used = gptq_solve(W, H, 4, 16, damp=0.01, what="GPTQ layer.0")
    assert used == pytest.approx(0.1)
    assert "GPTQ layer.0: the Hessian is not positive definite at damp 0.01; solved with damp 0.1" in caplog.text
    err = (q.dequantize() - W).pow(2).mean() / (quantize(W, 4, 16).dequantize() - W).pow(2).mean()
    assert torch.isfinite(q.dequantize()).all() and float(err) < 3  # a usable solve, near round-to-nearest's error
    _, ordinary = gptq_solve(W, torch.eye(64), 4, 16, damp=0.01)
    assert ordinary == 0.01  # a Hessian that factors keeps the configured damping, without a warning


def test_every_solver_raises_the_damping() -> None:
    H = indefinite()
    W = torch.randn(16, 64)
    pruned = sparsegpt_prune(W, H, 0.5, damp=0.01)
    assert torch.isfinite(pruned.weight).all() and float((pruned.weight == 0).float().mean()) == pytest.approx(0.5)
    L = whitening(H, 0.01)
    torch.testing.assert_close(L @ L.T, H.double() + 0.1 * H.diagonal().mean().double() * torch.eye(64).double())
    idx = assign_with_feedback(W, H, torch.linspace(-2, 2, 8)[None], damp=0.01)
    assert idx.shape == (16, 64) and int(idx.max()) < 8


def test_a_hessian_no_damping_mends_is_one_line() -> None:
    H = torch.full((8, 8), float("nan"))
    with pytest.raises(QuantError, match=r"^GPTQ x: the Hessian is not positive definite even with damp 1 ") as e:
        gptq_solve(torch.randn(4, 8), H, 4, None, what="GPTQ x")
    assert "\n" not in str(e.value)
    with pytest.raises(QuantError, match="even with damp 1"):
        with_damping(lambda lam: None, 0.01, "cluster", QuantError)


def test_the_stage_report_gives_each_layers_damping(
    tiny_model_dir: Callable[..., Path], text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTQ W4 on a tiny OPT: every layer's damping is in the report; one whose Hessian is made
    indefinite (as rounding in OPT's outlier channels can leave it) is solved at a raised damping."""
    from lmpress.calib import InputStats

    real = InputStats.update
    bad = indefinite(64, negative=-0.05)

    def update(self: InputStats, x: Tensor) -> None:
        real(self, x)
        if self.H.shape[0] == 64:  # the attention's and fc1's inputs: made indefinite
            self.H.copy_(bad * self.H.diagonal().mean())

    monkeypatch.setattr(InputStats, "update", update)
    data = DataOptions(source=text_file, seq_len=64, eval_windows=2, calib_windows=8)
    r = compress(
        tiny_model_dir("opt"),
        {"stages": [{"method": "gptq", "bits": 4, "group_size": 32}]},
        data,
        run_eval=False,
        measure_speed=False,
    )
    report = r.stages[0]
    assert len(report["damp"]) == 12  # 2 blocks x (q, k, v, out, fc1, fc2)
    raised = {n for n, d in report["damp"].items() if d > 0.01}
    assert raised == set(report["damp_raised"]) and all(n.endswith("fc2") is False for n in raised)
    assert len(raised) == 10 and all(report["damp"][n] == pytest.approx(0.1) for n in raised)
