"""The checks before any work: what a compress run's inputs are and whether they are usable (the
output, the model and its config and weights, the data, the tokenizer), whether the run can stream,
and whether it fits the memory budget. A run that fails one of them has printed nothing else and
written nothing (the bad-input promise of `docs/robustness.md`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from lmpress.errors import ModelLoadError
from lmpress.export.registry import exporter_for
from lmpress.io import (
    META_FILE,
    LoadedModel,
    check_output_dir,
    check_weights,
    load_tokenizer,
    read_config,
    resolve_path,
)
from lmpress.io.consistency import check_model_dir, check_plausible, check_seq_len
from lmpress.recipe import Recipe
from lmpress.registry import methods
from lmpress.sources import check_source

if TYPE_CHECKING:
    from lmpress.pipeline import DataOptions


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else {}  # type: ignore[union-attr]


def check_inputs(
    model: str | Path | LoadedModel,
    data: DataOptions,
    output: Path | None,
    overwrite: bool,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Path | None, Any]:
    """Every check of a compress run's inputs that needs no work, in the order a user fixes them:
    the output (not the input, writable), the model (where it is), the data source, the config
    (plausible sizes, windows within its positions), the weights against the config, the tokenizer.
    Returns the model's directory (None for a model already loaded) and its tokenizer."""
    source, missing = None, None
    if not isinstance(model, LoadedModel):
        try:
            source = resolve_path(model)
        except ModelLoadError as e:  # said after the output's check: both are bad input, the output first
            missing = e
    if output is not None:
        check_output_dir(output, overwrite, source)
    if missing is not None:
        raise missing
    check_source(data.source)
    if source is not None:  # sizes a config could not hold, windows past its positions, weights that
        config = read_config(source)  # disagree with the config: before any work and any line of progress
        check_plausible(config, source / "config.json")
        check_seq_len(config, data.seq_len, model)
        if not (source / META_FILE).is_file():
            check_weights(source, allow_pickle)
            check_model_dir(source, config, trust_remote_code)
        tokenizer = load_tokenizer(source, trust_remote_code)  # a broken one is refused here, not after work
        if tokenizer is None:
            raise ModelLoadError(f"{model} has no tokenizer files; add them to the model directory")
    else:
        tokenizer = None
        check_seq_len(_config_dict(model.model), data.seq_len, model.source)  # type: ignore[union-attr]
    return source, tokenizer


def exported_runtime(model: str | Path) -> str | None:
    """The runtime an exported model runs in (a GGUF file, an ONNX directory), or None."""
    exporter = exporter_for(model)
    return exporter.runtime if exporter is not None else None


def why_whole(model: str | Path | LoadedModel, recipe: Recipe, output: Path | None) -> str | None:
    """Why this run cannot stream (`lmpress.streamed_run`), or None when it can."""
    from lmpress.arch import is_supported
    from lmpress.io import META_FILE, read_config, resolve_path

    if output is None:
        return "the result stays in memory (no output directory)"
    if isinstance(model, LoadedModel):
        return "the model is already loaded"
    path = resolve_path(model)
    if (path / META_FILE).is_file():
        return "the model is an lmpress directory (its compressed layers load whole)"
    if not any(path.glob("*.safetensors")):
        return "its weights are not safetensors"
    if not is_supported(read_config(path).get("model_type")):
        return "lmpress does not know its block layout"
    registry = methods()
    for i, stage in enumerate(recipe.stages, 1):
        if stage.method not in registry or not registry[stage.method].streams:
            return f"stage {i} ({stage.method}) needs the whole model"
    return None


def check_memory(
    model: str | Path | LoadedModel,
    recipe: Recipe,
    data: DataOptions,
    streaming: bool,
    max_memory: int | None,
    why: str | None,
    run_eval: bool,
) -> int:
    """Stop before any work if the run's estimated peak is over the budget; returns the budget."""
    from lmpress.io import read_config, resolve_path, weight_bytes
    from lmpress.memory import available_memory, check_budget, estimate

    budget = max_memory if max_memory is not None else available_memory()
    if isinstance(model, LoadedModel):
        return budget
    path = resolve_path(model)
    registry = methods()
    names = [s.method for s in recipe.stages]
    e = estimate(
        read_config(path),
        weight_bytes(path),
        names,
        streaming=streaming,
        seq_len=data.seq_len,
        calib_windows=data.calib_windows,
        eval_windows=(data.eval_windows or 64) if run_eval else 0,
        training=any(registry[n].needs_teacher for n in names if n in registry),
    )
    check_budget(e, budget, max_memory is not None, why)
    return budget
