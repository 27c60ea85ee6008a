"""Module selection by exact name or ``re:`` full-match regex."""

from torch import nn

from lmpress.select import matches, select


def test_matches_exact_and_regex() -> None:
    assert matches("lm_head", ["lm_head"])
    assert not matches("lm_head2", ["lm_head"])
    assert matches("model.layers.0.mlp.up_proj", [r"re:.*mlp\..*_proj"])
    assert not matches("model.layers.0.mlp.up_proj.x", [r"re:.*mlp\..*_proj"])  # full match only


def test_select_targets_minus_ignore() -> None:
    named = {"a.q": nn.Linear(2, 2), "a.k": nn.Linear(2, 2), "lm_head": nn.Linear(2, 2)}
    assert list(select(named, ["re:.*"], ["lm_head"])) == ["a.q", "a.k"]
    assert list(select(named, ["re:a\\..*"], ["a.k"])) == ["a.q"]
