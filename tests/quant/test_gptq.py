"""GPTQ: the math beats round-to-nearest on output error; end to end on Llama and GPT-2 shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.nn.quant_linear import QuantLinear
from lmpress.pipeline import compress
from lmpress.quant.gptq import gptq_quantize
from lmpress.quant.grid import quantize


def _layer_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    X = torch.randn(2048, 128) @ (0.3 * torch.randn(128, 128) + torch.eye(128))  # correlated inputs
    X[:, :4] *= 10  # outlier channels
    W = 0.05 * torch.randn(64, 128)
    return X, W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize(
    ("bits", "group", "act_order", "max_ratio"),
    [(4, 32, False, 0.4), (4, 32, True, 0.4), (3, None, True, 0.4), (2, 32, True, 0.6), (4, 48, True, 0.4)],
)
def test_gptq_output_error_well_below_rtn(bits: int, group: int | None, act_order: bool, max_ratio: float) -> None:
    X, W, H = _layer_problem()
    q = gptq_quantize(W, H, bits, group, act_order=act_order, block_size=32)
    assert q.codes.shape == W.shape and int(q.codes.max()) < 2**bits
    err = (X @ (q.dequantize() - W).T).pow(2).mean()
    err_rtn = (X @ (quantize(W, bits, group).dequantize() - W).T).pow(2).mean()
    assert err / err_rtn < max_ratio


def _textbook_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group: int, damp: float) -> torch.Tensor:
    """Frantar et al.'s algorithm one column at a time, no lazy blocks, groups found as they start:
    the dequantized weight."""
    W, H = W.double().clone(), H.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    qmax = 2**bits - 1
    for c in range(W.shape[1]):
        if c % group == 0:
            lo = W[:, c : c + group].amin(1).clamp(max=0)
            hi = W[:, c : c + group].amax(1).clamp(min=0)
            s = ((hi - lo) / qmax).clamp(min=1e-8)
            z = (-lo / s).round()
        q = (W[:, c] / s + z).round().clamp(0, qmax)
        Q[:, c] = (q - z) * s
        err = (W[:, c] - Q[:, c]) / U[c, c]
        W[:, c:] -= err[:, None] * U[c, c:][None, :]
    return Q.float()


@pytest.mark.parametrize(("group", "block_size"), [(32, 32), (32, 128), (48, 40), (64, 16)])
def test_gptq_lazy_blocks_are_the_textbook_algorithm(group: int, block_size: int) -> None:
    """The two levels of lazy updates (blocks, sub-blocks, groups that break them) regroup the
    textbook column-at-a-time updates: the same weights up to float rounding."""
    X, W, H = _layer_problem()
    ref = _textbook_gptq(W, H, 4, group, damp=0.01)
    q = gptq_quantize(W, H, 4, group, act_order=False, block_size=block_size).dequantize()
    same = torch.isclose(q, ref, rtol=0, atol=1e-6).float().mean()
    assert same > 0.995  # a code or two may round the other way at a tie
    assert (X @ (q - ref).T).pow(2).mean() < 1e-3 * (X @ (ref - W).T).pow(2).mean()


def test_gptq_with_identity_hessian_is_round_to_nearest() -> None:
    torch.manual_seed(0)
    W = torch.randn(16, 64)
    q = gptq_quantize(W, torch.eye(64), 4, 16, act_order=False, damp=1e-6)
    torch.testing.assert_close(q.dequantize(), quantize(W, 4, 16).dequantize())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_end_to_end_beats_rtn(
    arch: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=8, calib_windows=16)
    src = tiny_model_dir(arch)
    stage = {"bits": 3, "group_size": 32}
    rtn = compress(src, {"stages": [{"method": "rtn", **stage}]}, data, measure_speed=False)
    out = tmp_path / "gptq"
    gptq = compress(src, {"stages": [{"method": "gptq", **stage}]}, data, output=out, measure_speed=False)
    assert sum(isinstance(m, QuantLinear) for m in gptq.model.modules()) == {"llama": 14, "gpt2": 8}[arch]
    assert gptq.metrics["compressed"]["kl"] < 0.7 * rtn.metrics["compressed"]["kl"]
    ids = torch.arange(48)[None] % 300
    with torch.no_grad():
        assert torch.equal(load_model(out).model(input_ids=ids).logits, gptq.model(input_ids=ids).logits)


def test_too_few_calibration_tokens_is_an_error(tiny_model_dir: Callable[..., Path], text_file: Path) -> None:
    data = DataOptions(source=text_file, seq_len=16, eval_windows=2, calib_windows=2)  # 32 tokens < width 64
    with pytest.raises(LmpressError, match="saw 32 calibration tokens; GPTQ needs at least 64"):
        compress(tiny_model_dir("llama"), {"stages": [{"method": "gptq"}]}, data, run_eval=False)


def test_layer_without_calibration_tokens(
    tiny_model_dir: Callable[..., Path], text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expert that is never routed to: an error naming it, or round-to-nearest if the recipe says so."""
    from lmpress.calib import collect as real_collect

    def starve_v_proj(block, inputs, layers, make):  # type: ignore[no-untyped-def]
        stats = real_collect(block, inputs, layers, make)
        for name in stats:
            if name.endswith("v_proj"):
                stats[name] = make(layers[name])  # as if no token reached it
        return stats

    monkeypatch.setattr("lmpress.quant.base.collect", starve_v_proj)  # where GPTQ's calibration calls it
    data = DataOptions(source=text_file, seq_len=64, eval_windows=2, calib_windows=8)
    with pytest.raises(LmpressError, match=r"layer model.layers.0.self_attn.v_proj received no calibration tokens"):
        compress(tiny_model_dir("llama"), {"stages": [{"method": "gptq"}]}, data, run_eval=False)
    r = compress(
        tiny_model_dir("llama", "again"), {"stages": [{"method": "gptq", "uncalibrated": "rtn"}]}, data, run_eval=False
    )
    assert sum(isinstance(m, QuantLinear) for m in r.model.modules()) == 14


def test_calibration_manifest_is_recorded(tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path) -> None:
    import json

    data = DataOptions(source=text_file, seq_len=64, eval_windows=2, calib_windows=8)
    r = compress(tiny_model_dir("llama"), "w4", data, output=tmp_path / "o", measure_speed=False)
    meta = json.loads((tmp_path / "o" / "lmpress.json").read_text())
    assert meta["calibration"]["split"] == "calib" and meta["calibration"]["windows"] == 8
    assert meta["calibration"]["sha256"] != meta["data"]["sha256"]  # calibrated and evaluated on different text
    assert r.calibration == meta["calibration"]


@pytest.mark.parametrize("n", [7, 33, 100])
def test_the_triangular_inverse_by_halves(n: int) -> None:
    from lmpress.quant.gptq import lower_triangular_inverse

    torch.manual_seed(n)
    x = torch.randn(n + 8, n, dtype=torch.float64)
    L = torch.linalg.cholesky(x.T @ x)
    out = torch.full((n, n), float("nan"), dtype=torch.float64)
    lower_triangular_inverse(L, out, leaf=4)
    torch.testing.assert_close(out @ L, torch.eye(n, dtype=torch.float64))
    assert torch.equal(out, out.tril())
