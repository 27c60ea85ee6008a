"""A finished study as records: every measured trial as a run for the report, and the study as a
run of its own (run directory and MLflow)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from lmpress.recipe_search.study import SearchResult
from lmpress.track import TrackOptions, new_run_dir, record_run


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
    tracking: TrackOptions,
    result: SearchResult,
    source: str,
    study_dir: Path,
    evaluation: dict[str, Any] | None = None,
) -> Path | None:
    """The study as a run of its own (``search``): its run directory holds ``trials.json``, the study
    report and the best recipe; MLflow gets the best trial's recipe and metrics, the study's counts, and
    every measured trial's perplexity and bytes as a series over trial numbers."""
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
