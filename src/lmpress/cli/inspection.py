"""``lmpress inspect``: what a directory or an exported file holds, as a person reads it."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from lmpress.cli.common import (
    JsonOpt,
    ModelArg,
    _print_json,
    app,
    console,
    handles_errors,
    metrics_table,
)
from lmpress.export.registry import EXPORTERS
from lmpress.inspection import inspect_model


def _architecture_line(arch: dict[str, Any]) -> str:
    parts = [f"{arch.get('model_type')}" + (f" ({arch['class']})" if arch.get("class") else "")]
    if "layers" in arch:
        parts.append(f"{arch['layers']} layers")
    if "hidden" in arch:
        parts.append(f"hidden {arch['hidden']:,}")
    if "heads" in arch:
        kv = arch.get("kv_heads")
        parts.append(f"{arch['heads']} heads" + (f" ({kv} kv)" if kv and kv != arch["heads"] else ""))
    if arch.get("intermediate"):
        parts.append(f"MLP {arch['intermediate']:,}")
    if "vocab" in arch:
        parts.append(f"vocab {arch['vocab']:,}")
    if "context" in arch:
        parts.append(f"context {arch['context']:,}")
    if arch.get("per_block_widths"):
        parts.append("per-block widths")
    return ", ".join(parts)


FAMILIES = "every family and what lmpress does with it: docs/architectures.md"


def layout_lines(layout: dict[str, Any]) -> list[str]:
    """How lmpress reads the model: its family, blocks, one block's linears, what methods can do."""
    if not layout:
        return []
    if layout.get("family") is None and not layout.get("generic"):
        return [f"family: none found ({layout.get('why')})", FAMILIES]
    family = "generic (no spec): found by structure" if layout["generic"] else f"{layout['family']} (spec)"
    after = f", then {layout['final_norm']}" if layout.get("final_norm") else ""
    linears = ", ".join(p if r == "linear" else f"{p} {r}" for p, r in layout["linears"].items())
    return [
        f"family: {family}",
        f"blocks: {layout['blocks']} x {layout['num_blocks']}{after}",
        "block linears" + (" (roles unknown)" if layout["generic"] else "") + f": {linears}",
        *([f"experts: {layout['experts']}"] if layout.get("experts") else []),
        "methods: " + "; ".join(f"{k}: {v}" for k, v in layout["can"].items()),
        FAMILIES,
    ]


def _scalar_items(report: dict[str, Any], skip: tuple[str, ...] = ("stage", "method")) -> str:
    items = []
    for k, v in report.items():
        if k in skip or isinstance(v, dict | list) or v is None:
            continue
        items.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(items)


def print_inspection(found: Any) -> None:
    """`lmpress.inspection.Inspection` as a person reads it: what the model is, how it is stored,
    how it was made, what it cost."""
    from rich import box
    from rich.markup import escape

    kinds = {"lmpress": "lmpress directory", "huggingface": "Hugging Face directory"}
    kinds |= {e.name: e.artifact for e in EXPORTERS.values()}
    console.print(f"[bold]{escape(found.source)}[/] ({kinds.get(found.kind, found.kind + ' directory')})")
    if found.architecture:
        console.print(escape(_architecture_line(found.architecture)))
    for line in layout_lines(found.layout):
        console.print(escape(line))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("storage", "left"), ("modules", "right"), ("weights", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("MB", justify="right")
    table.add_column("bits/w", justify="right")
    for g in found.formats:
        weights = f"{g.weights:,}" + (f" ({100 * g.kept / g.weights:.0f}% kept)" if g.kept != g.weights else "")
        bits = f"{g.bits_per_weight:.2f}" if g.weights else "-"
        table.add_row(g.format, str(g.modules), weights, f"{g.bytes / 1e6:.2f}", bits)
    console.print(table)
    kept = ""
    if found.kept_parameters != found.parameters:
        kept = f" ({found.kept_parameters:,} kept: {found.bits_per_kept_weight:.2f} bits each)"
    console.print(
        f"{found.parameters:,} weights{kept}, {found.bytes_on_disk / 1e6:.2f} MB on disk, "
        f"{found.bits_per_weight:.2f} bits per weight"
    )
    meta = found.meta
    recipe = meta.get("recipe")
    if recipe:
        console.print(
            f"recipe: {escape(str(recipe.get('name') or '(unnamed)'))}: {escape(recipe.get('description') or '')}"
        )
    for report in meta.get("stages") or []:
        line = f"  stage {report.get('stage')} {report.get('method')}: {_scalar_items(report)}"
        console.print(escape(line), soft_wrap=False)
    metrics = meta.get("metrics") or {}
    if metrics.get("compressed"):  # the size as the files measure it
        mine = {**metrics["compressed"], "bytes_on_disk": found.bytes_on_disk, "bits_per_weight": found.bits_per_weight}
        if found.kept_parameters != found.parameters:
            mine["bits_per_kept_weight"] = found.bits_per_kept_weight
        console.print(metrics_table("against the original", {"original": metrics.get("original"), "this model": mine}))
    for key, label in (("calibration", "calibrated on"), ("data", "evaluated on")):
        m = meta.get(key)
        if m:
            console.print(
                f"{label}: {escape(str(m.get('source')))} {m.get('split')} split, {m.get('windows')} windows x "
                f"{m.get('seq_len')} tokens, sha256 {str(m.get('sha256'))[:16]}"
            )
    versions = meta.get("versions")
    if versions:
        made = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "python")
        console.print(f"made {meta.get('created', '')} with {made}".replace("made  with", "made with"))


@app.command("inspect")
@handles_errors
def inspect_cmd(model: ModelArg = "builtin", as_json: JsonOpt = False) -> None:
    """What a directory, GGUF file or ONNX export holds: formats, bits, recipe, metrics, data."""
    found = inspect_model(model)
    if as_json:
        _print_json(found.to_dict())
        return
    print_inspection(found)
