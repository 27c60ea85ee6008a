"""The compress flow: run a recipe's stages in order on one model, measure it against the original, save it.

One flow for every run. Order of work: every check before any work (`lmpress.preflight`: the
recipe, the inputs, whether the run streams, the memory budget; nothing is loaded if one is bad),
then the model's source (`lmpress.model_source`: held whole, or streamed block by block from its
safetensors files by `lmpress.streamed_run`) gives the tokenizer and the model, each stage's
``method.apply(model, config, ctx)`` runs, both models are evaluated on the same held-out windows,
and the directory is written atomically with its provenance.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lmpress.data import Manifest
from lmpress.data_options import DataOptions
from lmpress.distill.train import world
from lmpress.errors import ModelLoadError
from lmpress.io import LoadedModel, load_model, resolve_device, update_meta
from lmpress.io.files import created_parents
from lmpress.method import Context
from lmpress.model_source import LoadOptions, Measuring, ModelSource, WholeSource
from lmpress.preflight import Plan, preflight
from lmpress.recipe import Recipe
from lmpress.registry import methods
from lmpress.streamed_run import StreamedSource

log = logging.getLogger(__name__)


@dataclass
class Result:
    """A compressed model with what each stage did and its metrics against the original."""

    _model: nn.Module | None  # None: a streamed result, loaded from ``output`` on first use
    tokenizer: Any
    recipe: Recipe
    stages: list[dict[str, Any]]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "original" / "compressed"
    data: Manifest | None = None  # the evaluation windows
    calibration: dict[str, Any] | None = None  # manifest of the calibration windows, if used
    output: Path | None = None
    samples: dict[str, list[str]] | None = None  # "prompts", "original", "compressed": greedy continuations

    @property
    def model(self) -> nn.Module:
        """The compressed model (a streamed run's result is loaded from its directory when asked for)."""
        if self._model is None:
            if self.output is None:
                raise RuntimeError("this result has no model in memory and no saved directory")
            self._model = load_model(self.output).model
        return self._model

    def summary(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "recipe": self.recipe.to_dict(),
            "stages": self.stages,
            "metrics": self.metrics,
            "data": self.data.to_dict() if self.data else None,
            "calibration": self.calibration,
            "output": str(self.output) if self.output else None,
        }

    def record(self, source_model: str) -> dict[str, Any]:
        """What ``lmpress.json`` says about the run that made the model (beside its formats and versions)."""
        return {
            "source_model": source_model,
            "recipe": self.recipe.to_dict(),
            "stages": self.stages,
            "metrics": self.metrics,
            "data": self.data.to_dict() if self.data else None,
            "calibration": self.calibration,
        }


def work_dir_for(output: Path | None) -> Path | None:
    """Where training stages keep checkpoints (to resume an interrupted run) and curves: beside the output."""
    return output.with_name(output.name + ".work") if output is not None else None


def run_stages(model: nn.Module, recipe: Recipe, ctx: Context, announce: bool = True) -> list[dict[str, Any]]:
    """Apply each stage in order; returns one report per stage. ``announce``: a line as each stage
    starts and ends (off for the many small runs of a search)."""
    registry = methods()
    reports = []
    say = log.info if announce else log.debug
    for i, stage in enumerate(recipe.stages, 1):
        t0 = time.perf_counter()
        say("stage %d/%d: %s", i, len(recipe.stages), stage.method)
        report = registry[stage.method].apply(model, stage, ctx)
        reports.append({"stage": i, "method": stage.method, **report, "seconds": time.perf_counter() - t0})
        say("stage %d/%d: %s done in %.1f s", i, len(recipe.stages), stage.method, reports[-1]["seconds"])
    return reports


def compress(
    model: str | Path | LoadedModel,
    recipe: str | Path | Recipe | dict[str, Any],
    data: DataOptions | str | Path | None = None,
    *,
    output: Path | None = None,
    **options: Any,
) -> Result:
    """Compress ``model`` with ``recipe``; evaluate against the original; save to ``output`` if given.

    The options are `compress_model`'s. A failed run removes the parent directories of ``output``
    that it created; the output itself is only ever written whole (`lmpress.io.atomic_dir`).
    """
    if output is None:
        return compress_model(model, recipe, data, **options)
    with created_parents(output):
        return compress_model(model, recipe, data, output=output, **options)


def compress_model(
    model: str | Path | LoadedModel,
    recipe: str | Path | Recipe | dict[str, Any],
    data: DataOptions | str | Path | None = None,
    *,
    output: Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    run_eval: bool = True,
    measure_speed: bool = True,
    progress: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    samples: int = 0,
    work_dir: Path | None = None,
    max_memory: int | str | None = None,
    stream: bool | None = None,
    clients: list[Path] | None = None,
    serve: Any = None,
) -> Result:
    """Compress ``model`` with ``recipe``; evaluate against the original; save to ``output`` if given.

    ``data`` is a source (path or "stdlib") or `DataOptions`; its calibration split feeds the stages
    that need data, its evaluation split measures both models on the same tokens. ``samples``:
    greedy continuations of that many evaluation-text openings, by the original and the result.
    ``work_dir``: where training stages keep checkpoints and curves (default: beside ``output``).
    ``max_memory``: the budget in bytes or as a size ("4GB"; default: what the machine has
    available); a run whose estimated peak is over it stops before any work. ``stream``:
    post-training recipes with an ``output`` stream the model block by block from disk
    (`lmpress.streamed_run`) unless False.
    ``clients``: each client's data directory, for a ``federated`` stage (`lmpress.federated`).
    ``serve``: a `lmpress.federated.stage.Serve`: the federated stage waits for clients on other
    machines (``lmpress federated join``) instead.
    """
    plan = preflight(
        model,
        recipe,
        data,
        output,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        run_eval=run_eval,
        max_memory=max_memory,
        stream=stream,
        clients=clients,
        serve=serve,
    )
    world()  # under torchrun: join the process group; calibration statistics are then combined
    log.info(  # the first line of a run that passed every check
        "compressing %s with %s (%s)%s",
        model.source if isinstance(model, LoadedModel) else model,
        plan.recipe.name,
        ", ".join(s.method for s in plan.recipe.stages),
        f" into {output}" if output is not None else "",
    )
    load = LoadOptions(device, dtype, allow_pickle, trust_remote_code)
    announce = not isinstance(model, LoadedModel) and stream is not False
    source = open_source(model, plan, output, load, Measuring(measure_speed, progress, samples), announce)
    work_dir = work_dir or work_dir_for(output)
    return compress_source(source, plan, output, overwrite, run_eval, progress, work_dir, clients, serve)


def open_source(
    model: str | Path | LoadedModel,
    plan: Plan,
    output: Path | None,
    load: LoadOptions,
    measuring: Measuring,
    announce: bool,
) -> ModelSource:
    """The source of a checked run: streamed when it can stream, else whole. ``announce``: say why
    it does not stream (where it could have: a model named by path, streaming not turned off)."""
    if plan.streams:
        assert plan.path is not None and output is not None  # `why_whole`: a run streams a directory into one
        return StreamedSource(
            plan.path,
            str(model),
            plan.tokenizer,
            plan.data,
            output,
            device=resolve_device(load.device),
            dtype=load.dtype,
            budget=plan.budget,
            measuring=measuring,
        )
    return WholeSource(model, plan.why_whole, plan.data, load, measuring, announce)


def compress_source(
    source: ModelSource,
    plan: Plan,
    output: Path | None,
    overwrite: bool,
    run_eval: bool,
    progress: bool,
    work_dir: Path | None,
    clients: list[Path] | None,
    serve: Any,
) -> Result:
    """The steps of every run on its checked ``plan``, whole or streamed (`ModelSource`)."""
    data = plan.data
    with closing(source):
        tokenizer = source.load()
        if tokenizer is None:
            raise ModelLoadError(f"{source.name} has no tokenizer files; add them to the model directory")
        eval_data = data.load(tokenizer, "eval", data.eval_windows) if run_eval else None
        training = any(methods()[s.method].needs_teacher for s in plan.recipe.stages)
        model = source.open(keep_original=run_eval or training)
        ctx = Context(
            tokenizer=tokenizer,
            device=source.device,
            teacher=source.teacher,
            progress=progress,
            work_dir=work_dir,
            corpus=data.texts,
            clients=[Path(c) for c in clients] if clients else None,
            federation=serve,
        )
        # read the tokenizer when the data is needed: a vocabulary stage may have replaced it
        ctx.calibration = lambda: data.load(ctx.tokenizer, "calib", data.calib_windows)
        ctx.training = lambda: data.load(ctx.tokenizer, "train", data.train_windows)
        stages = run_stages(model, plan.recipe, ctx)
        result = Result(
            model if source.holds_whole else None,
            ctx.tokenizer,
            plan.recipe,
            stages,
            data=eval_data.manifest if eval_data else None,
            calibration=ctx.calib_manifest,
        )
        if int(os.environ.get("RANK", "0")) > 0:  # one of several torchrun processes: the first one measures and saves
            return result
        measured = source.measure(model, ctx, eval_data)
        ctx.teacher = None
        result.metrics, result.samples = measured.metrics, measured.samples
        if output is None:
            return result
        source.save(model, ctx.tokenizer, output, result.record(source.name), overwrite)
        result.output = output
    if "compressed" in result.metrics:  # the size of the saved files (and what needs them), in the record too
        source.measure_saved(measured, model, output)
        result.samples = measured.samples
        if measured.model is not None:  # a streamed run loaded the result whole (to time it)
            result._model = measured.model
        update_meta(output, metrics=result.metrics)
    return result
