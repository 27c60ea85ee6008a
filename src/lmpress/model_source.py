"""Where a compress run's model comes from and where it goes: a `ModelSource`.

The compress flow (`lmpress.pipeline.compress_model`) is the same for every model: it asks its
source for the tokenizer (`load`), then the model the stages change (`open`), runs the stages,
has the source measure the result against the original (`measure`), save it (`save`) and measure
the saved files (`measure_saved`), and finally `close` it. Two sources implement these steps:
`WholeSource` holds the model in memory (and a copy of the original beside it, when evaluation or a
training stage needs one); `lmpress.streamed_run.StreamedSource` reads the model block by block
from its safetensors files and writes the result the same way.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmpress.data import TokenData
from lmpress.data_options import DataOptions
from lmpress.evaluation import evaluate, generate_samples, size
from lmpress.io import LoadedModel, load_model, save
from lmpress.method import Context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """How a whole model is loaded: `lmpress.io.load_model`'s options."""

    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Measuring:
    """How a source measures the result against the original: speed too (``speed``), with progress
    bars, and ``samples`` greedy continuations by each model."""

    speed: bool = True
    progress: bool = False
    samples: int = 0


@dataclass
class Measured:
    """What a run measured: each model's metrics (``"original"``, ``"compressed"``), generation
    samples (``"prompts"``, ``"original"``, ``"compressed"``), and the compressed model when a
    streamed run loaded it whole afterwards (to time it)."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, list[str]] | None = None
    model: nn.Module | None = None


class ModelSource(Protocol):
    """A run's model, whole or streamed; the steps in the order the compress flow takes them."""

    name: str  # the model as it was given (``source_model`` in ``lmpress.json``)
    holds_whole: bool  # the compressed model stays in memory, as the result's model
    device: torch.device  # where the stages compute (known once the model is open)
    teacher: nn.Module | None  # the original held whole beside the model, when asked for

    def load(self) -> Any:
        """Get the model ready; returns its tokenizer (None: it has no tokenizer files)."""

    def open(self, keep_original: bool) -> nn.Module:
        """The model the stages change; ``keep_original``: hold the original beside it (`teacher`)."""

    def measure(self, model: nn.Module, ctx: Context, eval_data: TokenData | None) -> Measured:
        """The compressed ``model`` against the original on ``eval_data``; the original is let go."""

    def save(self, model: nn.Module, tokenizer: Any, output: Path, meta: dict[str, Any], overwrite: bool) -> None:
        """Write ``model`` as a self-describing directory with ``meta`` in its record."""

    def measure_saved(self, measured: Measured, model: nn.Module, output: Path) -> None:
        """What needs the saved files (sizes on disk; a streamed run's speed and samples)."""

    def close(self) -> None:
        """Let go of what the source holds on disk."""


class WholeSource:
    """The model held whole in memory: loaded (or given loaded), changed in place by the stages,
    measured against a copy of the original, saved in one piece."""

    holds_whole = True

    def __init__(
        self,
        model: str | Path | LoadedModel,
        why: str | None,
        data: DataOptions,
        load: LoadOptions,
        measuring: Measuring,
        announce: bool = True,
    ) -> None:
        self.given, self.why, self.data = model, why, data
        self.name = model.source if isinstance(model, LoadedModel) else str(model)
        self.load_model = partial(
            load_model,
            device=load.device,
            dtype=load.dtype,
            allow_pickle=load.allow_pickle,
            trust_remote_code=load.trust_remote_code,
        )
        self.measuring, self.announce = measuring, announce
        self.loaded: LoadedModel | None = None
        self.teacher: nn.Module | None = None
        self.device = torch.device("cpu")

    def load(self) -> Any:
        given = self.given
        self.loaded = given if isinstance(given, LoadedModel) else self.load_model(given)
        # worth a line only where streaming could have happened: a model named by path, not turned off;
        # after loading, so that a refusal of the model is the only line a bad input prints
        log.log(logging.INFO if self.announce else logging.DEBUG, "not streaming: %s", self.why)
        return self.loaded.tokenizer

    def open(self, keep_original: bool) -> nn.Module:
        assert self.loaded is not None
        model = self.loaded.model
        self.teacher = copy.deepcopy(model) if keep_original else None
        self.device = next(model.parameters()).device
        return model

    def measure(self, model: nn.Module, ctx: Context, eval_data: TokenData | None) -> Measured:
        assert self.loaded is not None
        measured = Measured()
        original, self.teacher = self.teacher, None
        if eval_data is not None and original is not None:
            measured.metrics = self._quality(model, original, eval_data, ctx.token_map)
        if self.measuring.samples and original is not None:
            prompts = self.data.prompts(self.measuring.samples)
            measured.samples = {
                "prompts": prompts,
                "original": generate_samples(original, self.loaded.tokenizer, prompts),
                "compressed": generate_samples(model, ctx.tokenizer, prompts),
            }
        return measured

    def _quality(
        self, model: nn.Module, original: nn.Module, eval_data: TokenData, token_map: torch.Tensor | None
    ) -> dict[str, dict[str, float]]:
        assert self.loaded is not None
        w = eval_data.windows
        if token_map is not None:  # compare on the windows the pruned vocabulary still covers
            covered = (token_map[w] >= 0).all(dim=1)
            if not bool(covered.all()):
                log.warning(
                    "%d of %d evaluation windows use dropped tokens and are left out; evaluate on the domain",
                    int((~covered).sum()),
                    len(w),
                )
            w = w[covered]
        if not len(w):
            return {}
        measure = partial(evaluate, measure_speed=self.measuring.speed, progress=self.measuring.progress)
        return {
            "original": measure(original, w, saved_dir=self.loaded.path),
            "compressed": measure(model, w, reference=original, token_map=token_map),
        }

    def save(self, model: nn.Module, tokenizer: Any, output: Path, meta: dict[str, Any], overwrite: bool) -> None:
        save(model, tokenizer, output, meta, overwrite=overwrite)

    def measure_saved(self, measured: Measured, model: nn.Module, output: Path) -> None:
        measured.metrics["compressed"].update(size(model, output))

    def close(self) -> None:
        self.teacher = None
