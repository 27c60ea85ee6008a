"""``lmpress search``: the best recipe under a size or quality budget (Optuna)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

import lmpress
from lmpress.cli.common import (
    DataOpt,
    DeviceOpt,
    ModelArg,
    RunFlags,
    SeqLenOpt,
    WindowsOpt,
    _data_options,
    _print_json,
    app,
    console,
    handles_errors,
    metrics_table,
    option_groups,
)
from lmpress.errors import LmpressError
from lmpress.recipe import load_yaml_file
from lmpress.recipe_search import SearchError, SearchOutcome


def _parse_size(text: str) -> int:
    """'40MB', '2.5 GB', '900kB', '123456' -> bytes (decimal units)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise LmpressError(f"--max-bytes {text!r} is not a size; write it like 40MB, 900kB or 2GB")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()])


def _parse_share(text: str) -> float:
    """'5%' or '0.05' -> 0.05."""
    try:
        value = float(text.strip().rstrip("%")) / (100 if text.strip().endswith("%") else 1)
    except ValueError:
        raise LmpressError(f"--max-ppl-increase {text!r} is not a share; write it like 5% or 0.05") from None
    if value <= 0:
        raise LmpressError(f"--max-ppl-increase {text!r} must be above zero")
    return value


def _capped_trials(trials: int) -> int:
    """``--trials``, at most ``$LMPRESS_MAX_TRIALS`` when that is set (every command quickly, rough numbers)."""
    text = os.environ.get("LMPRESS_MAX_TRIALS", "").strip()
    if not text:
        return trials
    if not text.isdigit() or int(text) < 1:
        raise LmpressError(f"LMPRESS_MAX_TRIALS must be a whole number of trials >= 1, got {text[:40]!r}")
    return min(trials, int(text))


@app.command("search")
@handles_errors
@option_groups
def search_cmd(
    model: ModelArg = "builtin",
    max_bytes: Annotated[str | None, typer.Option("--max-bytes", help="size budget, e.g. 40MB")] = None,
    max_ppl_increase: Annotated[
        str | None, typer.Option("--max-ppl-increase", help="quality budget, e.g. 5% (smallest model within it)")
    ] = None,
    min_speedup: Annotated[float | None, typer.Option("--min-speedup", min=0.0, help="decode speed budget")] = None,
    space: Annotated[Path | None, typer.Option("--space", help="YAML search file narrowing the space")] = None,
    trials: Annotated[int, typer.Option(min=1, help="trials in the study in all (resumed ones count)")] = 30,
    timeout: Annotated[float | None, typer.Option(min=1.0, help="seconds for this process")] = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="perplexity, kl, bytes or speedup [default: bytes with only --max-ppl-increase, else perplexity]"
        ),
    ] = None,
    speed: Annotated[str, typer.Option(help="decode or prefill: the speed --min-speedup and speedup mean")] = "decode",
    multi_objective: Annotated[
        bool, typer.Option("--multi-objective", help="Pareto front of quality and size")
    ] = False,
    study_dir: Annotated[Path, typer.Option("--study-dir", help="study database, cache and results")] = Path(
        "lmpress-search"
    ),
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL shared by workers")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="save the best model here")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output directory")] = False,
    device: DeviceOpt = "auto",
    data: DataOpt = "stdlib",
    seq_len: SeqLenOpt = None,
    calib_windows: Annotated[int, typer.Option("--calib-windows", min=1)] = 64,
    select_windows: Annotated[int, typer.Option("--select-windows", min=4, help="windows trials are scored on")] = 32,
    max_windows: WindowsOpt = None,
    no_prune: Annotated[bool, typer.Option("--no-prune", help="measure every trial fully")] = False,
    recovery_steps: Annotated[
        int, typer.Option("--recovery-steps", min=0, help="distill the best candidates this many steps (QAT); 0: off")
    ] = 0,
    recovery_top: Annotated[int, typer.Option("--recovery-top", min=1, help="candidates given recovery training")] = 2,
    save_pareto: Annotated[
        bool,
        typer.Option("--save-pareto", help="compress, evaluate and save every Pareto recipe under STUDY_DIR/pareto"),
    ] = False,
    *,
    run: RunFlags,
) -> None:
    """Find the best recipe under a size, quality or speed budget (Optuna; resumable, shareable)."""
    run.setup()
    trials = _capped_trials(trials)
    try:
        raw_space = load_yaml_file(space, "search space") if space is not None else {}  # the recipe limits
    except FileNotFoundError:
        raise SearchError(f"search file {space} does not exist") from None
    settings = {
        "space": raw_space or {},
        "budget": {
            "max_bytes": _parse_size(max_bytes) if max_bytes else None,
            "max_ppl_increase": _parse_share(max_ppl_increase) if max_ppl_increase else None,
            "min_speedup": min_speedup,
            "speed": speed,
        },
        "objective": objective,
        "multi_objective": multi_objective,
        "trials": trials,
        "timeout": timeout,
        "calib_windows": calib_windows,
        "select_windows": select_windows,
        "prune": not no_prune,
        "storage": storage,
        "recovery": {"steps": recovery_steps, "top_k": recovery_top},
    }
    outcome = lmpress.search(
        model,
        settings,
        _data_options(data, "**/*", "text", seq_len=seq_len, eval_windows=max_windows, calib_windows=calib_windows),
        study_dir=study_dir,
        output=output,
        overwrite=overwrite,
        device=device,
        save_pareto=save_pareto,
        tracking=run.tracking(),
        progress=run.progress,
    )
    if run.as_json:
        _print_json(outcome.to_dict())
        return
    _print_outcome(outcome)


def _print_outcome(outcome: SearchOutcome) -> None:
    """A finished search in a few lines: the counts, the best trial, its evaluation, where things are."""
    final, summary = outcome.final, outcome.to_dict()
    best, original = summary["best"], outcome.study.original
    console.print(
        f"{summary['trials']} trials ({summary['complete']} measured, {summary['pruned']} pruned) in "
        f"{summary['seconds']:.0f} s; best: {best['bytes'] / 1e6:.2f} MB, selection perplexity "
        f"{best['perplexity']:.3f} (original {original['perplexity']:.3f})"
    )
    console.print(
        metrics_table(
            "best recipe vs original (evaluation split)",
            {"original": final.metrics.get("original"), "best": final.metrics.get("compressed")},
        )
    )
    console.print(f"recipe: {outcome.recipe_file}  (Pareto set: {outcome.pareto_dir})", soft_wrap=True)
    console.print(f"study report: {outcome.report}", soft_wrap=True)
    if final.output:
        console.print(f"saved to {final.output}")
    for p in outcome.pareto_models:
        c = p["metrics"] or {}
        console.print(
            f"pareto trial {p['number']}: {c.get('bytes', float('nan')) / 1e6:.2f} MB, "
            f"perplexity {c.get('perplexity', float('nan')):.3f} -> {p['output']}",
            soft_wrap=True,
        )
    if outcome.run_dir:
        console.print(f"run: {outcome.run_dir}", soft_wrap=True)
    if outcome.search_run_dir:
        console.print(f"search run: {outcome.search_run_dir}", soft_wrap=True)
