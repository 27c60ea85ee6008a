"""Find the recipe that fits a budget (size, quality, speed), with Optuna: `search` (``lmpress.search``)
runs the whole workflow, `run_search` the study alone.

A trial is a recipe built from the search space: a weight quantizer and its bits per *block group*
(the decoder blocks cut into ``block_groups`` contiguous runs), group size, the head's and the
token embeddings' bits, and optionally SparseGPT sparsity and dropped blocks before it.

- **Objective.** Held-out perplexity (or KL against the original) under ``max_bytes`` /
  ``min_speedup``; or, with only ``max_ppl_increase``, the smallest model within it; or both at once
  (``multi_objective``: NSGA-II, the Pareto front). Constraints are Optuna constraints, so TPE
  learns where the feasible region is.
- **Selection is not evaluation.** Trials are scored on calibration-split windows the calibration
  did not use; the winner is measured again on the evaluation split, like every other result.
- **Cheap before expensive.** Each trial's size is known before any calibrated work: the recipe is
  first applied with round-to-nearest (same formats, same bytes), and a trial over ``max_bytes`` is
  pruned there. The *sensitivity cache* (each block group's, the head's and the embeddings' KL when
  only they are rounded to b bits, measured once per model and kept in ``sensitivity.json``)
  predicts a trial's KL as the sum of its parts; a trial predicted far outside ``max_ppl_increase``
  is pruned before calibration, and the search starts from sensitivity-guided seeds.
- **Durable.** The study lives in a database (SQLite in the study directory, or any Optuna storage
  URL): an interrupted search resumes where it stopped, and several worker processes (or machines)
  can share one study.
"""

from lmpress.recipe_search.records import record_study, study_runs
from lmpress.recipe_search.sensitivity import predicted_kl, sensitivity
from lmpress.recipe_search.space import (
    Budget,
    Recovery,
    SearchConfig,
    SearchError,
    SearchSpace,
    block_groups,
    build_recipe,
)
from lmpress.recipe_search.study import SearchResult, run_search
from lmpress.recipe_search.trials import Evaluator, calibration_and_selection
from lmpress.recipe_search.workflow import SearchOutcome, search, search_config

__all__ = [
    "Budget",
    "Evaluator",
    "Recovery",
    "SearchConfig",
    "SearchError",
    "SearchOutcome",
    "SearchResult",
    "SearchSpace",
    "block_groups",
    "build_recipe",
    "calibration_and_selection",
    "predicted_kl",
    "record_study",
    "run_search",
    "search",
    "search_config",
    "sensitivity",
    "study_runs",
]
