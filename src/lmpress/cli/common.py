"""What every ``lmpress`` command shares: the Typer app, the options, one-line errors with exit
code 2, logging and thread set-up, and the metrics table."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io import resolve_path
from lmpress.model_source import LoadOptions
from lmpress.track import TrackOptions

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


@dataclass(frozen=True)
class RunFlags:
    """What every command that runs models shares: its output, its threads, its run record."""

    as_json: bool = False
    threads: int = 0
    track: bool | None = None
    runs_dir: Path | None = None
    tracking_uri: str | None = None
    quiet: bool = False

    @property
    def progress(self) -> bool:
        """Progress bars and log lines: neither with --json nor with --quiet."""
        return not (self.as_json or self.quiet)

    def setup(self) -> None:
        """Logging and threads, before any work (`_setup`)."""
        _setup(self.threads, not self.progress)

    def tracking(self, runs_dir: Path | None = None) -> TrackOptions:
        """Where the run is recorded; ``runs_dir``: the command's own default for --runs-dir."""
        return _track_options(self.track, self.runs_dir or runs_dir, self.tracking_uri)


# the groups a command can take as one parameter (`option_groups`): each field's option; the
# defaults are the group's own
OPTION_GROUPS: dict[type, dict[str, Any]] = {
    LoadOptions: {"device": DeviceOpt, "dtype": DtypeOpt, "allow_pickle": PickleOpt, "trust_remote_code": RemoteOpt},
    RunFlags: {
        "as_json": JsonOpt,
        "threads": ThreadsOpt,
        "track": TrackOpt,
        "runs_dir": RunsDirOpt,
        "tracking_uri": TrackingUriOpt,
        "quiet": QuietOpt,
    },
}


def option_groups(fn: F) -> F:
    """Let a command take a group of options as one parameter (``*, run: RunFlags``): Typer sees
    the group's fields as options in its place (`OPTION_GROUPS`), and the command gets the group."""
    sig = inspect.signature(fn, eval_str=True)
    groups = {p.name: p.annotation for p in sig.parameters.values() if p.annotation in OPTION_GROUPS}
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        if p.name not in groups:
            params.append(p)
            continue
        options = OPTION_GROUPS[p.annotation]
        params += [
            inspect.Parameter(f.name, p.kind, default=f.default, annotation=options[f.name])
            for f in fields(p.annotation)
        ]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        for name, group in groups.items():
            kwargs[name] = group(**{f.name: kwargs.pop(f.name) for f in fields(group)})
        return fn(**kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]


def one_line(text: str) -> str:
    """``text`` with every control character (a newline, a tab, an escape sequence, in a path or in a
    library's message) written as its escape, so that it prints as one line and cannot move the cursor,
    recolour the terminal or pose as a second message."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail_line(message: str) -> None:
    """Print ``error: MESSAGE`` as one line on stderr."""
    from rich.markup import escape

    # escaped: messages name extras like 'lmpress[onnx]', which rich would read as markup
    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    fail_line(message)
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
        except (typer.Exit, typer.Abort):  # a command's own exit (``_fail``), already said
            raise
        except MemoryError:
            _fail("out of memory; try a smaller --max-windows or --calib-windows, or --max-memory to plan the run", 2)
        except Exception as e:  # a bug, not bad input: still one line, the traceback on request
            if os.environ.get("LMPRESS_DEBUG"):
                raise
            where = traceback.extract_tb(e.__traceback__)[-1]
            _fail(
                f"internal error {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
                f"(at {Path(where.filename).name}:{where.lineno}); this is a bug in lmpress: please report it, "
                "with the traceback LMPRESS_DEBUG=1 prints",
                1,
            )

    return wrapper  # type: ignore[return-value]


class _LogFormat(logging.Formatter):
    """lmpress's progress lines as plain sentences; warnings and errors say so, and name the
    library they come from when it is not lmpress."""

    def format(self, record: logging.LogRecord) -> str:
        message = one_line(record.getMessage())  # a path in a message never breaks the line
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


def model_dir(model: str) -> Path | None:
    """The directory a model argument names, when it is one: outputs are checked against it."""
    try:
        return resolve_path(model)
    except LmpressError:
        return None


def _track_options(track: bool | None, runs_dir: Path | None, tracking_uri: str | None) -> Any:
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
    ("kl_median", "KL median"),
    ("kl_p99", "KL 99th percentile"),
    ("kl_p999", "KL 99.9th percentile"),
    ("kl_max", "KL maximum"),
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
