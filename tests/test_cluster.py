"""Weight clustering: the k-means and codebook math, the packed layer, end to end, save/reload, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lmpress.cluster import ClusterConfig, refit_codebook, weighted_kmeans
from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.nn import CodebookLinear
from lmpress.pipeline import compress
from lmpress.recipe import parse_recipe


def test_weighted_kmeans_finds_the_weighted_means_of_separated_clusters() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.randn(1000) * 0.01 - 1, torch.randn(1000) * 0.01 + 2])[None]
    w = torch.cat([torch.ones(1000), 3 * torch.ones(1000)])[None]
    c, idx = weighted_kmeans(x, w, 2)
    torch.testing.assert_close(c[0].float(), torch.tensor([-1.0, 2.0]), atol=2e-3, rtol=0)
    assert idx[0, :1000].eq(0).all() and idx[0, 1000:].eq(1).all()
    # four centroids on a uniform line land at the quarter midpoints
    c4, _ = weighted_kmeans(torch.linspace(0, 1, 4001)[None], torch.ones(1, 4001), 4)
    torch.testing.assert_close(c4[0].float(), torch.tensor([0.125, 0.375, 0.625, 0.875]), atol=2e-3, rtol=0)


@pytest.mark.parametrize("shared", [True, False])
def test_codebook_refit_is_the_least_squares_optimum(shared: bool) -> None:
    torch.manual_seed(0)
    out_f, in_f, k = 6, 10, 4
    W = torch.randn(out_f, in_f, dtype=torch.float64)
    X = torch.randn(200, in_f, dtype=torch.float64)
    H = X.T @ X
    idx = torch.randint(0, k, (out_f, in_f))
    rw = torch.rand(out_f, dtype=torch.float64) + 0.5
    start = torch.zeros(1 if shared else out_f, k, dtype=torch.float64)
    c = refit_codebook(W, H, idx, start, damp=1e-12, row_weight=rw)

    def loss(book: torch.Tensor) -> torch.Tensor:
        Wq = book[0][idx] if shared else torch.gather(book, 1, idx)
        D = W - Wq
        return (rw * torch.einsum("ri,ij,rj->r", D, H, D)).sum()

    book = c.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(book), book)
    assert grad.abs().max() < 1e-6 * loss(c)  # stationary point of a convex quadratic: the optimum
    assert loss(c) < loss(c + 0.01 * torch.randn_like(c))


def test_codebook_layer_packs_its_indices_and_matches_its_weights() -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 16, (8, 40), dtype=torch.uint8)
    book = torch.randn(1, 16)
    scales = torch.rand(8) + 0.5
    layer = CodebookLinear.from_indices(idx, book, 4, torch.randn(8), torch.float16, scales)
    assert layer.qweight.shape == (8, 20) and layer.qweight.dtype == torch.uint8  # 4 bits per weight
    expected = book.half().float()[0][idx.long()] * scales.half().float()[:, None]
    torch.testing.assert_close(layer.dense_weight(), expected)
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), x @ expected.T + layer.bias, atol=1e-5, rtol=1e-5)


def test_bad_codebook_sizes_are_refused_before_any_work(tiny_model_dir: Callable[..., Path], text_file: Path) -> None:
    for bad in (12, 1, 512):
        with pytest.raises(ValidationError, match="power of two"):
            ClusterConfig(centroids=bad)
    src = tiny_model_dir("llama")
    recipe = {"stages": [{"method": "cluster", "centroids": 256, "per_channel": True}]}
    with pytest.raises(LmpressError, match="256 centroids for layer .* use fewer centroids"):
        compress(src, recipe, text_file, run_eval=False)
    with pytest.raises(LmpressError, match="power of two"):
        parse_recipe({"stages": [{"method": "cluster", "centroids": 100}]})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_clustering_beats_round_to_nearest_at_the_same_bits_and_reloads(
    arch: str, trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=distill_text, seq_len=32, eval_windows=64, calib_windows=32)
    src = trained_dir(arch)
    out = tmp_path / "c"
    clustered = compress(
        src, {"stages": [{"method": "cluster", "centroids": 16}]}, data, output=out, measure_speed=False
    )
    rtn = compress(src, {"stages": [{"method": "rtn", "bits": 4, "group_size": None}]}, data, measure_speed=False)
    plain = compress(
        src,
        {"stages": [{"method": "cluster", "centroids": 16, "weighting": "none", "error_feedback": False}]},
        data,
        measure_speed=False,
    )
    layers = [m for m in clustered.model.modules() if isinstance(m, CodebookLinear)]
    assert layers and all(m.bits == 4 and m.codebook.shape == (1, 16) for m in layers)
    kl = clustered.metrics["compressed"]["kl"]
    assert kl < rtn.metrics["compressed"]["kl"]
    assert kl < 0.8 * plain.metrics["compressed"]["kl"]  # sensitivity weighting and error feedback pay
    assert all(0 <= e < 0.2 for e in clustered.stages[0]["output_error"].values())
    reloaded = load_model(out).model
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, clustered.model(input_ids=ids).logits)
    assert clustered.metrics["compressed"]["bytes"] < clustered.metrics["original"]["bytes"]


def test_distillation_learns_the_codebook_and_keeps_the_indices(
    trained_dir: Callable[[str], Path], distill_text: Path
) -> None:
    data = DataOptions(source=distill_text, seq_len=32, eval_windows=64, calib_windows=32)
    src = trained_dir("llama")
    cluster = {"method": "cluster", "centroids": 4}  # 2-bit: much to recover
    before = compress(src, {"stages": [cluster]}, data, measure_speed=False)
    train = {"method": "distill", "steps": 30, "batch_size": 8, "lr": 1e-3, "eval_every": 10, "precision": "fp32"}
    after = compress(src, {"stages": [cluster, train]}, data, measure_speed=False)
    assert after.metrics["compressed"]["kl"] < 0.8 * before.metrics["compressed"]["kl"]
    b = {n: m for n, m in before.model.named_modules() if isinstance(m, CodebookLinear)}
    a = {n: m for n, m in after.model.named_modules() if isinstance(m, CodebookLinear)}
    assert a.keys() == b.keys() and a
    for name in a:  # the same clusters (indices renumbered only if centroids swapped order), new values
        assert torch.equal(a[name].codebook.float().sort(dim=1).values, a[name].codebook.float())
        wa, wb = a[name].dense_weight(), b[name].dense_weight()
        assert not torch.equal(wa, wb)
        same_cluster = b[name].indices()[:, :, None] == b[name].indices()[:, None, :]
        assert torch.equal(same_cluster, a[name].indices()[:, :, None] == a[name].indices()[:, None, :])
