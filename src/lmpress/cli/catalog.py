"""``lmpress methods``, ``lmpress presets`` and ``lmpress train-reference``: what lmpress offers, and
the built-in model it ships."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lmpress.cli.common import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    ThreadsOpt,
    _print_json,
    _setup,
    app,
    console,
    handles_errors,
)
from lmpress.io import atomic_dir, resolve_device
from lmpress.models.card import write_card
from lmpress.models.reference import ReferenceSpec, train_reference
from lmpress.recipe import load_recipe, presets
from lmpress.registry import methods


@app.command("train-reference")
@handles_errors
def train_reference_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="directory to write the checkpoint")] = Path(
        "runs/reference"
    ),
    minutes: Annotated[float, typer.Option(min=0.1, help="training time budget (sets the token count)")] = 90.0,
    tokens: Annotated[int | None, typer.Option(min=1, help="train on exactly this many tokens instead")] = None,
    card_windows: Annotated[
        int | None, typer.Option("--card-windows", min=1, help="evaluation windows for the card (default: all)")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output directory")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the built-in reference model (tokenizer + Llama) on the stdlib corpus, with its card."""
    _setup(threads, quiet or as_json)
    dev = str(resolve_device(device))
    with atomic_dir(output, overwrite) as tmp:
        info = train_reference(ReferenceSpec(minutes=minutes, tokens=tokens), tmp, device=dev, progress=not as_json)
        card = write_card(tmp, info, card_windows)
    if as_json:
        _print_json({"output": str(output), **info, "card": card})
        return
    console.print(f"saved to {output} ({info['parameters']:,} parameters, {info['train_minutes']:.1f} min)")


def _name_list(rows: Iterable[tuple[str, str]]) -> Table:
    """Names in bold, each description wrapped in its own column (readable at 80 columns)."""
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True, style="bold")
    table.add_column()
    for name, text in rows:
        table.add_row(name, text)
    return table


@app.command("methods")
def methods_cmd(as_json: JsonOpt = False) -> None:
    """List the compression methods a recipe can use (keys: docs/recipes.md)."""
    if as_json:
        _print_json({n: {"summary": m.summary, "keys": list(m.config.model_fields)} for n, m in methods().items()})
        return
    console.print(_name_list((name, m.summary) for name, m in sorted(methods().items())))


@app.command("presets")
def presets_cmd(as_json: JsonOpt = False) -> None:
    """List the recipes shipped with lmpress (each is a YAML file to copy and edit)."""
    if as_json:
        _print_json({n: {**load_recipe(n).to_dict(), "file": str(p)} for n, p in presets().items()})
        return
    console.print(_name_list((name, load_recipe(name).description) for name in presets()))
