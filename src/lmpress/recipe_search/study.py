"""The study: running the search in an Optuna database (resumable, shared by workers), recovering the
winner, recording the runs."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lmpress.evaluation import quality, tensor_bytes
from lmpress.io import write_json_atomic
from lmpress.arch import Adapter
from lmpress.recipe_search.sensitivity import _seed_choices, _space_key, predicted_kl, sensitivity
from lmpress.recipe_search.space import (
    SearchConfig,
    SearchError,
    _suggest,
    as_rtn,
    block_groups,
    build_recipe,
)
from lmpress.recipe_search.trials import (
    CONSTRAINTS,
    Evaluator,
    _constrain,
    _goal_value,
    _scored,
    _speedup,
    _trial_record,
)

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    best: dict[str, Any] | None  # the best feasible trial: recipe, bytes, perplexity, kl, ...
    pareto: list[dict[str, Any]]  # feasible, non-dominated trials on (objective, bytes)
    trials: list[dict[str, Any]]
    original: dict[str, float]
    smallest_bytes: int
    seconds: float
    sensitivity: dict[str, float]


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
    import dataclasses

    import optuna

    t0 = time.perf_counter()
    budget, space = config.budget, config.space
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
    model.eval()
    adapter = Adapter(model)
    groups = block_groups(adapter.num_blocks, space.block_groups)
    if max(space.drop_blocks) >= adapter.num_blocks:
        raise SearchError(f"search: drop_blocks {max(space.drop_blocks)} leaves no block of {adapter.num_blocks}")
    prefix = adapter.spec.blocks
    calibration = dataclasses.replace(calib, windows=calib.windows[: config.calib_windows])
    select = calib.windows[config.calib_windows : need]
    ev = Evaluator(model, tokenizer, calibration, select, 0.0, train)
    ev.base_ppl = quality(model, select, batch_size=16)["perplexity"]
    original = {"bytes": float(tensor_bytes(model)), "perplexity": ev.base_ppl}

    smallest_choice = {
        "method": "rtn",
        **{f"bits_g{g}": min(space.bits) for g in range(len(groups))},
        "group_size": max(space.group_sizes),
        "head_bits": min((b for b in space.head_bits if b), default=None),
        "embedding_bits": min((b for b in space.embedding_bits if b), default=None),
        **{f"sparsity_g{g}": max(space.sparsity) for g in range(len(groups))},
        "drop_blocks": max(space.drop_blocks),
    }
    _, smallest = ev.compress(as_rtn(build_recipe(smallest_choice, prefix, groups, "smallest")))
    if max(space.sparsity) > 0:  # a sparse layer keeps a mask: at few bits, dense may be the smaller
        dense_choice = {**smallest_choice, **{f"sparsity_g{g}": 0.0 for g in range(len(groups))}}
        _, dense_bytes = ev.compress(as_rtn(build_recipe(dense_choice, prefix, groups, "smallest")))
        if dense_bytes < smallest:
            smallest_choice, smallest = dense_choice, dense_bytes
    if budget.max_bytes is not None and budget.max_bytes < smallest:
        raise SearchError(
            f"search: no recipe in the space fits {budget.max_bytes / 1e6:.2f} MB; the smallest reachable is "
            f"{smallest / 1e6:.2f} MB (every choice at its smallest: {min(space.bits)}-bit blocks, head and embeddings "
            "at their fewest bits); raise --max-bytes or widen the space"
        )
    study_dir.mkdir(parents=True, exist_ok=True)  # only once the budget is known to be reachable
    with _locked(study_dir / ".lock"):  # workers starting together: one measures and creates, the others read
        sens_key = f"sensitivity-{_space_key(space, groups)}.json"
        sens = sensitivity(ev, space, groups, prefix, study_dir / sens_key) if (config.prune or config.seeds) else {}
        study = _open_study(config, study_dir)
    if config.seeds and not study.trials:
        seeds = _seed_choices(space, len(groups), sens, budget.max_bytes is not None)
        if budget.max_bytes is not None:  # the smallest recipe: feasible whenever anything is
            seeds.insert(0, {**smallest_choice, "method": space.methods[0]})
        for choice in seeds:
            study.enqueue_trial(choice, skip_if_exists=True)
    only_quality = budget.max_bytes is None and budget.min_speedup is None and budget.max_ppl_increase is not None
    goal = config.objective or ("bytes" if only_quality and not config.multi_objective else "perplexity")
    if config.multi_objective and goal == "bytes":
        goal = "perplexity"  # bytes is the second objective already
    timed_speed = budget.min_speedup is not None or goal == "speedup"

    def objective(trial: Any) -> float | tuple[float, float] | list[float]:
        choice = _suggest(trial, space, len(groups))
        for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if other.params == trial.params:  # TPE proposed a recipe already measured: reuse it
                for k, v in other.user_attrs.items():
                    trial.set_user_attr(k, v)
                trial.set_user_attr("repeat_of", other.number)
                _constrain(trial, list(other.user_attrs.get("constraints", [0.0])))
                return list(other.values) if config.multi_objective else float(other.value)
        recipe = build_recipe(choice, prefix, groups, f"search-{trial.number}")
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
        pred = predicted_kl(choice, sens, len(groups)) if sens else None
        trial.set_user_attr("predicted_kl", pred)
        if config.prune and budget.max_bytes is not None and nbytes > budget.max_bytes:
            trial.set_user_attr("pruned_by", "size")
            raise optuna.TrialPruned()
        limit = budget.max_ppl_increase
        hopeless = pred is not None and limit is not None and math.exp(pred) - 1 > 4 * limit
        if config.prune and hopeless:
            trial.set_user_attr("pruned_by", "sensitivity")
            raise optuna.TrialPruned()
        exact = shared == len(stages)  # the proxy is the trial itself
        compressed = proxy if exact else ev.compress({"stages": stages[shared:]}, start=common)[0]
        speedup = _speedup(model, compressed, budget.speed) if timed_speed else None
        attrs = _scored(ev, compressed, nbytes, budget, speedup)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        _constrain(trial, attrs["constraints"])
        trial.set_user_attr("seconds", time.perf_counter() - t)
        return _values(attrs)

    def _values(attrs: dict[str, Any]) -> float | tuple[float, float]:
        value = _goal_value(attrs, goal)
        return (value, float(attrs["bytes"])) if config.multi_objective else value

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # what uses up the trial budget
    done = len(study.get_trials(deepcopy=False, states=counted))  # a crashed trial is retried, not counted
    remaining = config.trials - done
    if remaining > 0:  # other workers may add trials meanwhile: stop when the study holds `trials`
        from optuna.study import MaxTrialsCallback

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
    if config.recovery.steps:
        _recover(study, ev, config, study_dir, goal, _values)
    trials = [_trial_record(t) for t in study.trials if t.state.is_finished()]
    feasible = [t for t in trials if t["state"] == "COMPLETE" and all(c <= 0 for c in t.get("constraints", [0]))]
    best = min(feasible, key=lambda t: (_goal_value(t, goal), t["bytes"])) if feasible else None
    from lmpress.plots import pareto

    front = pareto([(float(t["bytes"]), _goal_value(t, goal)) for t in feasible])
    result = SearchResult(
        best=best,
        pareto=[feasible[i] for i in front],
        trials=trials,
        original=original,
        smallest_bytes=int(smallest),
        seconds=time.perf_counter() - t0,
        sensitivity=sens,
    )
    write_json_atomic(study_dir / "trials.json", {"original": original, "best": best, "trials": trials})
    return result


def _recover(study: Any, ev: Evaluator, config: SearchConfig, study_dir: Path, goal: str, values: Any) -> None:
    """Distill the best ``top_k`` post-training candidates against the original; each result joins the
    study as a trial of its own (its params: the candidate's plus ``recovery_steps``).

    Candidates are the measured trials within every budget that training cannot change (size, speed),
    best objective first. When the objective is one training cannot change (bytes, speedup), they are
    the trials better on it than the best feasible one but outside the quality budget, closest to it
    first: training may bring them within it. A candidate is claimed in
    the study before it is trained, so workers sharing the study refine different candidates."""
    import optuna

    rec = config.recovery
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    measured = [
        t
        for t in trials
        if "perplexity" in t.user_attrs and "repeat_of" not in t.user_attrs and "refines" not in t.user_attrs
    ]

    def fixed_budgets_met(t: Any) -> bool:  # everything but the quality budget, which training improves
        cons = t.user_attrs.get("constraints", [0.0])
        quality = CONSTRAINTS.index("ppl_increase_over")
        return all(c <= 0 for i, c in enumerate(cons) if i != quality)

    if goal in ("bytes", "speedup"):
        feasible = [
            t for t in trials if "perplexity" in t.user_attrs and all(c <= 0 for c in t.user_attrs["constraints"])
        ]
        bar = min((_goal_value(t.user_attrs, goal) for t in feasible), default=math.inf)
        pool = sorted(
            (t for t in measured if fixed_budgets_met(t) and _goal_value(t.user_attrs, goal) < bar),
            key=lambda t: t.user_attrs["ppl_increase"],
        )
    else:
        pool = sorted((t for t in measured if fixed_budgets_met(t)), key=lambda t: _goal_value(t.user_attrs, goal))
    distribution = optuna.distributions.CategoricalDistribution([0, rec.steps])
    for cand in pool[: rec.top_k]:
        claim = f"recovery:{cand.number}:{rec.steps}"
        with _locked(study_dir / ".lock"):
            if claim in study.user_attrs:
                continue  # another worker (or an earlier run of this study) has it
            study.set_user_attr(claim, os.getpid())
        t = time.perf_counter()
        recipe = copy.deepcopy(cand.user_attrs["recipe"])
        recipe["name"] = f"{recipe['name']}-recovered"
        recipe["stages"].append(rec.stage())
        model, nbytes = ev.compress(recipe)
        attrs = _scored(ev, model, nbytes, config.budget, cand.user_attrs.get("speedup"))
        attrs.update(recipe=recipe, refines=cand.number, worker=os.getpid(), seconds=time.perf_counter() - t)
        value = values(attrs)
        study.add_trial(
            optuna.trial.create_trial(
                params={**cand.params, "recovery_steps": rec.steps},
                distributions={**cand.distributions, "recovery_steps": distribution},
                **({"values": list(value)} if config.multi_objective else {"value": value}),
                user_attrs=attrs,
                # the key Trial.set_constraint writes: the samplers see the constraints of this trial too
                system_attrs={
                    f"constraints:{k}": float(v) for k, v in zip(CONSTRAINTS, attrs["constraints"], strict=False)
                },
            )
        )
        log.info(
            "recovery of trial %d: perplexity %.3f -> %.3f",
            cand.number,
            cand.user_attrs["perplexity"],
            attrs["perplexity"],
        )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (POSIX ``flock``)."""
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open_study(config: SearchConfig, study_dir: Path) -> Any:
    """Create or load the study in its storage."""
    import optuna

    storage = config.storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    sampler = (  # constraints come from trial.set_constraint: the samplers learn the feasible region
        optuna.samplers.NSGAIISampler(seed=config.seed)
        if config.multi_objective
        else optuna.samplers.TPESampler(seed=config.seed, multivariate=True)
    )
    directions: list[Literal["minimize", "maximize"]] = ["minimize"] * (2 if config.multi_objective else 1)
    # heartbeats: a trial whose worker was killed is failed after the grace period, not left running forever
    import warnings

    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = (
            optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=max(1, round(config.heartbeat)),
                grace_period=max(1, round(config.grace)),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
            if "://" in storage
            else storage
        )
    return optuna.create_study(
        study_name=config.study_name, storage=rdb, sampler=sampler, directions=directions, load_if_exists=True
    )


def study_runs(result: SearchResult) -> list[dict[str, Any]]:
    """Every measured trial as a run record for `lmpress.report` (the best one labelled ``best``)."""
    original = {"perplexity": result.original["perplexity"], "bytes": result.original["bytes"]}
    best = result.best["number"] if result.best else None
    runs = []
    for t in result.trials:
        if t["state"] != "COMPLETE" or "repeat_of" in t or "perplexity" not in t:
            continue
        label = f"best #{t['number']}" if t["number"] == best else f"#{t['number']}"
        if "refines" in t:
            label += f" (#{t['refines']} + recovery)"
        metrics = {"perplexity": t["perplexity"], "kl": t["kl"], "bytes": t["bytes"]}
        runs.append(
            {"name": label, "recipe": {"name": label}, "metrics": {"original": original, "compressed": metrics}}
        )
    return runs


def record_study(
    tracking: Any, result: SearchResult, source: str, study_dir: Path, evaluation: dict[str, Any] | None = None
) -> Path | None:
    """The study as a run of its own (``search``): its run directory holds ``trials.json``, the study
    report and the best recipe; MLflow gets the best trial's recipe and metrics, the study's counts, and
    every measured trial's perplexity and bytes as a series over trial numbers."""
    import shutil

    import yaml

    from lmpress.track import new_run_dir, record_run

    if not tracking.enabled or result.best is None:
        return None
    run_dir = new_run_dir(tracking, "search", study_dir.name)
    if run_dir is None:  # could not be created (warned): the study is in study_dir all the same
        return None
    for name in ("trials.json", "report.html", "best.yaml"):
        if (study_dir / name).is_file():
            shutil.copy2(study_dir / name, run_dir / name)
    measured = sorted(
        (t for t in result.trials if t["state"] == "COMPLETE" and "perplexity" in t and "repeat_of" not in t),
        key=lambda t: t["number"],
    )
    best = result.best
    selection = {k: best[k] for k in ("perplexity", "kl", "bytes", "ppl_increase", "speedup") if k in best}
    record = {
        "source_model": source,
        "recipe": best["recipe"],
        "metrics": {
            "original": (evaluation or {}).get("original") or {},
            "compressed": (evaluation or {}).get("compressed") or {},
            "selection": selection,
            "study": {
                "trials": float(len(result.trials)),
                "measured": float(len(measured)),
                "pruned": float(sum(t["state"] == "PRUNED" for t in result.trials)),
                "recovered": float(sum("refines" in t for t in result.trials)),
                "seconds": result.seconds,
                "best_trial": float(best["number"]),
            },
        },
        "search": {
            "study_dir": str(study_dir),
            "best_trial": best["number"],
            "pareto": [t["number"] for t in result.pareto],
            "smallest_bytes": result.smallest_bytes,
        },
        "series": {
            "trial.perplexity": [(t["number"], float(t["perplexity"])) for t in measured],
            "trial.bytes": [(t["number"], float(t["bytes"])) for t in measured],
        },
    }
    return record_run(
        tracking, "search", study_dir.name, record, run_dir, yaml.safe_dump(best["recipe"], sort_keys=False)
    )
