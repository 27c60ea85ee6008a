"""Scoring one trial: the evaluator on selection windows, the constraints, the speed-up, the record."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmpress.data import spread
from lmpress.evaluation import quality, tensor_bytes
from lmpress.method import Context
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe
from lmpress.recipe_search.space import (
    Budget,
    SearchError,
)
from lmpress.speed import speed


@dataclass
class Evaluator:
    """Applies a trial's recipe to a copy of the model and measures it on the selection windows."""

    model: nn.Module
    tokenizer: Any
    calib: Any  # TokenData used for calibration
    select_windows: Tensor  # calibration-split windows the calibration does not use
    base_ppl: float
    train: Any = None  # TokenData of the train split, for recovery stages

    def compress(self, recipe: dict[str, Any], start: nn.Module | None = None) -> tuple[nn.Module, int]:
        """A copy of ``start`` (default: the original) with the recipe's stages applied, and its bytes."""
        model = copy.deepcopy(self.model if start is None else start)
        if not recipe["stages"]:
            return model, tensor_bytes(model)
        ctx = Context(
            tokenizer=self.tokenizer,
            device=next(self.model.parameters()).device,  # where the model is: a GPU search calibrates there
            calibration=lambda: self.calib,
            training=(lambda: self.train) if self.train is not None else None,
            teacher=self.model,
        )
        run_stages(model, parse_recipe(recipe), ctx, announce=False)  # a trial's stages: no line each
        return model, tensor_bytes(model)

    def measure(self, model: nn.Module, windows: Tensor | None = None) -> dict[str, float]:
        return quality(model, self.select_windows if windows is None else windows, reference=self.model, batch_size=16)


def calibration_and_selection(every: Any, calib_windows: int, select_windows: int) -> Any:
    """``every`` (all windows of the calibration split) cut into what `run_search` takes: first the
    ``calib_windows`` windows a compress run with that many calibration windows uses (spread evenly,
    as `lmpress.data.windows` picks them), then ``select_windows`` others, spread over the rest. So
    the found recipe, run alone with ``calib_windows``, calibrates on exactly the trial's windows."""
    n = every.windows.shape[0]
    if n < calib_windows + select_windows:
        raise SearchError(
            f"search: {n} calibration-split windows, need {calib_windows + select_windows} ({calib_windows} to "
            f"calibrate + {select_windows} to select on); give more text or fewer windows"
        )
    chosen = spread(n, calib_windows)  # the windows `load_windows(..., calib_windows)` returns
    rest = torch.ones(n, dtype=torch.bool)
    rest[chosen] = False
    others = rest.nonzero().squeeze(1)
    picked = others[spread(len(others), select_windows)]
    return dataclasses.replace(every, windows=torch.cat([every.windows[chosen], every.windows[picked]]))


def _goal_value(attrs: dict[str, Any], goal: str) -> float:
    """What the search minimizes for a measured trial (speedup is maximized)."""
    return -float(attrs["speedup"]) if goal == "speedup" else float(attrs[goal])


def objective_values(attrs: dict[str, Any], goal: str, multi_objective: bool) -> float | tuple[float, float]:
    """A measured trial's value for Optuna: the goal, and its bytes beside it when there are two objectives."""
    value = _goal_value(attrs, goal)
    return (value, float(attrs["bytes"])) if multi_objective else value


def _scored(ev: Evaluator, compressed: nn.Module, nbytes: int, budget: Budget, speedup: float | None) -> dict[str, Any]:
    """A compressed model's selection metrics and how far outside each budget it is (<= 0: within)."""
    m = ev.measure(compressed)
    ppl_inc = m["perplexity"] / ev.base_ppl - 1
    cons = [
        nbytes - budget.max_bytes if budget.max_bytes is not None else 0.0,
        ppl_inc - budget.max_ppl_increase if budget.max_ppl_increase is not None else 0.0,
    ]
    out: dict[str, Any] = {"bytes": nbytes, "perplexity": m["perplexity"], "kl": m["kl"], "ppl_increase": ppl_inc}
    if speedup is not None:
        out["speedup"] = speedup
        cons.append(budget.min_speedup - speedup if budget.min_speedup is not None else 0.0)
    out["constraints"] = cons
    return out


CONSTRAINTS = ("bytes_over", "ppl_increase_over", "speedup_short")


def _constrain(trial: Any, values: list[float]) -> None:
    """Tell the sampler how far outside each budget the trial is (<= 0: within)."""
    for key, value in zip(CONSTRAINTS, values, strict=False):
        trial.set_constraint(key, float(value))


def _trial_record(t: Any) -> dict[str, Any]:
    rec = {"number": t.number, "state": t.state.name, "params": t.params, **t.user_attrs}
    rec["duration"] = t.duration.total_seconds() if t.duration else t.user_attrs.get("seconds")
    return rec


def _speedup(base: nn.Module, model: nn.Module, kind: str) -> float:
    """Tokens/s of ``model`` over the original's, decode (batch 1, KV cache) or prefill; both timed here,
    one after the other, so that the ratio holds on a noisy machine."""
    key = "decode_tokens_per_s" if kind == "decode" else "prefill_tokens_per_s"
    vocab = int(base.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    a = speed(base, vocab, prompt_len=64, decode_tokens=32, repeats=2)[key]
    b = speed(model, vocab, prompt_len=64, decode_tokens=32, repeats=2)[key]
    return b / a
