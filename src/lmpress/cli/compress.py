"""``lmpress compress`` and ``lmpress export``: run a recipe, write the result, export it for a runtime."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from lmpress.api import load
from lmpress.cli.common import (
    CalibOpt,
    DataOpt,
    JsonOpt,
    ModelArg,
    PatternOpt,
    PickleOpt,
    QuietOpt,
    RemoteOpt,
    RunFlags,
    SamplesOpt,
    SeqLenOpt,
    SpeedOpt,
    TextFieldOpt,
    ThreadsOpt,
    WindowsOpt,
    _data_options,
    _print_json,
    _setup,
    app,
    console,
    handles_errors,
    metrics_table,
    model_dir,
    option_groups,
)
from lmpress.errors import RecipeError
from lmpress.export import ExportError, check_export_output, check_export_source, default_output, export
from lmpress.export.registry import DEFAULT_FORMAT, EXPORTERS, exporter
from lmpress.formats.imatrix import read_imatrix
from lmpress.model_source import LoadOptions
from lmpress.recipe import Recipe, load_recipe
from lmpress.track import tracked_compress

# what --export and --output say, built from the registered formats
_BESIDE = ", ".join(
    f"{e.name} (OUT{e.suffix} beside -o)" if e.writes_file else f"{e.name} (OUT-{e.name}/)" for e in EXPORTERS.values()
)
_FILES = ", ".join(f"model{e.suffix}" for e in EXPORTERS.values() if e.writes_file)
_DIRS = ", ".join(e.name for e in EXPORTERS.values() if not e.writes_file)
_OUTPUT_HELP = f"file ({_FILES}) or directory ({_DIRS}) to write"


@app.command()
@handles_errors
@option_groups
def compress(
    model: ModelArg = "builtin",
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe YAML file or preset name")] = ...,  # type: ignore[assignment]
    output: Annotated[Path | None, typer.Option("--output", "-o", help="directory to write")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output directory")] = False,
    data: DataOpt = "stdlib",
    seq_len: SeqLenOpt = None,
    max_windows: WindowsOpt = None,
    calib_windows: CalibOpt = None,
    *,
    load: LoadOptions,
    run_eval: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate against the original")] = True,
    speed: SpeedOpt = True,
    pattern: PatternOpt = "**/*",
    text_field: TextFieldOpt = "text",
    run: RunFlags,
    samples: SamplesOpt = 3,
    export_to: Annotated[
        str | None,
        typer.Option(
            "--export",
            help="also write the result for a runtime: " + _BESIDE,
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option("--max-memory", help="memory budget, e.g. 4GB; refused up front if the run would not fit"),
    ] = None,
    stream: Annotated[
        bool,
        typer.Option("--stream/--no-stream", help="post-training recipes read and write one block at a time"),
    ] = True,
    clients: Annotated[
        list[str] | None,
        typer.Option(
            "--clients",
            help="federated stages: each client's data directory (--clients a/ b/ c/, or a,b,c); "
            "the data stays with its client process",
        ),
    ] = None,
    imatrix: Annotated[
        Path | None,
        typer.Option(
            "--imatrix",
            help="llama.cpp importance matrix (GGUF or .dat, e.g. from lmpress imatrix): weights the GGUF-grid "
            "fits of the recipe's rtn and hqq stages",
        ),
    ] = None,
) -> None:
    """Compress a model with a recipe, measure it against the original, and save it.

    Post-training recipes (quantization without training) stream when -o is given: the model is
    read from its safetensors files one block at a time, so memory follows one block, not the model."""
    run.setup()
    export_path = _export_path(export_to, output, overwrite, model_dir(model))
    tracking = run.tracking()
    parsed = load_recipe(recipe)  # a bad recipe fails here, before any run directory exists
    if imatrix is not None:
        parsed = with_imatrix(parsed, imatrix)

    result, run_dir = tracked_compress(
        tracking,
        model,
        parsed,
        _data_options(
            data, pattern, text_field, seq_len=seq_len, eval_windows=max_windows, calib_windows=calib_windows
        ),
        output=output,
        overwrite=overwrite,
        run_eval=run_eval,
        measure_speed=speed,
        progress=run.progress,
        samples=samples if run_eval else 0,
        max_memory=max_memory,
        stream=None if stream else False,
        clients=[Path(c) for arg in clients or [] for c in arg.split(",") if c] or None,
        **asdict(load),
    )
    exported = None
    if export_to is not None and export_path is not None and result.output is not None:
        try:
            exported = export(result.output, export_to, export_path, overwrite=overwrite).to_dict()
        except ExportError as e:
            raise ExportError(
                f"{e} (the compressed model is saved in {result.output}; export it with lmpress export)"
            ) from None
    print_compressed(result, run_dir, exported, run.as_json)


def with_imatrix(recipe: Recipe, path: Path) -> Recipe:
    """``recipe`` with the importance matrix at ``path`` given to every stage that takes one;
    the file is read now, so an unreadable one stops the run before any work."""
    read_imatrix(path)
    stages = [s.model_copy(update={"imatrix": path}) if "imatrix" in type(s).model_fields else s for s in recipe.stages]
    if all(a is b for a, b in zip(stages, recipe.stages, strict=True)):
        raise RecipeError(f"--imatrix: recipe {recipe.name} has no stage that uses an importance matrix (rtn, hqq)")
    return replace(recipe, stages=tuple(stages))


def print_compressed(result: Any, run_dir: Path | None, exported: dict[str, Any] | None, as_json: bool) -> None:
    """What ``compress`` (and ``federated serve``) print: the stages, the table, where things went."""
    if as_json:
        _print_json({**result.summary(), "run_dir": str(run_dir) if run_dir else None, "export": exported})
        return
    if result.stages:  # a summary: each stage's own line came as it finished
        console.print("stages: " + ", ".join(f"{s['method']} {s['seconds']:.1f} s" for s in result.stages))
    if result.metrics:
        console.print(
            metrics_table(
                f"{result.recipe.name} vs original",
                {"original": result.metrics.get("original"), result.recipe.name: result.metrics.get("compressed")},
            )
        )
    if result.output:
        console.print(f"saved to {result.output}")
    if exported:
        console.print(_export_line(exported), soft_wrap=True)
    if run_dir:
        console.print(f"run: {run_dir}", soft_wrap=True)


def _export_path(to: str | None, output: Path | None, overwrite: bool, source: Path | None) -> Path | None:
    """Where ``compress --export`` writes, checked before any work."""
    if to is None:
        return None
    exporter(to, "--export")
    if output is None:
        beside = default_output(to, Path("OUT"))
        raise ExportError(f"--export needs -o OUT: the export is written beside the saved directory, as {beside}")
    path = default_output(to, output)
    check_export_output(to, path, overwrite, source)
    return path


def _export_line(report: dict[str, Any]) -> str:
    types = ", ".join(f"{n} {t}" for t, n in sorted(report["types"].items()))
    line = f"exported {report['path']} ({report['bytes'] / 1e6:.2f} MB; {report.get('unit', 'tensors')}: {types})"
    if report.get("requantized"):
        kl = report.get("requantize_kl")
        line += f"; requantized {len(report['requantized'])} layers" + (f" (+{kl:.4f} KL nats/token)" if kl else "")
    return line


@app.command("export")
@handles_errors
def export_cmd(
    model: ModelArg = "builtin",
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="format: " + ", ".join(f"{e.name} ({e.help})" for e in EXPORTERS.values()),
        ),
    ] = DEFAULT_FORMAT,
    output: Annotated[Path, typer.Option("--output", "-o", help=_OUTPUT_HELP)] = ...,  # type: ignore[assignment]
    requantize: Annotated[
        str | None,
        typer.Option("--requantize", help="round layers with no exact GGUF type to this type (q4_k, q8_0 ...)"),
    ] = None,
    densify: Annotated[
        bool, typer.Option("--densify", help="write sparse, low-rank and codebook layers as exact dense weights")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing file")] = False,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    threads: ThreadsOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a model (lmpress or Hugging Face directory, or builtin) in a runtime's format."""
    _setup(threads, quiet or as_json)
    check_export_output(to, output, overwrite, model_dir(model))  # before loading anything
    check_export_source(model)
    loaded = load(model, device="cpu", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    report = export(loaded, to, output, requantize=requantize, densify=densify, overwrite=overwrite).to_dict()
    if as_json:
        _print_json(report)
        return
    console.print(_export_line(report), soft_wrap=True)
    for module, why in report.get("requantized", {}).items():
        console.print(f"  requantized {module}: {why}", soft_wrap=True)
