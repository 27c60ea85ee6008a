"""Magnitude, Wanda and SparseGPT: the math, end to end on Llama and GPT-2 shapes, bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.nn.sparse_linear import SparseLinear
from lmpress.pipeline import compress
from lmpress.prune.masks import mask_from_scores
from lmpress.prune.sparsegpt import sparsegpt_prune


def _layer_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    X = torch.randn(2048, 128) @ (0.3 * torch.randn(128, 128) + torch.eye(128))  # correlated inputs
    X[:, ::16] *= 10  # outlier channels, one in every fourth group of 4
    W = 0.05 * torch.randn(64, 128)
    return X, W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_output_error_below_wanda_below_magnitude(pattern: tuple[int, int] | None) -> None:
    X, W, H = _layer_problem()
    r = sparsegpt_prune(W, H, 0.5, pattern, block_size=32)
    assert float((~r.mask).float().mean()) == pytest.approx(0.5)
    assert torch.equal(r.weight * r.mask, r.weight)  # pruned weights are exactly zero
    if pattern:
        assert (r.mask.view(64, -1, 4).sum(-1) == 2).all()

    def err(w: torch.Tensor) -> float:
        return float((X @ (w - W).T).pow(2).mean())

    mag = W * mask_from_scores(W.abs(), 0.5, pattern, per_row=False)
    wanda = W * mask_from_scores(W.abs() * X.pow(2).mean(0).sqrt(), 0.5, pattern)
    assert err(r.weight) < 0.8 * err(wanda) and err(wanda) < 0.6 * err(mag)


def test_sparsegpt_joint_quantization_codes_match_the_weights() -> None:
    X, W, H = _layer_problem()
    r = sparsegpt_prune(W, H, 0.5, (2, 4), block_size=32, bits=4, group_size=32)
    assert r.q is not None
    deq = r.q.dequantize() * r.mask
    torch.testing.assert_close(deq, r.weight * r.mask)  # the stored codes are the reconstructed weights
    dense_only = sparsegpt_prune(W, H, 0.5, (2, 4), block_size=32)
    e_joint = float((X @ (r.weight - W).T).pow(2).mean())
    e_sparse = float((X @ (dense_only.weight - W).T).pow(2).mean())
    assert e_sparse < e_joint < 2 * e_sparse  # 4 bits on top of 2:4 costs little more


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_end_to_end_wanda_and_sparsegpt_beat_magnitude(
    arch: str, tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=8, calib_windows=16)
    src = tiny_model_dir(arch)
    kl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = tmp_path / method
        r = compress(src, {"stages": [{"method": method, "sparsity": 0.6}]}, data, output=out, measure_speed=False)
        sparse = [m for m in r.model.modules() if isinstance(m, SparseLinear)]
        assert len(sparse) == {"llama": 14, "gpt2": 8}[arch]
        assert r.stages[0]["sparsity"] == pytest.approx(0.6, abs=0.01)
        kl[method] = r.metrics["compressed"]["kl"]
        ratio = r.metrics["compressed"]["bytes_on_disk"] / r.metrics["original"]["bytes_on_disk"]
        assert ratio < {"llama": 0.75, "gpt2": 0.9}[arch]  # GPT-2's tiny model is mostly embeddings
        ids = torch.arange(48)[None] % 300
        with torch.no_grad():
            assert torch.equal(load_model(out).model(input_ids=ids).logits, r.model(input_ids=ids).logits)
        meta = json.loads((out / "lmpress.json").read_text())
        assert {m["format"] for m in meta["modules"].values()} >= {"sparse"}
    assert kl["sparsegpt"] < 0.9 * kl["magnitude"]
    assert kl["wanda"] < 1.05 * kl["magnitude"]  # random-init weights have no outlier inputs for Wanda to use


def test_nm_and_joint_quantization_end_to_end(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=4, calib_windows=16)
    stage = {"method": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 32}
    r = compress(tiny_model_dir("llama"), {"stages": [stage]}, data, output=tmp_path / "o", measure_speed=False)
    layers = [m for m in r.model.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.bits == 4 and m.pattern == "2:4" for m in layers)
    for m in layers:
        assert (m.keep_mask().view(m.out_features, -1, 4).sum(-1) == 2).all()
    ids = torch.arange(32)[None]
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "o").model(input_ids=ids).logits, r.model(input_ids=ids).logits)


def test_owl_and_global_allocation(tiny_model_dir: Callable[..., Path], text_file: Path) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=2, calib_windows=8)
    r = compress(
        tiny_model_dir("llama"),
        {"stages": [{"method": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.1}]},
        data,
        measure_speed=False,
    )
    per_layer = r.stages[0]["layer_sparsity"]
    by_block = [[v for k, v in per_layer.items() if f"layers.{i}." in k] for i in (0, 1)]
    assert abs(sum(by_block[0]) / 7 - sum(by_block[1]) / 7) == pytest.approx(0.2, abs=0.02)  # 0.5 ± 0.1
    assert r.stages[0]["sparsity"] == pytest.approx(0.5, abs=0.01)
    g = compress(
        tiny_model_dir("llama", "g"),
        {"stages": [{"method": "magnitude", "sparsity": 0.5, "allocation": "global"}]},
        data,
        run_eval=False,
    )
    assert g.stages[0]["sparsity"] == pytest.approx(0.5, abs=0.001)
    assert len(set(g.stages[0]["layer_sparsity"].values())) > 2


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"method": "wanda", "sparsity": 1.0}, "less than 1"),
        ({"method": "wanda", "pattern": "4:2"}, "N:M"),
        ({"method": "wanda", "pattern": "3:7"}, "not a multiple of M=7"),
        ({"method": "wanda", "allocation": "global"}, "use it with magnitude"),
        ({"method": "sparsegpt", "targets": ["nothing"]}, "match no linear layer"),
    ],
)
def test_bad_input_fails_before_any_work(
    stage: dict[str, object], message: str, tiny_model_dir: Callable[..., Path], text_file: Path
) -> None:
    data = DataOptions(source=text_file, seq_len=64, eval_windows=2, calib_windows=4)
    with pytest.raises(LmpressError, match=message):
        compress(tiny_model_dir("llama"), {"stages": [stage]}, data, run_eval=False)


def test_gradual_pruning_in_steps(tiny_model_dir: Callable[..., Path], text_file: Path) -> None:
    """Stages at rising sparsity re-prune the previous stage's sparse layers; what was pruned stays pruned."""
    data = DataOptions(source=text_file, seq_len=64, eval_windows=4, calib_windows=16)
    src = tiny_model_dir("llama")
    stages = [{"method": "wanda", "sparsity": s} for s in (0.3, 0.5, 0.7)]
    r = compress(src, {"stages": stages}, data, measure_speed=False)
    assert [round(st["sparsity"], 2) for st in r.stages] == [0.3, 0.5, 0.7]
    layers = [m for m in r.model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 14 and all(abs(m.density - 0.3) < 0.01 for m in layers)
    one = compress(src, {"stages": [{"method": "wanda", "sparsity": 0.3}]}, data, run_eval=False)
    first = {n: m.keep_mask() for n, m in one.model.named_modules() if isinstance(m, SparseLinear)}
    for n, m in r.model.named_modules():
        if isinstance(m, SparseLinear):
            assert not (m.keep_mask() & ~first[n]).any()  # nothing pruned in step 1 came back
