"""The mask library: exact sparsities, N:M structure, global thresholds, OWL allocation."""

from __future__ import annotations

import pytest
import torch

from lmpress.prune.masks import (
    PruneError,
    check_nm,
    global_threshold,
    mask_from_scores,
    nm_mask,
    owl_sparsities,
    parse_pattern,
    topk_mask,
)


def test_topk_mask_per_row_and_per_layer() -> None:
    torch.manual_seed(0)
    s = torch.rand(8, 100)
    row = topk_mask(s, 0.3)
    assert (row.sum(1) == 70).all()
    layer = topk_mask(s, 0.3, per_row=False)
    assert int(layer.sum()) == 560
    assert s[layer].min() >= s[~layer].max()  # the kept scores are the largest
    assert topk_mask(s, 0.0).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_n_largest_of_every_m(n: int, m: int) -> None:
    torch.manual_seed(0)
    s = torch.rand(6, 32)
    mask = nm_mask(s, n, m)
    groups = mask.view(6, -1, m)
    assert (groups.sum(-1) == n).all()
    sg = s.view(6, -1, m)
    assert (sg.masked_fill(~groups, 2).amin(-1) >= sg.masked_fill(groups, -1).amax(-1)).all()
    assert torch.equal(mask_from_scores(s, 0.9, (n, m)), mask)  # the pattern decides the sparsity


def test_patterns_and_bad_input() -> None:
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "2:2", "0:4", "2-4", "half"):
        with pytest.raises(ValueError, match="N:M"):
            parse_pattern(bad)
    with pytest.raises(PruneError, match="not a multiple of M=8"):
        check_nm("layer", 100, (4, 8))


def test_global_threshold_hits_the_sparsity() -> None:
    torch.manual_seed(0)
    scores = [torch.rand(10, 10), 2 * torch.rand(20, 5)]
    t = global_threshold(scores, 0.4)
    pruned = sum(int((s <= t).sum()) for s in scores)
    assert pruned == 80


def test_owl_prunes_outlier_layers_less_and_keeps_the_total() -> None:
    sp = owl_sparsities([0.01, 0.05, 0.02], [100, 100, 200], 0.5, 0.08)
    assert sp[1] < sp[2] < sp[0]
    assert sp[0] - sp[1] == pytest.approx(0.16)
    assert (sp[0] * 100 + sp[1] * 100 + sp[2] * 200) / 400 == pytest.approx(0.5)
    assert owl_sparsities([0.1, 0.1], [5, 5], 0.5, 0.08) == [0.5, 0.5]
