"""``lmpress demo``: the main job on the built-in model, end to end, in a few minutes on 2 cores.

Compress the built-in reference model with several presets, evaluate each against the original on
the same held-out windows (quality, size, speed), save every model, record every run (run
directory, MLflow), print one comparison table and write the HTML report.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.evaluation import speed
from lmpress.io import LoadedModel, load_model
from lmpress.recipe import load_recipe, presets
from lmpress.report import write_report
from lmpress.track import TrackOptions, tracked_compress

log = logging.getLogger(__name__)
DEMO_PRESETS = ("w8", "w8a8", "w4", "sparse50", "w4-sparse", "edge")


@dataclass
class DemoResult:
    rows: list[dict[str, Any]] = field(default_factory=list)  # the original first, then one per preset
    run_dirs: list[Path] = field(default_factory=list)
    report: Path | None = None


def run_demo(
    names: list[str],
    out_dir: Path,
    tracking: TrackOptions,
    eval_windows: int = 32,
    progress: bool = False,
    measure_speed: bool = True,
) -> DemoResult:
    """Compress the built-in model with each preset in ``names``; returns the table rows and the report."""
    known = presets()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise LmpressError(
            f"demo: unknown preset {unknown[0] if unknown else '(none)'}; choose from {', '.join(known)}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise LmpressError(f"demo: {out_dir} is a file; choose another --out-dir")
    recipes = [load_recipe(n) for n in names]
    base = load_model("builtin")
    data = DataOptions(eval_windows=eval_windows)
    runs = tracking if tracking.enabled else TrackOptions(enabled=True, runs_dir=out_dir / "runs", mlflow=False)
    result = DemoResult()
    if measure_speed:  # warm up kernels and caches first: the first timed model would look slow otherwise
        speed(base.model, len(base.tokenizer), prompt_len=64, decode_tokens=16, repeats=1)
    for i, recipe in enumerate(recipes, 1):
        log.info("%s (%d/%d): %s", recipe.name, i, len(recipes), recipe.description)
        loaded = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.source, base.path, base.meta)
        r, run_dir = tracked_compress(
            runs,
            loaded,
            recipe,
            data,
            output=out_dir / "models" / recipe.name,
            overwrite=True,
            measure_speed=measure_speed,
            progress=progress,
            samples=3,
        )
        if not result.rows:
            result.rows.append({"name": "original", **r.metrics["original"], "seconds": None})
        seconds = sum(s["seconds"] for s in r.stages)
        result.rows.append({"name": recipe.name, **r.metrics["compressed"], "seconds": seconds})
        # untracked (the run directory could not be made; warned): the saved model carries its metrics
        result.run_dirs.append(run_dir if run_dir is not None else out_dir / "models" / recipe.name)
    result.report = write_report(result.run_dirs, out_dir / "report.html", "lmpress demo: the built-in model")
    return result
