"""Recovery training after the search: the best post-training candidates distilled against the
original, each result a trial of its own in the study."""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from lmpress.recipe_search.space import SearchConfig
from lmpress.recipe_search.storage import locked
from lmpress.recipe_search.trials import CONSTRAINTS, Evaluator, _goal_value, _scored, objective_values

log = logging.getLogger(__name__)


def recover(study: Any, ev: Evaluator, config: SearchConfig, study_dir: Path, goal: str) -> None:
    """Distill the best ``top_k`` post-training candidates against the original; each result joins the
    study as a trial of its own (its params: the candidate's plus ``recovery_steps``).

    A candidate is claimed in the study before it is trained, so workers sharing the study refine
    different candidates."""
    import optuna

    rec = config.recovery
    distribution = optuna.distributions.CategoricalDistribution([0, rec.steps])
    for cand in _candidates(study, goal)[: rec.top_k]:
        claim = f"recovery:{cand.number}:{rec.steps}"
        with locked(study_dir / ".lock"):
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
        value = objective_values(attrs, goal, config.multi_objective)
        study.add_trial(
            optuna.trial.create_trial(
                params={**cand.params, "recovery_steps": rec.steps},
                distributions={**cand.distributions, "recovery_steps": distribution},
                **({"values": list(value)} if isinstance(value, tuple) else {"value": value}),
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


def _candidates(study: Any, goal: str) -> list[Any]:
    """The measured trials within every budget that training cannot change (size, speed), best
    objective first. When the objective is one training cannot change (bytes, speedup), they are the
    trials better on it than the best feasible one but outside the quality budget, closest to it
    first: training may bring them within it."""
    import optuna

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
        return sorted(
            (t for t in measured if fixed_budgets_met(t) and _goal_value(t.user_attrs, goal) < bar),
            key=lambda t: t.user_attrs["ppl_increase"],
        )
    return sorted((t for t in measured if fixed_budgets_met(t)), key=lambda t: _goal_value(t.user_attrs, goal))
