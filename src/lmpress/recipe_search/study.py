"""The study: running the search in an Optuna database (resumable, shared by workers) and reading
its result."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lmpress.arch import Adapter
from lmpress.evaluation import quality, tensor_bytes
from lmpress.io import write_json_atomic
from lmpress.plots import pareto
from lmpress.recipe_search.recovery import recover
from lmpress.recipe_search.sensitivity import _seed_choices, _space_key, predicted_kl, sensitivity
from lmpress.recipe_search.space import SearchConfig, SearchError, _suggest, as_rtn, block_groups, build_recipe
from lmpress.recipe_search.storage import locked, open_study
from lmpress.recipe_search.trials import (
    Evaluator,
    _constrain,
    _goal_value,
    _scored,
    _speedup,
    _trial_record,
    objective_values,
)


@dataclass
class SearchResult:
    best: dict[str, Any] | None  # the best feasible trial: recipe, bytes, perplexity, kl, ...
    pareto: list[dict[str, Any]]  # feasible, non-dominated trials on (objective, bytes)
    trials: list[dict[str, Any]]
    original: dict[str, float]
    smallest_bytes: int
    seconds: float
    sensitivity: dict[str, float]


@dataclass
class _Setup:
    """What every trial shares: the evaluator on the selection windows, the block groups, where the
    blocks are, and the original's size and selection perplexity."""

    ev: Evaluator
    groups: list[list[int]]
    prefix: str
    original: dict[str, float]


def run_search(
    model: nn.Module,
    tokenizer: Any,
    calib: Any,
    config: SearchConfig,
    study_dir: Path,
    progress: bool = False,
    train: Any = None,
) -> SearchResult:
    """Run (or resume) the study; ``calib`` is calibration-split TokenData with at least
    ``calib_windows + select_windows`` windows; ``train`` (train-split TokenData) feeds recovery."""
    t0 = time.perf_counter()
    _check_request(config, calib, train)
    setup = _prepare(model, tokenizer, calib, config, train)
    smallest_choice, smallest = _smallest(setup, config)
    study_dir.mkdir(parents=True, exist_ok=True)  # only once the budget is known to be reachable
    with locked(study_dir / ".lock"):  # workers starting together: one measures and creates, the others read
        sens_file = study_dir / f"sensitivity-{_space_key(config.space, setup.groups)}.json"
        wanted = config.prune or config.seeds
        sens = sensitivity(setup.ev, config.space, setup.groups, setup.prefix, sens_file) if wanted else {}
        study = open_study(config, study_dir)
    if config.seeds and not study.trials:
        seeds = _seed_choices(config.space, len(setup.groups), sens, config.budget.max_bytes is not None)
        if config.budget.max_bytes is not None:  # the smallest recipe: feasible whenever anything is
            seeds.insert(0, {**smallest_choice, "method": config.space.methods[0]})
        for choice in seeds:
            study.enqueue_trial(choice, skip_if_exists=True)
    goal = _goal(config)
    _optimize(study, _Objective(setup, config, sens, goal), config, progress)
    if config.recovery.steps:
        recover(study, setup.ev, config, study_dir, goal)
    return _collect(study, setup, goal, int(smallest), sens, study_dir, t0)


def _check_request(config: SearchConfig, calib: Any, train: Any) -> None:
    """A budget, enough calibration-split windows, and the train split when recovery wants it."""
    budget = config.budget
    if (
        not config.multi_objective
        and budget.max_bytes is None
        and budget.max_ppl_increase is None
        and budget.min_speedup is None
    ):
        raise SearchError(
            "search: give a budget (--max-bytes, --max-ppl-increase or --min-speedup) or --multi-objective"
        )
    need = config.calib_windows + config.select_windows
    if calib.windows.shape[0] < need:
        raise SearchError(
            f"search: {calib.windows.shape[0]} calibration-split windows, need {need} "
            f"({config.calib_windows} to calibrate + {config.select_windows} to select on); "
            "give more text or fewer windows"
        )
    if config.recovery.steps and train is None:
        raise SearchError("search: recovery training needs the train split; give train data or set recovery steps to 0")


def _prepare(model: nn.Module, tokenizer: Any, calib: Any, config: SearchConfig, train: Any) -> _Setup:
    """The block groups, and the evaluator: the first ``calib_windows`` windows calibrate, the next
    ``select_windows`` score the trials (and the original, once)."""
    model.eval()
    adapter = Adapter(model)
    groups = block_groups(adapter.num_blocks, config.space.block_groups)
    if max(config.space.drop_blocks) >= adapter.num_blocks:
        raise SearchError(
            f"search: drop_blocks {max(config.space.drop_blocks)} leaves no block of {adapter.num_blocks}"
        )
    calibration = dataclasses.replace(calib, windows=calib.windows[: config.calib_windows])
    select = calib.windows[config.calib_windows : config.calib_windows + config.select_windows]
    ev = Evaluator(model, tokenizer, calibration, select, 0.0, train)
    ev.base_ppl = quality(model, select, batch_size=16)["perplexity"]
    original = {"bytes": float(tensor_bytes(model)), "perplexity": ev.base_ppl}
    return _Setup(ev, groups, adapter.spec.blocks, original)


def _smallest(setup: _Setup, config: SearchConfig) -> tuple[dict[str, Any], int]:
    """The smallest recipe in the space (every choice at its smallest) and its bytes; a size budget
    below it is refused before anything is written."""
    space, groups, prefix, ev = config.space, setup.groups, setup.prefix, setup.ev
    choice = {
        "method": "rtn",
        **{f"bits_g{g}": min(space.bits) for g in range(len(groups))},
        "group_size": max(space.group_sizes),
        "head_bits": min((b for b in space.head_bits if b), default=None),
        "embedding_bits": min((b for b in space.embedding_bits if b), default=None),
        **{f"sparsity_g{g}": max(space.sparsity) for g in range(len(groups))},
        "drop_blocks": max(space.drop_blocks),
    }
    _, smallest = ev.compress(as_rtn(build_recipe(choice, prefix, groups, "smallest")))
    if max(space.sparsity) > 0:  # a sparse layer keeps a mask: at few bits, dense may be the smaller
        dense_choice = {**choice, **{f"sparsity_g{g}": 0.0 for g in range(len(groups))}}
        _, dense_bytes = ev.compress(as_rtn(build_recipe(dense_choice, prefix, groups, "smallest")))
        if dense_bytes < smallest:
            choice, smallest = dense_choice, dense_bytes
    max_bytes = config.budget.max_bytes
    if max_bytes is not None and max_bytes < smallest:
        raise SearchError(
            f"search: no recipe in the space fits {max_bytes / 1e6:.2f} MB; the smallest reachable is "
            f"{smallest / 1e6:.2f} MB (every choice at its smallest: {min(space.bits)}-bit blocks, head and embeddings "
            "at their fewest bits); raise --max-bytes or widen the space"
        )
    return choice, smallest


def _goal(config: SearchConfig) -> str:
    """What the search minimizes: the objective asked for, else bytes when only the quality budget is
    given, else perplexity (bytes is already the second objective of a multi-objective search)."""
    budget = config.budget
    only_quality = budget.max_bytes is None and budget.min_speedup is None and budget.max_ppl_increase is not None
    goal = config.objective or ("bytes" if only_quality and not config.multi_objective else "perplexity")
    if config.multi_objective and goal == "bytes":
        goal = "perplexity"  # bytes is the second objective already
    return goal


@dataclass
class _Objective:
    """One trial: its recipe from the space, its size from a round-to-nearest proxy (same formats,
    same bytes), pruned when over the size budget or predicted far outside the quality budget, else
    compressed for real and scored on the selection windows."""

    setup: _Setup
    config: SearchConfig
    sens: dict[str, float]
    goal: str

    def __call__(self, trial: Any) -> float | tuple[float, float] | list[float]:
        ev, groups, budget = self.setup.ev, self.setup.groups, self.config.budget
        choice = _suggest(trial, self.config.space, len(groups))
        repeated = _repeat(trial, self.config.multi_objective)
        if repeated is not None:
            return repeated
        recipe = build_recipe(choice, self.setup.prefix, groups, f"search-{trial.number}")
        trial.set_user_attr("recipe", recipe)
        trial.set_user_attr("worker", os.getpid())
        t = time.perf_counter()
        # the stages the proxy shares with the trial (dropping, SparseGPT) run once, for both
        stages, fast = recipe["stages"], as_rtn(recipe)["stages"]
        shared = next((i for i, (a, b) in enumerate(zip(stages, fast, strict=True)) if a != b), len(stages))
        common = ev.compress({"stages": stages[:shared]})[0] if shared else None
        # same formats, same bytes, seconds not minutes
        proxy, nbytes = ev.compress({"stages": fast[shared:]}, start=common)
        trial.set_user_attr("bytes", nbytes)
        pred = predicted_kl(choice, self.sens, len(groups)) if self.sens else None
        trial.set_user_attr("predicted_kl", pred)
        self._prune(trial, nbytes, pred)
        exact = shared == len(stages)  # the proxy is the trial itself
        compressed = proxy if exact else ev.compress({"stages": stages[shared:]}, start=common)[0]
        timed_speed = budget.min_speedup is not None or self.goal == "speedup"
        speedup = _speedup(ev.model, compressed, budget.speed) if timed_speed else None
        attrs = _scored(ev, compressed, nbytes, budget, speedup)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        _constrain(trial, attrs["constraints"])
        trial.set_user_attr("seconds", time.perf_counter() - t)
        return objective_values(attrs, self.goal, self.config.multi_objective)

    def _prune(self, trial: Any, nbytes: int, pred: float | None) -> None:
        """Stop a trial over the size budget, or one whose predicted KL is hopeless for the quality budget."""
        import optuna

        budget = self.config.budget
        if self.config.prune and budget.max_bytes is not None and nbytes > budget.max_bytes:
            trial.set_user_attr("pruned_by", "size")
            raise optuna.TrialPruned()
        limit = budget.max_ppl_increase
        hopeless = pred is not None and limit is not None and math.exp(pred) - 1 > 4 * limit
        if self.config.prune and hopeless:
            trial.set_user_attr("pruned_by", "sensitivity")
            raise optuna.TrialPruned()


def _repeat(trial: Any, multi_objective: bool) -> float | list[float] | None:
    """When TPE proposed a recipe already measured, that trial's record and values (reused), else None."""
    import optuna

    for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if other.params == trial.params:
            for k, v in other.user_attrs.items():
                trial.set_user_attr(k, v)
            trial.set_user_attr("repeat_of", other.number)
            _constrain(trial, list(other.user_attrs.get("constraints", [0.0])))
            return list(other.values) if multi_objective else float(other.value)
    return None


def _optimize(study: Any, objective: _Objective, config: SearchConfig, progress: bool) -> None:
    """Run trials until the study holds ``config.trials`` (finished or pruned; other workers' count)."""
    import optuna
    from optuna.study import MaxTrialsCallback

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # what uses up the trial budget
    done = len(study.get_trials(deepcopy=False, states=counted))  # a crashed trial is retried, not counted
    remaining = config.trials - done
    if remaining <= 0:
        return
    # other workers may add trials meanwhile: stop when the study holds `trials`
    stop = MaxTrialsCallback(config.trials, states=counted)  # enqueued seeds do not count until run
    quiet = logging.getLogger("lmpress.pipeline")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # one line per stage per trial would drown the progress bar
    try:
        study.optimize(
            objective, n_trials=remaining, timeout=config.timeout, show_progress_bar=progress, callbacks=[stop]
        )
    finally:
        quiet.setLevel(level)


def _collect(
    study: Any,
    setup: _Setup,
    goal: str,
    smallest: int,
    sens: dict[str, float],
    study_dir: Path,
    t0: float,
) -> SearchResult:
    """The study's finished trials, the best feasible one and the Pareto front; ``trials.json`` written."""
    trials = [_trial_record(t) for t in study.trials if t.state.is_finished()]
    feasible = [t for t in trials if t["state"] == "COMPLETE" and all(c <= 0 for c in t.get("constraints", [0]))]
    best = min(feasible, key=lambda t: (_goal_value(t, goal), t["bytes"])) if feasible else None
    front = pareto([(float(t["bytes"]), _goal_value(t, goal)) for t in feasible])
    result = SearchResult(
        best=best,
        pareto=[feasible[i] for i in front],
        trials=trials,
        original=setup.original,
        smallest_bytes=smallest,
        seconds=time.perf_counter() - t0,
        sensitivity=sens,
    )
    write_json_atomic(study_dir / "trials.json", {"original": setup.original, "best": best, "trials": trials})
    return result
