"""``lmpress demo`` and ``lmpress report``: presets on the built-in model in one table, runs in one page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from lmpress.cli.common import JsonOpt, RunFlags, SpeedOpt, _print_json, app, console, handles_errors, option_groups
from lmpress.data_options import DataOptions
from lmpress.demo import run_demo
from lmpress.report import write_report

DEMO_COLUMNS = [
    ("bytes_on_disk", "MB", lambda v: f"{v / 1e6:.2f}"),
    ("bits_per_weight", "bits/w", lambda v: f"{v:.2f}"),
    ("perplexity", "ppl", lambda v: f"{v:.3f}"),
    ("kl", "KL", lambda v: f"{v:.4f}"),
    ("top1_agreement", "top-1", lambda v: f"{100 * v:.1f}%"),
    ("prefill_tokens_per_s", "prefill", lambda v: f"{v:,.0f}"),
    ("decode_tokens_per_s", "decode", lambda v: f"{v:,.0f}"),
    ("seconds", "secs", lambda v: f"{v:.1f}"),
]


def demo_table(rows: list[dict[str, Any]]) -> Table:
    """The demo's comparison: one row per preset, narrow enough for an 80-column terminal."""
    from rich import box

    table = Table(
        title="built-in model: presets vs the original (same held-out windows)",
        title_justify="left",
        caption="bits/w counts pruned weights too; prefill, decode: tokens/s at batch 1",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("preset", no_wrap=True)
    for _, label, _fmt_fn in DEMO_COLUMNS:
        table.add_column(label, justify="right", no_wrap=True)
    for row in rows:
        cells = [fn(row[k]) if isinstance(row.get(k), int | float) else "-" for k, _, fn in DEMO_COLUMNS]
        table.add_row(row["name"], *cells)
    return table


@app.command("demo")
@handles_errors
@option_groups
def demo_cmd(
    presets: Annotated[str, typer.Option(help="comma-separated presets to run")] = ",".join(
        ("w8", "w8a8", "w4", "sparse50", "w4-sparse", "edge")
    ),
    out_dir: Annotated[Path, typer.Option("--out-dir", help="models, run records and report.html go here")] = Path(
        "lmpress-demo"
    ),
    max_windows: Annotated[
        int | None,
        typer.Option("--max-windows", min=1, help="evaluation windows [default: 32, or $LMPRESS_MAX_WINDOWS if fewer]"),
    ] = None,
    speed: SpeedOpt = True,
    *,
    run: RunFlags,
) -> None:
    """Compress the built-in model with several presets, compare them in one table, write the report."""
    run.setup()
    tracking = run.tracking(out_dir / "runs")
    if max_windows is None:  # LMPRESS_MAX_WINDOWS makes the demo quick, as every command
        max_windows = min(32, DataOptions().eval_windows or 32)
    names = [n.strip() for n in presets.split(",") if n.strip()]
    result = run_demo(names, out_dir, tracking, max_windows, progress=run.progress, measure_speed=speed)
    if run.as_json:
        _print_json({"rows": result.rows, "runs": [str(p) for p in result.run_dirs], "report": str(result.report)})
        return
    console.print(demo_table(result.rows))
    console.print(f"report: {result.report}", soft_wrap=True)


@app.command("report")
@handles_errors
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="run directories (or saved model directories)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write")] = Path("lmpress-report.html"),
    title: Annotated[str, typer.Option(help="page title")] = "lmpress report",
    as_json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML page comparing runs: trade-off plots, metrics, samples."""
    path = write_report(runs, output, title)
    if as_json:
        _print_json({"report": str(path)})
    else:
        console.print(f"report: {path}", soft_wrap=True)
