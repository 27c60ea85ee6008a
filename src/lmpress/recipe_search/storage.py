"""Where a study lives: an Optuna database (SQLite in the study directory, or any storage URL) that
workers open together, and the lock they take while one of them creates it."""

from __future__ import annotations

import fcntl
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from lmpress.recipe_search.space import SearchConfig


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (POSIX ``flock``)."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_study(config: SearchConfig, study_dir: Path) -> Any:
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
