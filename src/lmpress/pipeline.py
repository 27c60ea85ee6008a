"""Run a recipe's stages in order on one model, measure it against the original, save it.

Order of work: validate the recipe, then every input (`lmpress.preflight`: nothing is loaded if one is bad),
load the model, keep a copy of the original as the reference, run each stage's
``method.apply(model, config, ctx)``, evaluate both models on the same held-out windows, and write
the directory atomically with its provenance.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from lmpress.data import Manifest, Split, TokenData, load_windows, select_split
from lmpress.errors import DataError, ModelLoadError
from lmpress.evaluation import evaluate, size
from lmpress.io import (
    LoadedModel,
    load_model,
    save,
    update_meta,
)
from lmpress.io.files import created_parents
from lmpress.method import Context
from lmpress.preflight import check_inputs, check_memory, exported_runtime, why_whole
from lmpress.recipe import Recipe, load_recipe
from lmpress.registry import methods
from lmpress.sources import STDLIB, load_documents

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


@dataclass(frozen=True)
class DataOptions:
    """Where evaluation and calibration text comes from and how it is windowed.

    The window counts default to ``$LMPRESS_MAX_WINDOWS`` / ``$LMPRESS_CALIB_WINDOWS`` when set (read
    when the options are made: every command quickly, with rough numbers), else to
    ``BUILTIN_WINDOWS``."""

    BUILTIN_WINDOWS: ClassVar[dict[str, int]] = {"eval_windows": 64, "calib_windows": 128}

    source: str | Path = STDLIB
    seq_len: int = 256
    eval_windows: int | None = field(default_factory=lambda: DataOptions.env_windows("eval_windows"))
    calib_windows: int = field(default_factory=lambda: DataOptions.env_windows("calib_windows"))
    train_windows: int | None = None  # None: every window of the train split (training stages)
    pattern: str = "**/*"
    text_field: str = "text"

    def prompts(self, n: int, chars: int = 120) -> list[str]:
        """``n`` openings of evaluation text, cut at a line end: prompts for generation samples. The
        first documents' beginnings first; fewer documents than ``n`` give openings further in."""
        docs = select_split(load_documents(self.source, pattern=self.pattern, text_field=self.text_field), "eval")
        texts = [d.text for d in docs if len(d.text.strip()) >= 20]
        out: list[str] = []
        for k in range(n):  # round k: the opening at k/n of each document (at a line start)
            for text in texts:
                start = 0 if k == 0 else text.find("\n", k * len(text) // n) + 1
                piece = text[start:].lstrip()
                cut = piece.rfind("\n", 0, chars)
                if len(piece) >= 20:
                    out.append(piece[: cut + 1] if cut > 20 else piece[:chars])
                if len(out) == n:
                    return out
        return out

    def load(self, tokenizer: Any, split: Split, max_windows: int | None) -> TokenData:
        return load_windows(
            tokenizer,
            self.source,
            split,
            self.seq_len,
            max_windows,
            pattern=self.pattern,
            text_field=self.text_field,
        )

    @staticmethod
    def env_windows(name: str) -> int:
        """The default of ``eval_windows`` or ``calib_windows``: its environment variable, else built in."""
        var = {"eval_windows": "LMPRESS_MAX_WINDOWS", "calib_windows": "LMPRESS_CALIB_WINDOWS"}[name]
        text = os.environ.get(var, "").strip()
        if not text:
            return DataOptions.BUILTIN_WINDOWS[name]
        if not text.isdigit() or int(text) < 1:
            raise DataError(f"{var} must be a whole number of windows >= 1, got {text[:40]!r}")
        return int(text)


# `lmpress --help` reads the defaults from the class; a default_factory field leaves no class attribute
DataOptions.eval_windows = DataOptions.BUILTIN_WINDOWS["eval_windows"]
DataOptions.calib_windows = DataOptions.BUILTIN_WINDOWS["calib_windows"]


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
    max_memory: int | None = None,
    stream: bool | None = None,
    clients: list[Path] | None = None,
    serve: Any = None,
) -> Result:
    """Compress ``model`` with ``recipe``; evaluate against the original; save to ``output`` if given.

    ``data`` is a source (path or "stdlib") or `DataOptions`; its calibration split feeds the stages
    that need data, its evaluation split measures both models on the same tokens. ``samples``:
    greedy continuations of that many evaluation-text openings, by the original and the result.
    ``work_dir``: where training stages keep checkpoints and curves (default: beside ``output``).
    ``max_memory``: the budget in bytes (default: what the machine has available); a run whose
    estimated peak is over it stops before any work. ``stream``: post-training recipes with an
    ``output`` stream the model block by block from disk (`lmpress.streamed_run`) unless False.
    ``clients``: each client's data directory, for a ``federated`` stage (`lmpress.federated`).
    ``serve``: a `lmpress.federated.stage.Serve`: the federated stage waits for clients on other
    machines (``lmpress federated join``) instead.
    """
    from lmpress.distill.train import world
    from lmpress.errors import LmpressError
    from lmpress.io import resolve_device

    if not isinstance(model, LoadedModel) and (runtime := exported_runtime(model)):
        raise LmpressError(
            f"{model} runs in {runtime}, not in PyTorch; compress the Hugging Face or lmpress directory it was "
            "exported from, then export the result"
        )
    recipe = load_recipe(recipe)
    for stage in recipe.stages:
        if stage.method == "federated" and serve is None:  # before any work: the clients' data
            from lmpress.federated.core import check_clients

            if not clients:
                raise LmpressError(
                    "the federated stage needs client data: pass --clients DIR [DIR ...] (one per client), "
                    "or serve clients on other machines with lmpress federated serve"
                )
            check_clients([Path(c) for c in clients], stage)  # type: ignore[arg-type]
    data = data if isinstance(data, DataOptions) else DataOptions(source=data or STDLIB)
    source, tokenizer = check_inputs(model, data, output, overwrite, allow_pickle, trust_remote_code)
    world()  # under torchrun: join the process group; calibration statistics are then combined
    why = why_whole(model, recipe, output) if stream is not False else "streaming was turned off"
    if stream and why is not None:
        raise LmpressError(f"cannot stream this run: {why}")
    if allow_pickle or trust_remote_code:
        why = why or "pickle or remote-code models load whole"
    budget = check_memory(model, recipe, data, why is None, max_memory, why, run_eval)
    log.info(  # the first line of a run that passed every check
        "compressing %s with %s (%s)%s",
        model.source if isinstance(model, LoadedModel) else model,
        recipe.name,
        ", ".join(s.method for s in recipe.stages),
        f" into {output}" if output is not None else "",
    )
    if why is None:
        from lmpress.streamed_run import compress_streamed

        assert output is not None and source is not None
        path = source
        return compress_streamed(
            path,
            str(model),
            recipe,
            data,
            output=output,
            overwrite=overwrite,
            device=resolve_device(device),
            dtype=dtype,
            run_eval=run_eval,
            measure_speed=measure_speed,
            progress=progress,
            samples=samples,
            budget=budget,
            work_dir=work_dir or work_dir_for(output),
            tokenizer=tokenizer,
        )
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(
            model, device=device, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
        )
    )
    # worth a line only where streaming could have happened: a model named by path, not turned off;
    # after loading, so that a refusal of the model is the only line a bad input prints
    log.log(
        logging.DEBUG if isinstance(model, LoadedModel) or stream is False else logging.INFO, "not streaming: %s", why
    )
    if loaded.tokenizer is None:
        raise ModelLoadError(f"{loaded.source} has no tokenizer files; add them to the model directory")
    eval_data = data.load(loaded.tokenizer, "eval", data.eval_windows) if run_eval else None
    needs_teacher = any(methods()[s.method].needs_teacher for s in recipe.stages)
    original = copy.deepcopy(loaded.model) if run_eval or needs_teacher else None
    model_device = next(loaded.model.parameters()).device
    ctx = Context(
        tokenizer=loaded.tokenizer,
        device=model_device,
        teacher=original,
        progress=progress,
        work_dir=work_dir or work_dir_for(output),
        corpus=lambda: [d.text for d in load_documents(data.source, pattern=data.pattern, text_field=data.text_field)],
        clients=[Path(c) for c in clients] if clients else None,
        federation=serve,
    )
    # read the tokenizer when the data is needed: a vocabulary stage may have replaced it
    ctx.calibration = lambda: data.load(ctx.tokenizer, "calib", data.calib_windows)
    ctx.training = lambda: data.load(ctx.tokenizer, "train", data.train_windows)
    stages = run_stages(loaded.model, recipe, ctx)
    result = Result(loaded.model, ctx.tokenizer, recipe, stages, data=eval_data.manifest if eval_data else None)
    if int(os.environ.get("RANK", "0")) > 0:  # one of several torchrun processes: the first one measures and saves
        return result
    if eval_data is not None and original is not None:
        w = eval_data.windows
        if ctx.token_map is not None:  # compare on the windows the pruned vocabulary still covers
            covered = (ctx.token_map[w] >= 0).all(dim=1)
            if not bool(covered.all()):
                log.warning(
                    "%d of %d evaluation windows use dropped tokens and are left out; evaluate on the domain",
                    int((~covered).sum()),
                    len(w),
                )
            w = w[covered]
        if len(w):
            result.metrics["original"] = evaluate(
                original, w, saved_dir=loaded.path, measure_speed=measure_speed, progress=progress
            )
            result.metrics["compressed"] = evaluate(
                loaded.model,
                w,
                reference=original,
                measure_speed=measure_speed,
                progress=progress,
                token_map=ctx.token_map,
            )
    if samples and original is not None:
        from lmpress.evaluation import generate_samples

        prompts = data.prompts(samples)
        result.samples = {
            "prompts": prompts,
            "original": generate_samples(original, loaded.tokenizer, prompts),
            "compressed": generate_samples(loaded.model, ctx.tokenizer, prompts),
        }
    result.calibration = ctx.calib_manifest
    ctx.teacher = original = None
    if output is not None:
        meta = {
            "source_model": loaded.source,
            "recipe": recipe.to_dict(),
            "stages": stages,
            "metrics": result.metrics,
            "data": result.data.to_dict() if result.data else None,
            "calibration": ctx.calib_manifest,
        }
        save(loaded.model, ctx.tokenizer, output, meta, overwrite=overwrite)
        result.output = output
        if "compressed" in result.metrics:  # the size of the saved files, in the record too
            result.metrics["compressed"].update(size(loaded.model, output))
            update_meta(output, metrics=result.metrics)
    return result
