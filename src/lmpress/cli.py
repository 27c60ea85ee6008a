"""The ``lmpress`` command line: thin Typer commands over the Python API.

    lmpress eval                                  # the built-in model on the built-in corpus
    lmpress eval out/bf16 --reference builtin     # + KL and top-1 agreement vs the original
    lmpress compress -r bf16 -o out/bf16          # a recipe file or preset on the built-in model
    lmpress train-reference --out runs/reference  # retrain the built-in model

Bad input prints one line and exits with code 2; nothing is written.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.table import Table

from lmpress.data import Split
from lmpress.errors import LmpressError
from lmpress.pipeline import DataOptions

app = typer.Typer(
    help="Make GPT-style language models smaller and faster, and measure what it cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


class SplitName(StrEnum):
    train = "train"
    calib = "calib"
    eval = "eval"
    all = "all"


ModelArg = Annotated[str, typer.Argument(help="model directory or built-in name")]
DataOpt = Annotated[str, typer.Option("--data", help="text file, directory, .jsonl file, or 'stdlib'")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda")]
DtypeOpt = Annotated[str, typer.Option(help="auto (as stored), float32, bfloat16 or float16")]
_D = DataOptions  # the defaults live there; the help shows them
SeqLenOpt = Annotated[int | None, typer.Option("--seq-len", min=2, help=f"tokens per window [default: {_D.seq_len}]")]
WindowsOpt = Annotated[
    int | None, typer.Option("--max-windows", min=1, help=f"evaluation windows [default: {_D.eval_windows}]")
]
CalibOpt = Annotated[
    int | None, typer.Option("--calib-windows", min=1, help=f"calibration windows [default: {_D.calib_windows}]")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
SpeedOpt = Annotated[bool, typer.Option("--speed/--no-speed", help="measure prefill and decode speed")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="load *.bin/*.pt weights (weights_only=True)")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="run the model directory's own code")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0, help="CPU threads for PyTorch (0: its default)")]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="JSONL field holding the text")]
PatternOpt = Annotated[str, typer.Option("--pattern", help="glob for files inside a data directory")]
TrackOpt = Annotated[
    bool | None, typer.Option("--track/--no-track", help="write a run directory and log to MLflow [default: on]")
]
RunsDirOpt = Annotated[
    Path | None,
    typer.Option("--runs-dir", help="where run directories go [default: $LMPRESS_RUNS_DIR or lmpress-runs]"),
]
TrackingUriOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow store [default: $MLFLOW_TRACKING_URI or SQLite in --runs-dir]"),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or log lines; errors still print")]
SamplesOpt = Annotated[
    int, typer.Option("--samples", min=0, help="generation samples from both models, for the report")
]


def _fail(message: str, code: int) -> None:
    from rich.markup import escape

    # escaped: messages name extras like 'lmpress[onnx]', which rich would read as markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handles_errors(fn: F) -> F:
    """Turn lmpress's errors into one line on stderr and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LmpressError as e:
            _fail(str(e), 2)
        except OSError as e:  # a file system problem the checks did not foresee: still one line
            _fail(f"{e.strerror or e} ({e.filename or 'file system'}); nothing was written", 2)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)

    return wrapper  # type: ignore[return-value]


class _LogFormat(logging.Formatter):
    """lmpress's progress lines as plain sentences; warnings and errors say so, and name the
    library they come from when it is not lmpress."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            return message
        origin = "" if record.name.split(".")[0] == "lmpress" else f" ({record.name})"
        return f"{record.levelname.lower()}{origin}: {message}"


def _setup(threads: int, quiet: bool = False) -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("lmpress").setLevel(logging.WARNING if quiet else logging.INFO)
    if threads:
        torch.set_num_threads(threads)


def _track_options(track: bool | None, runs_dir: Path | None, tracking_uri: str | None) -> Any:
    from lmpress.track import TrackOptions

    given: dict[str, Any] = {}
    if track is not None:
        given["enabled"] = track
    if runs_dir is not None:
        given["runs_dir"] = runs_dir
    return TrackOptions(tracking_uri=tracking_uri, **given)


def _fmt(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("parameters", "bytes", "bytes_on_disk", "eval_tokens"):
        return f"{int(value):,}"
    if key in ("accuracy", "top1_agreement"):
        return f"{100 * value:.2f}%"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4f}"


_ROWS = [
    ("perplexity", "perplexity"),
    ("nll", "NLL (nats/token)"),
    ("accuracy", "next-token accuracy"),
    ("kl", "KL vs reference (nats/token)"),
    ("top1_agreement", "top-1 agreement vs reference"),
    ("parameters", "parameters"),
    ("bytes_on_disk", "bytes on disk"),
    ("bits_per_weight", "bits per weight"),
    ("bits_per_kept_weight", "bits per kept weight (sparse)"),
    ("weights_memory_mb", "weights in memory (MiB)"),
    ("prefill_tokens_per_s", "prefill tokens/s (batch 1)"),
    ("batched_prefill_tokens_per_s", "prefill tokens/s (batch 8)"),
    ("decode_tokens_per_s", "decode tokens/s (batch 1)"),
    ("peak_memory_mb", "peak memory (MiB)"),
    ("eval_tokens", "evaluated tokens"),
]


def metrics_table(title: str, columns: dict[str, dict[str, float] | None]) -> Table:
    """One row per metric, one column per model."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    cols = {k: v for k, v in columns.items() if v is not None}
    for name in cols:
        table.add_column(name, justify="right")
    for key, label in _ROWS:
        if any(key in m for m in cols.values()):
            table.add_row(label, *(_fmt(key, m.get(key)) for m in cols.values()))
    return table


def _data_options(data: str, pattern: str, text_field: str, **given: int | None) -> DataOptions:
    """`DataOptions` from the flags the user gave; the rest keep DataOptions' own defaults."""
    chosen = {k: v for k, v in given.items() if v is not None}
    return DataOptions(source=data, pattern=pattern, text_field=text_field, **chosen)


def _json_default(o: object) -> object:
    return None if isinstance(o, float) and math.isnan(o) else str(o)


def _print_json(data: object) -> None:
    text = json.dumps(data, indent=2, default=_json_default)
    sys.stdout.write(text.replace("NaN", "null") + "\n")


@app.command("eval")
@handles_errors
def eval_cmd(
    model: ModelArg = "builtin",
    reference: Annotated[str | None, typer.Option(help="model to compare against (KL, top-1 agreement)")] = None,
    data: DataOpt = "stdlib",
    split: Annotated[SplitName, typer.Option(help="which split of --data to evaluate on")] = SplitName.eval,
    seq_len: SeqLenOpt = None,
    max_windows: WindowsOpt = None,
    tokenizer: Annotated[str | None, typer.Option(help="take the tokenizer from this model directory")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    speed: SpeedOpt = True,
    as_json: JsonOpt = False,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    threads: ThreadsOpt = 0,
    pattern: PatternOpt = "**/*",
    text_field: TextFieldOpt = "text",
    track: TrackOpt = None,
    runs_dir: RunsDirOpt = None,
    tracking_uri: TrackingUriOpt = None,
    quiet: QuietOpt = False,
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
    from lmpress.api import evaluate
    from lmpress.track import record_run

    _setup(threads, quiet or as_json)
    tracking = _track_options(track, runs_dir, tracking_uri)
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
            as_json,
            tracking,
            quiet,
            kw={
                "device": device,
                "dtype": dtype,
                "tokenizer": tokenizer,
                "allow_pickle": allow_pickle,
                "trust_remote_code": trust_remote_code,
            },
        )
        return
    result = evaluate(
        model,
        _data_options(data, pattern, text_field, seq_len=seq_len, eval_windows=max_windows),
        reference=reference,
        split=cast(Split, split.value),
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        measure_speed=speed,
        progress=not (as_json or quiet),
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    record = {
        "source_model": model,
        "reference_model": reference,
        "metrics": {"evaluated": result.metrics, **({"reference": result.reference_metrics} if reference else {})},
        "data": result.data.to_dict(),
    }
    run_dir = record_run(tracking, "eval", Path(model).name or model, record)
    if as_json:
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
    as_json: bool,
    tracking: Any,
    quiet: bool,
    kw: dict[str, Any],
) -> None:
    from lmpress.api import evaluate_tasks
    from lmpress.track import record_run

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    result = evaluate_tasks(
        model,
        names,
        reference=reference,
        task_path=task_path,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        progress=not (as_json or quiet),
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
    if as_json:
        _print_json({**result.to_dict(), "run_dir": str(run_dir) if run_dir else None})
        return
    shots = f", {num_fewshot}-shot" if num_fewshot else ""
    console.print(tasks_table(f"lm-eval tasks{shots}", {"model": result.scores, "reference": ref}))
    counts = ", ".join(f"{t} {n}" for t, n in result.scores.samples.items())
    console.print(f"model: {model}" + (f"\nreference: {reference}" if reference else ""), soft_wrap=True)
    console.print(f"documents: {counts}" + (" (--limit)" if limit else ""), soft_wrap=True)
    if run_dir:
        console.print(f"run: {run_dir}", soft_wrap=True)


@app.command()
@handles_errors
def compress(
    model: ModelArg = "builtin",
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe YAML file or preset name")] = ...,  # type: ignore[assignment]
    output: Annotated[Path | None, typer.Option("--output", "-o", help="directory to write")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty output directory")] = False,
    data: DataOpt = "stdlib",
    seq_len: SeqLenOpt = None,
    max_windows: WindowsOpt = None,
    calib_windows: CalibOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    run_eval: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate against the original")] = True,
    speed: SpeedOpt = True,
    as_json: JsonOpt = False,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    threads: ThreadsOpt = 0,
    pattern: PatternOpt = "**/*",
    text_field: TextFieldOpt = "text",
    track: TrackOpt = None,
    runs_dir: RunsDirOpt = None,
    tracking_uri: TrackingUriOpt = None,
    samples: SamplesOpt = 3,
    quiet: QuietOpt = False,
    export_to: Annotated[
        str | None,
        typer.Option(
            "--export",
            help="also write the result for a runtime: gguf (OUT.gguf beside -o), compressed-tensors "
            "(OUT-compressed-tensors/), onnx (OUT-onnx/)",
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
) -> None:
    """Compress a model with a recipe, measure it against the original, and save it.

    Post-training recipes (quantization without training) stream when -o is given: the model is
    read from its safetensors files one block at a time, so memory follows one block, not the model."""
    from lmpress.recipe import load_recipe

    _setup(threads, quiet or as_json)
    export_path = _export_path(export_to, output, overwrite)
    tracking = _track_options(track, runs_dir, tracking_uri)
    parsed = load_recipe(recipe)  # a bad recipe fails here, before any run directory exists
    from lmpress.memory import parse_size
    from lmpress.track import tracked_compress

    budget = parse_size(max_memory) if max_memory is not None else None

    result, run_dir = tracked_compress(
        tracking,
        model,
        parsed,
        _data_options(
            data, pattern, text_field, seq_len=seq_len, eval_windows=max_windows, calib_windows=calib_windows
        ),
        output=output,
        overwrite=overwrite,
        device=device,
        dtype=dtype,
        run_eval=run_eval,
        measure_speed=speed,
        progress=not (as_json or quiet),
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        samples=samples if run_eval else 0,
        max_memory=budget,
        stream=None if stream else False,
        clients=[Path(c) for arg in clients or [] for c in arg.split(",") if c] or None,
    )
    exported = None
    if export_path is not None and result.output is not None:
        from lmpress.export import ExportError, export

        try:
            exported = export(result.output, export_to or "gguf", export_path, overwrite=overwrite).to_dict()
        except ExportError as e:
            raise ExportError(
                f"{e} (the compressed model is saved in {result.output}; export it with lmpress export)"
            ) from None
    print_compressed(result, run_dir, exported, as_json)


def print_compressed(result: Any, run_dir: Path | None, exported: dict[str, Any] | None, as_json: bool) -> None:
    """What ``compress`` (and ``federated serve``) print: the stages, the table, where things went."""
    if as_json:
        _print_json({**result.summary(), "run_dir": str(run_dir) if run_dir else None, "export": exported})
        return
    for s in result.stages:
        console.print(f"stage {s['stage']} {s['method']}: done in {s['seconds']:.1f} s")
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


def _export_path(to: str | None, output: Path | None, overwrite: bool) -> Path | None:
    """Where ``compress --export`` writes, checked before any work."""
    if to is None:
        return None
    from lmpress.export import FORMATS, ExportError, check_export_output, default_output

    if to not in FORMATS:
        raise ExportError(f"--export {to}: unknown format; choose one of {', '.join(FORMATS)}")
    if output is None:
        beside = default_output(to, Path("OUT"))
        raise ExportError(f"--export needs -o OUT: the export is written beside the saved directory, as {beside}")
    path = default_output(to, output)
    check_export_output(to, path, overwrite)
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
            help="format: gguf (llama.cpp, Ollama, LM Studio), compressed-tensors (transformers, vLLM), "
            "onnx (ONNX Runtime)",
        ),
    ] = "gguf",
    output: Annotated[
        Path, typer.Option("--output", "-o", help="file (model.gguf) or directory (compressed-tensors, onnx) to write")
    ] = ...,  # type: ignore[assignment]
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
    from lmpress.api import load
    from lmpress.export import check_export_output, check_export_source, export

    _setup(threads, quiet or as_json)
    check_export_output(to, output, overwrite)  # before loading anything
    check_export_source(model)
    loaded = load(model, device="cpu", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    report = export(loaded, to, output, requantize=requantize, densify=densify, overwrite=overwrite).to_dict()
    if as_json:
        _print_json(report)
        return
    console.print(_export_line(report), soft_wrap=True)
    for module, why in report.get("requantized", {}).items():
        console.print(f"  requantized {module}: {why}", soft_wrap=True)


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

    kinds = {"lmpress": "lmpress directory", "huggingface": "Hugging Face directory", "gguf": "GGUF file"}
    kinds["onnx"] = "ONNX directory"
    console.print(f"[bold]{escape(found.source)}[/] ({kinds.get(found.kind, found.kind + ' directory')})")
    if found.architecture:
        console.print(escape(_architecture_line(found.architecture)))
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
    """What a model directory, GGUF file or ONNX directory holds: architecture, bytes and bits per
    storage format, the recipe and its stage reports, metrics against the original, the data."""
    from lmpress.inspection import inspect_model

    found = inspect_model(model)
    if as_json:
        _print_json(found.to_dict())
        return
    print_inspection(found)


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
    from lmpress.io import atomic_dir
    from lmpress.models.card import write_card
    from lmpress.models.loading import resolve_device
    from lmpress.models.reference import ReferenceSpec, train_reference

    _setup(threads, quiet or as_json)
    dev = str(resolve_device(device))
    with atomic_dir(output, overwrite) as tmp:
        info = train_reference(ReferenceSpec(minutes=minutes, tokens=tokens), tmp, device=dev, progress=not as_json)
        card = write_card(tmp, info, card_windows)
    if as_json:
        _print_json({"output": str(output), **info, "card": card})
        return
    console.print(f"saved to {output} ({info['parameters']:,} parameters, {info['train_minutes']:.1f} min)")


@app.command("methods")
def methods_cmd(as_json: JsonOpt = False) -> None:
    """List the compression methods a recipe can use (keys: docs/recipes.md)."""
    from lmpress.registry import methods

    if as_json:
        _print_json({n: {"summary": m.summary, "keys": list(m.config.model_fields)} for n, m in methods().items()})
        return
    for name, m in sorted(methods().items()):
        console.print(f"[bold]{name}[/]  {m.summary}")


@app.command("presets")
def presets_cmd(as_json: JsonOpt = False) -> None:
    """List the recipes shipped with lmpress (each is a YAML file to copy and edit)."""
    from lmpress.recipe import load_recipe, presets

    if as_json:
        _print_json({n: {**load_recipe(n).to_dict(), "file": str(p)} for n, p in presets().items()})
        return
    for name in presets():
        console.print(f"[bold]{name}[/]  {load_recipe(name).description}")


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
def demo_cmd(
    presets: Annotated[str, typer.Option(help="comma-separated presets to run")] = ",".join(
        ("w8", "w8a8", "w4", "sparse50", "w4-sparse", "edge")
    ),
    out_dir: Annotated[Path, typer.Option("--out-dir", help="models, run records and report.html go here")] = Path(
        "lmpress-demo"
    ),
    max_windows: Annotated[int, typer.Option("--max-windows", min=1, help="evaluation windows")] = 32,
    speed: SpeedOpt = True,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = 0,
    track: TrackOpt = None,
    runs_dir: RunsDirOpt = None,
    tracking_uri: TrackingUriOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compress the built-in model with several presets, compare them in one table, write the report."""
    from lmpress.demo import run_demo

    _setup(threads, quiet or as_json)
    tracking = _track_options(track, runs_dir or out_dir / "runs", tracking_uri)
    names = [n.strip() for n in presets.split(",") if n.strip()]
    result = run_demo(names, out_dir, tracking, max_windows, progress=not (as_json or quiet), measure_speed=speed)
    if as_json:
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
    from lmpress.report import write_report

    path = write_report(runs, output, title)
    if as_json:
        _print_json({"report": str(path)})
    else:
        console.print(f"report: {path}", soft_wrap=True)


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
    from lmpress.io import check_output_dir
    from lmpress.models.loading import load_model
    from lmpress.recipe import parse_recipe
    from lmpress.search import SearchConfig, SearchError, calibration_and_selection, record_study, run_search
    from lmpress.track import tracked_compress

    _setup(threads, quiet or as_json)
    try:
        raw_space = yaml.safe_load(space.read_text()) if space is not None else {}
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
        check_output_dir(output, overwrite)
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
    from lmpress.report import render
    from lmpress.search import study_runs

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
        logging.getLogger("lmpress.search").warning(
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


from lmpress.cli_federated import federated_app  # noqa: E402  (its commands use the helpers above)

app.add_typer(federated_app, name="federated")


def expand_list_options(argv: list[str], options: tuple[str, ...] = ("--clients",)) -> list[str]:
    """``--clients a/ b/ c/`` -> ``--clients a/ --clients b/ --clients c/`` (Typer options take one
    value each): the values run up to the next argument that starts with ``-``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        out.append(arg)
        i += 1
        if arg in options:
            n = 0
            while i < len(argv) and not argv[i].startswith("-"):
                out += [arg, argv[i]] if n else [argv[i]]
                n += 1
                i += 1
    return out


def main() -> None:
    app(args=expand_list_options(sys.argv[1:]))
