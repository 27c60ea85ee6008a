"""The whole search, as `lmpress.search` and ``lmpress search`` run it: the study on the model's
calibration windows, its files (the best recipe, the Pareto recipes, the report), the best recipe
compressed again and evaluated against the original, the Pareto models, and the runs recording it."""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.evaluation import quality
from lmpress.io import LoadedModel, check_output_dir, load_model, resolve_path, write_text_atomic
from lmpress.pipeline import Result
from lmpress.recipe import parse_recipe
from lmpress.recipe_search.records import record_study, study_runs
from lmpress.recipe_search.space import SearchConfig, SearchError
from lmpress.recipe_search.study import SearchResult, run_search
from lmpress.recipe_search.trials import calibration_and_selection
from lmpress.report import render
from lmpress.sources import STDLIB
from lmpress.track import TrackOptions, tracked_compress

log = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    """A finished search: the study, the best recipe compressed again and evaluated, and where it all is."""

    study: SearchResult
    final: Result  # the best recipe run alone (on the trials' calibration windows), evaluated vs the original
    reproduced_selection_perplexity: float  # ``final`` on the trials' selection windows: the best trial's number
    study_dir: Path  # study.db, trials.json, best.yaml, pareto/, report.html
    pareto_models: list[dict[str, Any]]  # save_pareto: each Pareto recipe's number, output and metrics
    run_dir: Path | None = None  # the final compress as a run (tracking)
    search_run_dir: Path | None = None  # the study as a run (tracking)

    @property
    def recipe_file(self) -> Path:
        return self.study_dir / "best.yaml"

    @property
    def report(self) -> Path:
        return self.study_dir / "report.html"

    @property
    def pareto_dir(self) -> Path:
        return self.study_dir / "pareto"

    def to_dict(self) -> dict[str, Any]:
        trials = self.study.trials
        return {
            "best": self.study.best,
            "pareto": [t["number"] for t in self.study.pareto],
            "trials": len(trials),
            "complete": sum(t["state"] == "COMPLETE" for t in trials),
            "pruned": sum(t["state"] == "PRUNED" for t in trials),
            "seconds": self.study.seconds,
            "recipe_file": str(self.recipe_file),
            "report": str(self.report),
            "evaluation": self.final.metrics,
            "reproduced_selection_perplexity": self.reproduced_selection_perplexity,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "search_run_dir": str(self.search_run_dir) if self.search_run_dir else None,
            "pareto_models": self.pareto_models,
        }


def search_config(settings: SearchConfig | dict[str, Any] | None) -> SearchConfig:
    """``settings`` as a `SearchConfig`: a mapping of its fields is validated, its first error said
    as a `SearchError`."""
    if isinstance(settings, SearchConfig):
        return settings
    try:
        return SearchConfig.model_validate(settings or {})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SearchError(f"search settings: {where}: {err['msg'].removeprefix('Value error, ')}") from None


def search(
    model: str | Path | LoadedModel = "builtin",
    config: SearchConfig | dict[str, Any] | None = None,
    data: DataOptions | str | Path | None = None,
    *,
    study_dir: Path = Path("lmpress-search"),
    output: Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    save_pareto: bool = False,
    tracking: TrackOptions | None = None,
    progress: bool = False,
) -> SearchOutcome:
    """Find the best recipe for ``model`` under ``config``'s budget (a `SearchConfig` or a mapping of
    its fields: ``{"budget": {"max_bytes": 40e6}, "trials": 30}``), compress ``model`` with it and
    evaluate the result against the original.

    ``data``'s calibration split gives the trials' calibration and selection windows (the final
    compress calibrates on the same ones), its evaluation split measures the winner. The study and
    its files go under ``study_dir`` (a study there is resumed), the Pareto models too with
    ``save_pareto``; the best model is saved to ``output`` if given. ``tracking``: record the final
    compress and the study as runs (default: none). No trial within the budget is a `SearchError`."""
    config = search_config(config)
    if output is not None:
        check_output_dir(output, overwrite, model.path if isinstance(model, LoadedModel) else _model_dir(model))
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    options = data if isinstance(data, DataOptions) else DataOptions(source=data or STDLIB)
    # the final compress calibrates on the very windows the trials did
    options = dataclasses.replace(options, calib_windows=config.calib_windows)
    every = options.load(loaded.tokenizer, "calib", None)
    calib = calibration_and_selection(every, config.calib_windows, config.select_windows)
    train = options.load(loaded.tokenizer, "train", options.train_windows) if config.recovery.steps else None
    result = run_search(loaded.model, loaded.tokenizer, calib, config, study_dir, progress=progress, train=train)
    if result.best is None:
        raise SearchError(
            f"search: none of {len(result.trials)} trials met the budget; raise it, widen the space or add --trials "
            f"(smallest reachable size {result.smallest_bytes / 1e6:.2f} MB)"
        )
    best = {**result.best["recipe"], "name": "best"}
    _write_study_files(result, best, study_dir)
    tracking = tracking or TrackOptions(enabled=False)
    pristine = copy.deepcopy(loaded.model) if save_pareto else loaded.model  # the final compress changes loaded
    kw = {"measure_speed": False, "progress": progress}
    final, run_dir = tracked_compress(
        tracking, loaded, parse_recipe(best), options, output=output, overwrite=overwrite, samples=3, **kw
    )
    again = _reproduced(final, calib, config.calib_windows, result.best["perplexity"])
    saved = []
    for t in result.pareto if save_pareto else []:  # each Pareto recipe: its model and its metrics
        fresh = dataclasses.replace(loaded, model=copy.deepcopy(pristine))
        out = study_dir / "pareto" / f"trial-{t['number']}"
        recipe = parse_recipe({**t["recipe"], "name": f"pareto-{t['number']}"})
        member, _ = tracked_compress(tracking, fresh, recipe, options, output=out, overwrite=True, **kw)
        saved.append({"number": t["number"], "output": str(out), "metrics": member.metrics.get("compressed")})
    search_dir = record_study(tracking, result, str(loaded.source), study_dir, final.metrics)
    return SearchOutcome(result, final, again, study_dir, saved, run_dir, search_dir)


def _model_dir(model: str | Path) -> Path | None:
    """The directory a model argument names, when it is one: the output is checked against it."""
    try:
        return resolve_path(model)
    except LmpressError:
        return None


def _write_study_files(result: SearchResult, best: dict[str, Any], study_dir: Path) -> None:
    """The best recipe as ``best.yaml``, each Pareto recipe as ``pareto/trial-N.yaml``, the study's report."""
    (study_dir / "best.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
    pareto_dir = study_dir / "pareto"
    pareto_dir.mkdir(exist_ok=True)
    for t in result.pareto:
        (pareto_dir / f"trial-{t['number']}.yaml").write_text(yaml.safe_dump(t["recipe"], sort_keys=False))
    write_text_atomic(study_dir / "report.html", render(study_runs(result), "lmpress search: every measured trial"))


def _reproduced(final: Result, calib: Any, calib_windows: int, trial_ppl: float) -> float:
    """The found recipe, run alone, measured again on the trials' selection windows: the same number
    as its trial's (a warning when it is not)."""
    again = float(quality(final.model, calib.windows[calib_windows:], batch_size=16)["perplexity"])
    if abs(again / trial_ppl - 1) > 1e-3:
        log.warning(
            "the best recipe run alone gives selection perplexity %.4f, its trial gave %.4f: the recipe does not "
            "reproduce exactly (a method with randomness, or a different device)",
            again,
            trial_ppl,
        )
    return again
