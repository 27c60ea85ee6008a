"""``lmpress search``: the best recipe under a size or quality budget (Optuna)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from lmpress.cli.common import (
    DataOpt,
    DeviceOpt,
    JsonOpt,
    ModelArg,
    QuietOpt,
    RunsDirOpt,
    SeqLenOpt,
    ThreadsOpt,
    TrackingUriOpt,
    TrackOpt,
    WindowsOpt,
    _data_options,
    _print_json,
    _setup,
    _track_options,
    app,
    console,
    handles_errors,
    metrics_table,
    model_dir,
)
from lmpress.errors import LmpressError


def _parse_size(text: str) -> int:
    """'40MB', '2.5 GB', '900kB', '123456' -> bytes (decimal units)."""
    import re

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
    import os

    text = os.environ.get("LMPRESS_MAX_TRIALS", "").strip()
    if not text:
        return trials
    if not text.isdigit() or int(text) < 1:
        raise LmpressError(f"LMPRESS_MAX_TRIALS must be a whole number of trials >= 1, got {text[:40]!r}")
    return min(trials, int(text))


@app.command("search")
@handles_errors
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
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 0,
    track: TrackOpt = None,
    runs_dir: RunsDirOpt = None,
    tracking_uri: TrackingUriOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Find the best recipe under a size, quality or speed budget (Optuna; resumable, shareable)."""
    import copy
    import dataclasses

    import yaml
    from pydantic import ValidationError

    from lmpress.evaluation import quality
    from lmpress.io import check_output_dir, load_model
    from lmpress.recipe import load_yaml_file, parse_recipe
    from lmpress.recipe_search import SearchConfig, SearchError, calibration_and_selection, record_study, run_search
    from lmpress.track import tracked_compress

    _setup(threads, quiet or as_json)
    trials = _capped_trials(trials)
    try:
        raw_space = load_yaml_file(space, "search space") if space is not None else {}  # the recipe limits
        config = SearchConfig.model_validate(
            {
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
        )
    except FileNotFoundError:
        raise SearchError(f"search file {space} does not exist") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise SearchError(f"search settings: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    if output is not None:
        check_output_dir(output, overwrite, model_dir(model))
    loaded = load_model(model, device=device)
    # the final compress calibrates on the very windows the trials did
    options = _data_options(
        data, "**/*", "text", seq_len=seq_len, eval_windows=max_windows, calib_windows=calib_windows
    )
    calib = calibration_and_selection(options.load(loaded.tokenizer, "calib", None), calib_windows, select_windows)
    train = options.load(loaded.tokenizer, "train", options.train_windows) if recovery_steps else None
    result = run_search(
        loaded.model, loaded.tokenizer, calib, config, study_dir, progress=not (as_json or quiet), train=train
    )
    if result.best is None:
        raise SearchError(
            f"search: none of {len(result.trials)} trials met the budget; raise it, widen the space or add --trials "
            f"(smallest reachable size {result.smallest_bytes / 1e6:.2f} MB)"
        )
    (study_dir / "best.yaml").write_text(yaml.safe_dump({**result.best["recipe"], "name": "best"}, sort_keys=False))
    pareto_dir = study_dir / "pareto"
    pareto_dir.mkdir(exist_ok=True)
    for t in result.pareto:
        (pareto_dir / f"trial-{t['number']}.yaml").write_text(yaml.safe_dump(t["recipe"], sort_keys=False))
    from lmpress.io import write_text_atomic
    from lmpress.recipe_search import study_runs
    from lmpress.report import render

    write_text_atomic(study_dir / "report.html", render(study_runs(result), "lmpress search: every measured trial"))
    best_recipe = parse_recipe({**result.best["recipe"], "name": "best"})
    tracking = _track_options(track, runs_dir, tracking_uri)
    pristine = copy.deepcopy(loaded.model) if save_pareto else loaded.model  # the final compress changes loaded
    final, run_dir = tracked_compress(
        tracking,
        loaded,
        best_recipe,
        options,
        output=output,
        overwrite=overwrite,
        measure_speed=False,
        progress=not (as_json or quiet),
        samples=3,
    )
    # the found recipe, run alone, measured again on the trials' selection windows: the same number
    again = quality(final.model, calib.windows[calib_windows:], batch_size=16)["perplexity"]
    if abs(again / result.best["perplexity"] - 1) > 1e-3:
        logging.getLogger("lmpress.recipe_search").warning(
            "the best recipe run alone gives selection perplexity %.4f, its trial gave %.4f: the recipe does not "
            "reproduce exactly (a method with randomness, or a different device)",
            again,
            result.best["perplexity"],
        )
    saved = []
    for t in result.pareto if save_pareto else []:  # each Pareto recipe: its model and its metrics
        fresh = dataclasses.replace(loaded, model=copy.deepcopy(pristine))
        out = pareto_dir / f"trial-{t['number']}"
        member, _ = tracked_compress(
            tracking,
            fresh,
            parse_recipe({**t["recipe"], "name": f"pareto-{t['number']}"}),
            options,
            output=out,
            overwrite=True,
            measure_speed=False,
            progress=not (as_json or quiet),
        )
        saved.append({"number": t["number"], "output": str(out), "metrics": member.metrics.get("compressed")})
    search_dir = record_study(tracking, result, str(getattr(loaded, "source", model)), study_dir, final.metrics)
    summary = {
        "best": result.best,
        "pareto": [t["number"] for t in result.pareto],
        "trials": len(result.trials),
        "complete": sum(t["state"] == "COMPLETE" for t in result.trials),
        "pruned": sum(t["state"] == "PRUNED" for t in result.trials),
        "seconds": result.seconds,
        "recipe_file": str(study_dir / "best.yaml"),
        "report": str(study_dir / "report.html"),
        "evaluation": final.metrics,
        "reproduced_selection_perplexity": again,
        "run_dir": str(run_dir) if run_dir else None,
        "search_run_dir": str(search_dir) if search_dir else None,
        "pareto_models": saved,
    }
    if as_json:
        _print_json(summary)
        return
    console.print(
        f"{summary['trials']} trials ({summary['complete']} measured, {summary['pruned']} pruned) in "
        f"{result.seconds:.0f} s; best: {result.best['bytes'] / 1e6:.2f} MB, selection perplexity "
        f"{result.best['perplexity']:.3f} (original {result.original['perplexity']:.3f})"
    )
    console.print(
        metrics_table(
            "best recipe vs original (evaluation split)",
            {"original": final.metrics.get("original"), "best": final.metrics.get("compressed")},
        )
    )
    console.print(f"recipe: {study_dir / 'best.yaml'}  (Pareto set: {pareto_dir})", soft_wrap=True)
    console.print(f"study report: {study_dir / 'report.html'}", soft_wrap=True)
    if final.output:
        console.print(f"saved to {final.output}")
    for p in saved:
        c = p["metrics"] or {}
        console.print(
            f"pareto trial {p['number']}: {c.get('bytes', float('nan')) / 1e6:.2f} MB, "
            f"perplexity {c.get('perplexity', float('nan')):.3f} -> {p['output']}",
            soft_wrap=True,
        )
    if run_dir:
        console.print(f"run: {run_dir}", soft_wrap=True)
    if search_dir:
        console.print(f"search run: {search_dir}", soft_wrap=True)
