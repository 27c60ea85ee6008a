"""The checks before any work: what a compress run's inputs are and whether they are usable (the
recipe, the clients of a federated stage, the output, the model and its config and weights, the
data, the tokenizer), whether the run can stream, and whether it fits the memory budget. A run that
fails one of them has printed nothing else and written nothing (the bad-input promise of
`docs/robustness.md`). `preflight` runs them all, once, and returns what they found (`Plan`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmpress.arch import Adapter, auto_class, has_spec, roles_refusal, text_model_type
from lmpress.arch.kinds import NotADecoderError, kind_refusal
from lmpress.arch.multimodal import kept_modules
from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError, ModelLoadError
from lmpress.federated.core import check_clients
from lmpress.io import (
    META_FILE,
    LoadedModel,
    check_output_dir,
    check_weights,
    load_tokenizer,
    read_config,
    resolve_path,
    weight_bytes,
)
from lmpress.io.consistency import check_model_dir, check_plausible, check_seq_len
from lmpress.memory import Budget, estimate, parse_size
from lmpress.quant.mix import mix_roles
from lmpress.recipe import Recipe, load_recipe
from lmpress.registry import methods
from lmpress.sources import check_source


@dataclass(frozen=True)
class Plan:
    """What the checks found: the run's recipe and data, the model's directory and tokenizer (None
    for a model already loaded), why the run holds the whole model (None: it streams), its budget."""

    recipe: Recipe
    data: DataOptions
    path: Path | None
    tokenizer: Any
    why_whole: str | None
    budget: Budget

    @property
    def streams(self) -> bool:
        return self.why_whole is None


def preflight(
    model: str | Path | LoadedModel,
    recipe: str | Path | Recipe | dict[str, Any],
    data: DataOptions | str | Path | None,
    output: Path | None,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    run_eval: bool = True,
    max_memory: int | str | None = None,
    stream: bool | None = None,
    clients: list[Path] | None = None,
    serve: Any = None,
) -> Plan:
    """Every check of a compress run before any work (the options are `lmpress.pipeline.compress_model`'s).

    ``max_memory``: bytes, or a size such as "4GB"; the budget is decided here, once: a stated one
    is read before the other checks, the machine's available memory when the estimate is checked.
    """
    recipe = load_recipe(recipe)
    stated = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
    for stage in recipe.stages:
        if stage.method == "federated" and serve is None:  # before any work: the clients' data
            if not clients:
                raise LmpressError(
                    "the federated stage needs client data: pass --clients DIR [DIR ...] (one per client), "
                    "or serve clients on other machines with lmpress federated serve"
                )
            check_clients([Path(c) for c in clients], stage)  # type: ignore[arg-type]
    data = DataOptions.of(data)
    path, tokenizer = check_inputs(model, data, output, overwrite, allow_pickle, trust_remote_code)
    check_roles(model, recipe)
    why = why_whole(model, recipe, output) if stream is not False else "streaming was turned off"
    if stream and why is not None:
        raise LmpressError(f"cannot stream this run: {why}")
    if allow_pickle or trust_remote_code:
        why = why or "pickle or remote-code models load whole"
    budget = Budget.of(stated)
    check_memory(model, recipe, data, budget, why, run_eval)
    return Plan(recipe, data, path, tokenizer, why, budget)


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
        if (refusal := kind_refusal(config, trust_remote_code)) is not None:  # an encoder, an encoder-decoder
            raise refusal
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


# what a multimodal model's vision part reads of its language model, and the stage that changes it
VISION_READS = {"hidden": "the hidden width its projector writes", "vocab": "the token ids of its image tokens"}


def check_roles(model: str | Path | LoadedModel, recipe: Recipe) -> None:
    """Refuse, before any work, a stage that needs a family spec the model's family lacks (AWQ's
    scale folding, structured pruning, ``mix:`` ...): the line its apply would give mid-run; and one
    that would change what a multimodal model's vision part reads (`VISION_READS`)."""
    if isinstance(model, LoadedModel):
        config = getattr(model.model, "config", None)
        model_type = getattr(config, "model_type", None)
    else:
        config = read_config(resolve_path(model))
        model_type = config.get("model_type")
    if text_model_type(config) is not None:
        for i, stage in enumerate(recipe.stages, 1):
            if stage.method in VISION_READS:
                raise LmpressError(
                    f"recipe stage {i} ({stage.method}) would change {VISION_READS[stage.method]}, which the vision "
                    f"part of this multimodal {model_type} checkpoint depends on; compress its language model with "
                    "quantization, pruning, structured or lowrank instead"
                )
    if has_spec(config):  # its own family's spec, or its text decoder's (a multimodal model)
        return
    if not isinstance(model, LoadedModel) and isinstance(refusal := _built(resolve_path(model)), NotADecoderError):
        raise refusal  # blocks without attention
    for stage in recipe.stages:
        mix = getattr(stage, "mix", None)
        roles = methods()[stage.method].needs_roles(stage) or (mix_roles(mix) if mix else None)
        if roles is not None:
            raise LmpressError(roles_refusal(str(model_type), roles))


def why_whole(model: str | Path | LoadedModel, recipe: Recipe, output: Path | None) -> str | None:
    """Why this run cannot stream (`lmpress.streamed_run`), or None when it can."""
    if output is None:
        return "the result stays in memory (no output directory)"
    if isinstance(model, LoadedModel):
        return "the model is already loaded"
    path = resolve_path(model)
    if (path / META_FILE).is_file():
        return "the model is an lmpress directory (its compressed layers load whole)"
    if not any(path.glob("*.safetensors")):
        return "its weights are not safetensors"
    config = read_config(path)
    if text_model_type(config) is not None and _kept_tensors(path) is None:
        return "its vision part holds a tensor beside the language model, which lmpress does not stream"
    if not has_spec(config):
        why = _generic_layout(path)
        if why is not None:
            return why
    registry = methods()
    for i, stage in enumerate(recipe.stages, 1):
        if stage.method not in registry or not registry[stage.method].streams:
            return f"stage {i} ({stage.method}) needs the whole model"
    return None


def meta_adapter(path: Path) -> Adapter | str:
    """The `Adapter` of ``path``'s architecture built on the meta device (no weights read), or why
    there is none (transformers cannot build it; lmpress has no spec and finds no blocks)."""
    built = _built(path)
    if isinstance(built, NotADecoderError):
        return str(built)
    if built is None:
        return "lmpress does not know its block layout"
    if isinstance(built, ModelLoadError):
        return "lmpress has no spec for it and finds no decoder blocks in it"
    return built


def _built(path: Path) -> Adapter | ModelLoadError | None:
    """``path``'s `Adapter` on the meta device, the error building it gave (`NotADecoderError`: a model
    lmpress does not compress), or None (transformers cannot build it)."""
    from transformers import AutoConfig  # at first use: importing it takes seconds

    try:
        config = AutoConfig.from_pretrained(path)
        if (refusal := kind_refusal(config.to_dict())) is not None:
            return refusal
        with torch.device("meta"):
            model = auto_class(config).from_config(config)
    except Exception:  # the whole load reports what is wrong with it
        return None
    try:
        return Adapter(model)
    except ModelLoadError as e:
        return e


def _kept_tensors(path: Path) -> list[str] | None:
    """The streaming units of a multimodal model's vision part (`lmpress.arch.multimodal.kept_modules`)."""
    adapter = meta_adapter(path)
    if isinstance(adapter, str) or adapter.language_model is None:
        return None
    return kept_modules(adapter.model, (adapter.language_model, adapter.head()[0]))


def _generic_layout(path: Path) -> str | None:
    """Why a model without a spec cannot stream (None: its blocks and the module between them and
    the head are found by structure, `lmpress.arch.discover`)."""
    adapter = meta_adapter(path)
    if isinstance(adapter, str):
        return adapter
    if adapter.spec.final_norm is None:
        return "lmpress has no spec for it and cannot tell what runs between its blocks and its logits"
    return None


def check_memory(
    model: str | Path | LoadedModel,
    recipe: Recipe,
    data: DataOptions,
    budget: Budget,
    why: str | None,
    run_eval: bool,
) -> None:
    """Stop before any work if the run's estimated peak is over ``budget`` (``why``: why it holds
    the whole model; None: it streams). A model already loaded is not estimated."""
    if isinstance(model, LoadedModel):
        return
    path = resolve_path(model)
    registry = methods()
    names = [s.method for s in recipe.stages]
    e = estimate(
        read_config(path),
        weight_bytes(path),
        names,
        streaming=why is None,
        seq_len=data.seq_len,
        calib_windows=data.calib_windows,
        eval_windows=(data.eval_windows or 64) if run_eval else 0,
        training=any(registry[n].needs_teacher for n in names if n in registry),
    )
    budget.check(e, why)
