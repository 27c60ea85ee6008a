"""Run directories and experiment tracking: every ``compress``, ``eval`` and ``search`` leaves a record.

A run directory (``<runs_dir>/<time>-<command>-<name>/``) holds ``run.json`` (the command, recipe,
stage reports, metrics against the original, data manifests, generation samples, library
versions and where the model was written) and ``recipe.yaml``; training stages write their
TensorBoard curves under it when the model is not saved elsewhere. `lmpress report` reads run
directories.

The same record goes to MLflow: the recipe as parameters (``stage1.method``, ``stage1.bits``,
...), the metrics (``compressed.perplexity``, ``original.bytes_on_disk``, ...), and the run
directory as artifacts. The store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else a local
SQLite store beside the run directories (``<runs_dir>/mlflow.db``, artifacts in
``<runs_dir>/mlartifacts``). ``--no-track`` (or ``LMPRESS_TRACK=0``) turns all of it off.

A tracking failure is a warning, never a stopped job or a lost result: a runs directory that cannot
be created (under a file, on a read-only file system), a record that cannot be written, an MLflow
store that refuses the run: each prints one ``warning:`` line and the command goes on with tracking
off, its output and exit code unchanged. A run that fails or is interrupted leaves no run directory
behind: lmpress removes the one it created (and a runs directory it created that is left empty).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpress.errors import LmpressError
from lmpress.export.registry import exporter_for
from lmpress.io import META_FILE, LoadedModel, library_versions, write_json_atomic
from lmpress.io.meta import read_meta
from lmpress.pipeline import compress

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


def _default_runs_dir() -> Path:
    return Path(os.environ.get("LMPRESS_RUNS_DIR", "lmpress-runs"))


def _default_enabled() -> bool:
    return os.environ.get("LMPRESS_TRACK", "1").lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class TrackOptions:
    """Where runs are recorded; ``enabled=False`` records nothing."""

    enabled: bool = field(default_factory=_default_enabled)
    runs_dir: Path = field(default_factory=_default_runs_dir)
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else SQLite in runs_dir
    experiment: str = "lmpress"
    mlflow: bool = True

    def resolved_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(self.runs_dir / 'mlflow.db').resolve()}"


def _reason(e: BaseException) -> str:
    """An exception as a short phrase for a warning line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return ((str(e).splitlines() or [""])[0] or type(e).__name__)[:300]


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; returns the directories created, deepest first."""
    missing = []
    p = path
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return missing


def _open_run_dir(opts: TrackOptions, command: str, name: str) -> tuple[Path, list[Path]] | None:
    """A fresh run directory and the runs directories created for it (deepest first); None, with one
    warning, when it cannot be created: the command goes on untracked."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name[:200]).strip("-")[:60] or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    created: list[Path] = []
    try:
        created = _make_dirs(opts.runs_dir)
        for i in range(1000):
            path = opts.runs_dir / (f"{stamp}-{command}-{slug}" + (f"-{i}" if i else ""))
            try:
                path.mkdir()
                return path, created
            except FileExistsError:
                continue
        reason = "1000 runs of this name this second"
    except OSError as e:
        reason = _reason(e)
    _remove_empty(created)
    log.warning(
        "cannot create a run directory in %s (%s); going on without tracking (choose --runs-dir or --no-track)",
        opts.runs_dir,
        reason,
    )
    return None


def new_run_dir(opts: TrackOptions, command: str, name: str) -> Path | None:
    """A fresh, unique run directory (created), or None (with a warning) when it cannot be created."""
    opened = _open_run_dir(opts, command, name)
    return opened[0] if opened is not None else None


def _remove_empty(dirs: list[Path]) -> None:
    """Remove each of ``dirs`` (deepest first) that is empty; stop at the first that is not."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _discard(run_dir: Path, created: list[Path], everything: bool) -> None:
    """Remove a run directory that recorded no run: all of it (``everything``: a run that failed), or
    only what the record wrote (the work of a finished run, e.g. its training curves, stays); then
    the runs directories created for it that are left empty."""
    if everything:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        for name in (RUN_FILE, "recipe.yaml"):
            with contextlib.suppress(OSError):
                (run_dir / name).unlink(missing_ok=True)
        _remove_empty([run_dir])
    _remove_empty(created)


def flat_params(recipe: dict[str, Any] | None) -> dict[str, str]:
    """Recipe as MLflow parameters: ``recipe.name``, ``stage1.method``, ``stage1.bits``, ..."""
    if not recipe:
        return {}
    out = {"recipe.name": str(recipe.get("name"))[:500]}
    for i, stage in enumerate(recipe.get("stages", []), 1):
        for key, value in stage.items():
            text = json.dumps(value) if isinstance(value, list | dict) else str(value)
            out[f"stage{i}.{key}"] = text[:500]
    return out


def flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"original": {...}, "compressed": {...}}`` -> ``original.perplexity`` ... (finite numbers only)."""
    out = {}
    for who, values in metrics.items():
        for key, value in (values or {}).items():
            if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
                out[f"{who}.{key}"] = float(value)
    return out


def record_run(
    opts: TrackOptions,
    command: str,
    name: str,
    record: dict[str, Any],
    run_dir: Path | None = None,
    recipe_yaml: str | None = None,
) -> Path | None:
    """Write ``run.json`` (and ``recipe.yaml``) into a run directory and log it to MLflow.

    Returns the run directory, or None when tracking is off or failed (with one warning)."""
    if not opts.enabled:
        return None
    created: list[Path] = []
    if run_dir is None:
        opened = _open_run_dir(opts, command, name)
        if opened is None:
            return None
        run_dir, created = opened
    return _record(opts, command, name, record, run_dir, created, recipe_yaml)


def _record(
    opts: TrackOptions,
    command: str,
    name: str,
    record: dict[str, Any],
    run_dir: Path,
    created: list[Path],
    recipe_yaml: str | None,
) -> Path | None:
    """`record_run` into an existing run directory; a failure to write is one warning and no record."""
    try:
        record = {
            "command": command,
            "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **record,
            "versions": library_versions(),
        }
        if recipe_yaml is not None:
            (run_dir / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
        write_json_atomic(run_dir / RUN_FILE, record)
    except Exception as e:  # the work is done (and saved); tracking must not stop or lose it
        log.warning("cannot write the run record in %s (%s); the run is not tracked", run_dir, _reason(e))
        _discard(run_dir, created, everything=False)
        return None
    except BaseException:  # interrupted before the record was written: leave no empty run behind
        if not (run_dir / RUN_FILE).is_file():
            _discard(run_dir, created, everything=False)
        raise
    if opts.mlflow:
        run_id = log_mlflow(opts, command, name, record, run_dir)
        if run_id is not None:
            record["mlflow"] = {"tracking_uri": opts.resolved_uri(), "run_id": run_id}
            try:
                write_json_atomic(run_dir / RUN_FILE, record)
            except Exception as e:
                log.warning("cannot add the MLflow run id to %s (%s)", run_dir / RUN_FILE, _reason(e))
    return run_dir


def log_mlflow(opts: TrackOptions, command: str, name: str, record: dict[str, Any], run_dir: Path) -> str | None:
    """Log one run; returns its MLflow run id, or None (with a warning) if tracking failed."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError:
        log.warning("mlflow is not installed; the run is recorded in %s only", run_dir)
        return None
    uri = opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "the local store"
    try:
        uri = opts.resolved_uri()
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(opts.experiment)
        if exp is None:
            local = uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI") and not opts.tracking_uri
            location = (opts.runs_dir / "mlartifacts").resolve().as_uri() if local else None
            exp_id = client.create_experiment(opts.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name=f"{command} {name}"[:200], tags={"lmpress.command": command})
        rid = run.info.run_id
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in flat_params(record.get("recipe")).items()]
        if record.get("source_model"):
            params.append(Param("model", str(record["source_model"])[:500]))
        metrics = [Metric(k, v, now, 0) for k, v in flat_metrics(record.get("metrics") or {}).items()]
        for step, loss in _curve(record):
            metrics.append(Metric("train.loss", loss, now, step))
        for key, points in {**(record.get("series") or {}), **round_series(record)}.items():  # trials, rounds
            metrics += [Metric(key, float(v), now, int(step)) for step, v in points]
        client.log_batch(rid, metrics=metrics, params=params)
        client.log_artifacts(rid, str(run_dir))
        client.set_terminated(rid)
        del mlflow
        return str(rid)
    except Exception as e:  # the work is done and saved; tracking must not lose it
        log.warning("MLflow logging to %s failed (%s); the run is recorded in %s", uri, _reason(e), run_dir)
        return None


def _curve(record: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, loss) of the first training stage, for an MLflow chart."""
    for stage in record.get("stages") or []:
        history = stage.get("history") if isinstance(stage, dict) else None
        if history:
            return [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h and "step" in h]
    return []


def round_series(record: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """A federated stage's rounds as MLflow series: each client's held-out loss of the global model
    (step r: after r rounds), bytes each way and seconds per round."""
    series: dict[str, list[tuple[int, float]]] = {}
    for stage in record.get("stages") or []:
        rounds = stage.get("rounds") if isinstance(stage, dict) else None
        if not rounds:
            continue
        for r in rounds:
            for c in r["clients"]:
                series.setdefault(f"federated.{c['name']}.held_out_loss", []).append(
                    (r["round"] - 1, c["global_held_out_loss"])
                )
            for key in ("bytes_up", "bytes_down", "seconds"):
                series.setdefault(f"federated.{key}", []).append((r["round"], float(r[key])))
        for name, loss in (stage.get("final_held_out_loss") or {}).items():
            series.setdefault(f"federated.{name}.held_out_loss", []).append((len(rounds), float(loss)))
    return series


def load_run(path: Path) -> dict[str, Any]:
    """A run directory's record (or a saved model directory's ``lmpress.json``)."""
    for candidate in (path / RUN_FILE, path / META_FILE):
        if candidate.name == META_FILE and candidate.is_file():  # a saved model: its record checked
            record = read_meta(path)
            record.setdefault("name", path.name)
            record["path"] = str(path)
            return record
        if candidate.is_file():
            try:
                data: dict[str, Any] = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LmpressError(f"{candidate} is not valid JSON ({e}); re-run it") from None
            data.setdefault("name", path.name)
            data["path"] = str(path)
            return data
    raise LmpressError(f"{path} is not a run directory (no {RUN_FILE}) nor a saved model (no {META_FILE})")


def refuse_export(model: Any) -> None:
    """Refuse to compress an export that runs in a runtime of its own (a GGUF file, an ONNX
    directory): its source is what lmpress compresses. Both ways into a compression say so first
    (`lmpress.compress` and `tracked_compress`); the compress flow below them knows no exports."""
    if not isinstance(model, LoadedModel) and (exporter := exporter_for(model)) is not None:
        raise LmpressError(
            f"{model} runs in {exporter.runtime}, not in PyTorch; compress the Hugging Face or lmpress directory it "
            "was exported from, then export the result"
        )


def tracked_compress(tracking: TrackOptions, model: Any, recipe: Any, data: Any, **kw: Any) -> tuple[Any, Path | None]:
    """`lmpress.pipeline.compress` inside a run directory (removed again if the compression fails or
    is interrupted); ``kw`` as `lmpress.pipeline.compress_model` (``max_memory`` as given: bytes or a
    size such as "4GB"). A run directory that cannot be created is a warning: the compression goes
    on untracked and returns None for it."""
    import yaml

    refuse_export(model)
    opened = _open_run_dir(tracking, "compress", recipe.name) if tracking.enabled else None
    run_dir, created = opened if opened is not None else (None, [])
    try:
        work = run_dir / "work" if run_dir is not None and kw.get("output") is None else None
        result = compress(model, recipe, data, work_dir=work, **kw)
    except BaseException:
        if run_dir is not None:
            _discard(run_dir, created, everything=True)
        raise
    if run_dir is None:
        return result, None
    record = {
        "source_model": str(getattr(model, "source", model))[:1000],
        **result.summary(),
    }
    recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False)  # a recipe file is at most 1 MB
    return result, _record(tracking, "compress", recipe.name, record, run_dir, created, recipe_yaml)
