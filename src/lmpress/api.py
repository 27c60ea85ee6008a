"""The public verbs: compress, evaluate, load, save, search. The CLI only parses arguments and calls these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmpress import evaluation, pipeline
from lmpress.data import Manifest, Split
from lmpress.data_options import DataOptions
from lmpress.errors import DataError, ModelLoadError
from lmpress.export.registry import exporter_for
from lmpress.io import LoadedModel, load_model, save
from lmpress.io.consistency import check_seq_len
from lmpress.pipeline import Result
from lmpress.recipe import Recipe
from lmpress.recipe_search import SearchOutcome, search
from lmpress.sources import STDLIB, check_source
from lmpress.tasks import check_tasks, run_tasks
from lmpress.track import refuse_export

if TYPE_CHECKING:
    from lmpress.tasks import TaskScores

__all__ = [
    "DataOptions",
    "EvalResult",
    "Result",
    "SearchOutcome",
    "TaskResult",
    "compress",
    "evaluate",
    "evaluate_tasks",
    "load",
    "save",
    "search",
]


def load(
    source: str | Path = "builtin",
    *,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a built-in model, a Hugging Face directory, or a directory written by lmpress; an export
    that runs in a runtime of its own (a GGUF file, an ONNX directory) runs there, loaded back by
    its exporter, with its own tokenizer unless ``tokenizer`` names one."""
    if (exporter := exporter_for(source)) is not None:
        loaded = exporter.load_back(Path(source).expanduser(), tokenizer)
        loaded.source = str(source)
        return loaded
    return load_model(
        source,
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )


def compress(
    model: str | Path | LoadedModel,
    recipe: str | Path | Recipe | dict[str, Any],
    data: DataOptions | str | Path | None = None,
    *,
    output: Path | None = None,
    **options: Any,
) -> Result:
    """Compress ``model`` with ``recipe``, measure it against the original on held-out text, and
    save it to ``output`` if given; ``options`` as `lmpress.pipeline.compress_model` (for example
    ``max_memory=4 * 10**9`` or ``max_memory="4GB"``: a run that would not fit stops before any
    work). An export that runs in a runtime of its own (a GGUF file, an ONNX directory) is refused:
    compress what it was exported from."""
    refuse_export(model)
    return pipeline.compress(model, recipe, data, output=output, **options)


@dataclass
class EvalResult:
    """Metrics of one model (and of its reference, if one was given) on one set of windows."""

    metrics: dict[str, float]
    data: Manifest
    reference_metrics: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "reference_metrics": self.reference_metrics, "data": self.data.to_dict()}


def _vocab(loaded: LoadedModel) -> int:
    return int(loaded.model.get_input_embeddings().num_embeddings)  # type: ignore[operator]


def check_vocab(model: LoadedModel, reference: LoadedModel | None) -> None:
    """KL and agreement compare distributions over one vocabulary."""
    if reference is None:
        return
    a, b = _vocab(model), _vocab(reference)
    if a != b:
        raise ModelLoadError(
            f"{model.source} has a vocabulary of {a} but the reference {reference.source} has {b}; "
            "compare models that share a tokenizer"
        )


def _as_loaded(model: str | Path | LoadedModel, **kw: Any) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load(model, **kw)


def evaluate(
    model: str | Path | LoadedModel = "builtin",
    data: DataOptions | str | Path | None = None,
    *,
    reference: str | Path | LoadedModel | None = None,
    split: Split = "eval",
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | Path | None = None,
    measure_speed: bool = True,
    progress: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> EvalResult:
    """Quality, size and speed of ``model`` on held-out text; KL and agreement against ``reference``."""
    data = data if isinstance(data, DataOptions) else DataOptions(source=data or STDLIB)
    kw = {"device": device, "dtype": dtype, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    check_source(data.source)  # before any model is loaded
    loaded = _as_loaded(model, tokenizer=tokenizer, **kw)
    ref = _as_loaded(reference, **kw) if reference is not None else None
    tok = loaded.tokenizer or (ref.tokenizer if ref else None)
    if tok is None:
        raise ModelLoadError(f"{loaded.source} has no tokenizer files; pass --tokenizer MODEL_DIR to use another's")
    check_vocab(loaded, ref)
    for m in (loaded, ref):  # windows past a model's positions would give a wrong number, not an error
        if m is not None and hasattr(getattr(m.model, "config", None), "to_dict"):
            check_seq_len(m.model.config.to_dict(), data.seq_len, m.source)  # type: ignore[union-attr,operator]
    windows = data.load(tok, split, data.eval_windows)
    vocab = _vocab(loaded)
    if int(windows.windows.max()) >= vocab:
        raise DataError(
            f"the tokenizer produces id {int(windows.windows.max())} but {loaded.source} has a vocabulary of {vocab}; "
            "use the model's own tokenizer"
        )
    w = windows.windows
    metrics = evaluation.evaluate(
        loaded.model,
        w,
        reference=ref.model if ref else None,
        saved_dir=loaded.path,
        measure_speed=measure_speed,
        progress=progress,
    )
    ref_metrics = None
    if ref is not None:
        ref_metrics = evaluation.evaluate(
            ref.model, w, saved_dir=ref.path, measure_speed=measure_speed, progress=progress
        )
    return EvalResult(metrics, windows.manifest, ref_metrics)


@dataclass
class TaskResult:
    """lm-evaluation-harness scores of one model (and of its reference, if one was given)."""

    tasks: list[str]
    scores: TaskScores
    reference_scores: TaskScores | None = None

    def to_dict(self) -> dict[str, Any]:
        ref = self.reference_scores.to_dict() if self.reference_scores else None
        return {"tasks": self.tasks, **self.scores.to_dict(), "reference": ref}


def evaluate_tasks(
    model: str | Path | LoadedModel,
    tasks: list[str],
    *,
    reference: str | Path | LoadedModel | None = None,
    task_path: list[Path] | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | Path | None = None,
    progress: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> TaskResult:
    """Standard task scores (``tasks``: lm-eval task names, for example hellaswag, arc_easy) of
    ``model``, in whatever format lmpress loaded it, and of ``reference``; ``task_path`` adds
    directories of lm-eval task YAML files; ``limit`` documents per task (all when None)."""
    manager = check_tasks(tasks, task_path)  # before any model is loaded
    kw = {"device": device, "dtype": dtype, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    runs = [(_as_loaded(model, tokenizer=tokenizer, **kw), "model")]
    if reference is not None:
        runs.append((_as_loaded(reference, **kw), "reference"))
    results = []
    for loaded, label in runs:
        if loaded.tokenizer is None:
            raise ModelLoadError(f"{loaded.source} has no tokenizer files; pass --tokenizer MODEL_DIR to use another's")
        opts = {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size, "manager": manager}
        bar = f"{label}: {', '.join(tasks)}" if progress else None
        results.append(run_tasks(loaded.model, loaded.tokenizer, tasks, progress=bar, **opts))  # type: ignore[arg-type]
    return TaskResult(list(tasks), results[0], results[1] if len(results) > 1 else None)
