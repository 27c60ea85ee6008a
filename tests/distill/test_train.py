"""The training loop: schedule, deterministic batches, accumulation, early stopping, resume, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lmpress.distill.train import CHECKPOINT, TrainConfig, batch_at, lr_at, train
from lmpress.errors import TrainError


class Bigram(nn.Module):
    """A next-token model small enough to train in milliseconds: logits = E[x] @ W."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def loss(self, ids: Tensor) -> tuple[Tensor, dict[str, float]]:
        logits = self.out(self.emb(ids[:, :-1]))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        return loss, {"ce": float(loss.detach())}


def _data(n: int = 64, t: int = 17) -> Tensor:
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 32, (n, 1), generator=g)
    return (start + torch.arange(t)) % 32  # a learnable rule: next = current + 1


def _cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {"steps": 12, "batch_size": 8, "lr": 0.05, "eval_every": 4, "precision": "fp32"}
    return TrainConfig(**(base | kw))


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # monotone decay
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch() -> None:
    data = torch.arange(40).view(20, 2)
    epoch = torch.cat([batch_at(data, s, 4, seed=3) for s in range(5)])
    assert sorted(epoch[:, 0].tolist()) == data[:, 0].tolist()  # every window once per epoch
    assert torch.equal(batch_at(data, 2, 4, 3), batch_at(data, 2, 4, 3))
    assert not torch.equal(batch_at(data, 5, 4, 3), batch_at(data, 0, 4, 3))  # the next epoch reshuffles


def test_training_lowers_the_loss_and_accumulation_gives_the_same_step() -> None:
    m = Bigram()
    before = float(m.loss(_data())[0].detach())
    r = train(dict(m.named_parameters()), m.loss, _data(), _cfg(steps=40))
    assert float(m.loss(_data())[0].detach()) < 0.3 * before
    assert r.steps == 40 and r.tokens == 40 * 8 * 17

    a, b = Bigram(), Bigram()
    train(dict(a.named_parameters()), a.loss, _data(), _cfg())
    train(dict(b.named_parameters()), b.loss, _data(), _cfg(micro_batch_size=2))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


def test_early_stopping_keeps_the_best_parameters() -> None:
    m = Bigram()
    evals = iter([3.0, 1.0, 2.0, 2.5, 2.7, 2.9])
    snapshot: dict[int, Tensor] = {}

    def eval_fn() -> float:
        snapshot[len(snapshot)] = m.out.weight.detach().clone()
        return next(evals)

    r = train(dict(m.named_parameters()), m.loss, _data(), _cfg(steps=40, patience=2), eval_fn=eval_fn)
    assert r.stopped_early and r.steps == 16 and r.best_eval == 1.0
    assert torch.equal(m.out.weight, snapshot[1])  # the parameters of the second evaluation


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    straight = Bigram()
    train(dict(straight.named_parameters()), straight.loss, _data(), _cfg(checkpoint_every=2), run_dir=tmp_path / "a")

    m = Bigram()
    calls = 0

    def crashing(ids: Tensor) -> tuple[Tensor, dict[str, float]]:
        nonlocal calls
        calls += 1
        if calls == 8:  # dies in step 8, after the checkpoint of step 6
            raise KeyboardInterrupt
        return m.loss(ids)

    with pytest.raises(KeyboardInterrupt):
        train(
            dict(m.named_parameters()),
            crashing,
            _data(),
            _cfg(checkpoint_every=2),
            run_dir=tmp_path / "b",
            fingerprint="x",
        )
    assert json.loads((tmp_path / "b" / CHECKPOINT / "trainer.json").read_text())["step"] == 6
    resumed = Bigram()  # a fresh process: starts from the initial weights, the checkpoint restores step 6
    r = train(
        dict(resumed.named_parameters()),
        resumed.loss,
        _data(),
        _cfg(checkpoint_every=2),
        run_dir=tmp_path / "b",
        fingerprint="x",
    )
    assert r.resumed_from == 6 and r.steps == 12
    for pa, pb in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert list((tmp_path / "b" / "tensorboard").iterdir())  # curves were written

    with pytest.raises(TrainError, match="belongs to another run"):
        other = Bigram()
        train(
            dict(other.named_parameters()),
            other.loss,
            _data(),
            _cfg(checkpoint_every=2),
            run_dir=tmp_path / "b",
            fingerprint="y",
        )


def test_bad_budgets_and_data_are_clear_errors() -> None:
    m = Bigram()
    with pytest.raises(TrainError, match="fewer than one batch of 8"):
        train(dict(m.named_parameters()), m.loss, _data(n=5), _cfg())
    with pytest.raises(ValueError, match="steps"):
        _cfg(steps=0)
    with pytest.raises(TrainError, match="nothing to train"):
        train({}, m.loss, _data(), _cfg())
