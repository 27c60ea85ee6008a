"""``lmpress eval``: a model on held-out text (quality, size, speed, memory) or on standard tasks."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.table import Table

from lmpress.api import evaluate, evaluate_tasks
from lmpress.cli.common import (
    DataOpt,
    ModelArg,
    PatternOpt,
    RunFlags,
    SeqLenOpt,
    SpeedOpt,
    SplitName,
    TextFieldOpt,
    WindowsOpt,
    _data_options,
    _fail,
    _print_json,
    app,
    console,
    handles_errors,
    metrics_table,
    option_groups,
)
from lmpress.data import Split
from lmpress.model_source import LoadOptions
from lmpress.track import record_run


@app.command("eval")
@handles_errors
@option_groups
def eval_cmd(
    model: ModelArg = "builtin",
    reference: Annotated[str | None, typer.Option(help="model to compare against (KL, top-1 agreement)")] = None,
    data: DataOpt = "stdlib",
    split: Annotated[SplitName, typer.Option(help="which split of --data to evaluate on")] = SplitName.eval,
    seq_len: SeqLenOpt = None,
    max_windows: WindowsOpt = None,
    tokenizer: Annotated[str | None, typer.Option(help="take the tokenizer from this model directory")] = None,
    *,
    load: LoadOptions,
    speed: SpeedOpt = True,
    pattern: PatternOpt = "**/*",
    text_field: TextFieldOpt = "text",
    run: RunFlags,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="lm-evaluation-harness tasks instead of held-out text, e.g. hellaswag,arc_easy (lmpress[lm-eval])",
        ),
    ] = None,
    task_path: Annotated[
        list[Path] | None, typer.Option("--task-path", help="directory of your own lm-eval task YAML files")
    ] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", min=0, help="few-shot examples per task")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="documents per task [default: all]")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="sequences per forward for --tasks")] = 8,
) -> None:
    """Evaluate a model on held-out text (quality, size, speed, memory) or on standard tasks (--tasks)."""
    run.setup()
    tracking = run.tracking()
    if tasks is not None:
        given = {"--data": data != "stdlib", "--split": split != SplitName.eval, "--seq-len": seq_len is not None}
        given["--max-windows"] = max_windows is not None
        clash = [k for k, v in given.items() if v]
        if clash:
            _fail(f"{', '.join(clash)} choose held-out text; --tasks brings its own data; drop one of them", 2)
        _eval_tasks(
            model,
            reference,
            tasks,
            task_path,
            num_fewshot,
            limit,
            batch_size,
            run,
            tracking,
            kw={"tokenizer": tokenizer, **asdict(load)},
        )
        return
    result = evaluate(
        model,
        _data_options(data, pattern, text_field, seq_len=seq_len, eval_windows=max_windows),
        reference=reference,
        split=cast(Split, split.value),
        tokenizer=tokenizer,
        measure_speed=speed,
        progress=run.progress,
        **asdict(load),
    )
    record = {
        "source_model": model,
        "reference_model": reference,
        "metrics": {"evaluated": result.metrics, **({"reference": result.reference_metrics} if reference else {})},
        "data": result.data.to_dict(),
    }
    run_dir = record_run(tracking, "eval", Path(model).name or model, record)
    if run.as_json:
        _print_json({**result.to_dict(), "run_dir": str(run_dir) if run_dir else None})
        return
    m = result.data
    console.print(
        metrics_table(f"{m.source} ({m.split} split)", {"model": result.metrics, "reference": result.reference_metrics})
    )
    console.print(f"model: {model}" + (f"\nreference: {reference}" if reference else ""), soft_wrap=True)
    console.print(f"data: {m.documents} documents, {m.windows} windows x {m.seq_len} tokens, sha256 {m.sha256[:16]}")
    if run_dir:
        console.print(f"run: {run_dir}", soft_wrap=True)


def _task_cell(metric: str, value: float | None, err: float | None) -> str:
    if value is None:
        return "-"
    pct = metric.split(",")[0] in ("acc", "acc_norm", "exact_match", "mc1", "mc2", "f1", "em")
    if pct:
        return f"{100 * value:.1f}%" + (f" ± {100 * err:.1f}" if err is not None else "")
    return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")


def tasks_table(title: str, columns: dict[str, Any]) -> Table:
    """One row per task and metric, one column per model (`lmpress.tasks.TaskScores`)."""
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    table.add_column("metric")
    cols = {k: v for k, v in columns.items() if v is not None}
    for name in cols:
        table.add_column(name, justify="right")
    first = next(iter(cols.values()))
    for task, metrics in first.scores.items():
        for metric in metrics:
            cells = [
                _task_cell(metric, c.scores.get(task, {}).get(metric), c.stderr.get(task, {}).get(metric))
                for c in cols.values()
            ]
            table.add_row(task, metric, *cells)
    return table


def _eval_tasks(
    model: str,
    reference: str | None,
    tasks: str,
    task_path: list[Path] | None,
    num_fewshot: int | None,
    limit: int | None,
    batch_size: int,
    run: RunFlags,
    tracking: Any,
    kw: dict[str, Any],
) -> None:
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    result = evaluate_tasks(
        model,
        names,
        reference=reference,
        task_path=task_path,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        progress=run.progress,
        **kw,
    )
    ref = result.reference_scores
    record = {
        "source_model": model,
        "reference_model": reference,
        "metrics": {"evaluated": result.scores.flat(), **({"reference": ref.flat()} if ref else {})},
        "tasks": result.to_dict(),
    }
    run_dir = record_run(tracking, "eval", Path(model).name or model, record)
    if run.as_json:
        _print_json({**result.to_dict(), "run_dir": str(run_dir) if run_dir else None})
        return
    shots = f", {num_fewshot}-shot" if num_fewshot else ""
    console.print(tasks_table(f"lm-eval tasks{shots}", {"model": result.scores, "reference": ref}))
    counts = ", ".join(f"{t} {n}" for t, n in result.scores.samples.items())
    console.print(f"model: {model}" + (f"\nreference: {reference}" if reference else ""), soft_wrap=True)
    console.print(f"documents: {counts}" + (" (--limit)" if limit else ""), soft_wrap=True)
    if run_dir:
        console.print(f"run: {run_dir}", soft_wrap=True)
