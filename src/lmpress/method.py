"""What a method is: its config base, the context a stage runs in, its report, its record.

Method modules import these types from here; the registry (`lmpress.registry`) imports the method
modules. Nothing here imports a method, so no method depends on the registry that lists it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from lmpress.data import TokenData

__all__ = ["ApplyFn", "Context", "Method", "MethodConfig", "StageReport"]


class MethodConfig(BaseModel):
    """Base of every method's config: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str


@dataclass
class Context:
    """What a stage may use besides the model: calibration data, the teacher, device, progress."""

    tokenizer: Any
    device: torch.device
    calibration: Callable[[], TokenData] | None = None  # loads calibration windows on first use
    training: Callable[[], TokenData] | None = None  # loads training windows on first use
    teacher: nn.Module | None = None  # the original model, when a stage needs it
    progress: bool = False
    tracker: Any = None
    work_dir: Path | None = None  # where training stages keep checkpoints (resume) and curves
    corpus: Callable[[], list[str]] | None = None  # every text of the run's data source (all splits)
    token_map: Tensor | None = None  # original id -> current id (-1: dropped), once a stage pruned the vocabulary
    clients: list[Path] | None = None  # federated stages: each client's data directory
    federation: Any = None  # federated stages: `lmpress.federated.stage.Serve` to serve other machines instead
    _calib: TokenData | None = field(default=None, repr=False)
    _train: TokenData | None = field(default=None, repr=False)

    @property
    def calib_manifest(self) -> dict[str, Any] | None:
        """What the stages calibrated on, if any stage asked for data."""
        return self._calib.manifest.to_dict() if self._calib is not None else None

    def calib_data(self) -> TokenData:
        if self._calib is None:
            self._calib = _first_use("calibration", self.calibration)
        return self._calib

    def retokenize(self, tokenizer: Any, mapping: Tensor) -> None:
        """A stage replaced the tokenizer (``mapping``: its previous ids -> new ids, -1 dropped): data
        is tokenized again on next use, and the map from the original ids is kept for evaluation."""
        self.tokenizer = tokenizer
        if self.token_map is None:
            self.token_map = mapping
        else:
            prev = self.token_map
            self.token_map = torch.where(prev >= 0, mapping[prev.clamp(min=0)], prev)
        self._calib = self._train = None

    def train_data(self) -> TokenData:
        if self._train is None:
            self._train = _first_use("training", self.training)
        return self._train


def _first_use(what: str, load: Callable[[], TokenData] | None) -> TokenData:
    if load is None:
        raise RuntimeError(f"this stage needs {what} data but none was given")
    return load()


StageReport = dict[str, Any]
ApplyFn = Callable[[nn.Module, Any, Context], StageReport]


@dataclass(frozen=True)
class Method:
    """A recipe method: its name, config class, apply function and a one-line summary."""

    name: str
    config: type[MethodConfig]
    apply: ApplyFn
    summary: str
    needs_teacher: bool = False  # the stage trains against the original model
    streams: bool = False  # works on a streamed model, one block in memory (`lmpress.streaming`)
    # for a config, what the stage needs a family spec for: (what, needs, instead) as
    # `lmpress.arch.roles_refusal` words it, checked before any work; None: nothing
    needs_roles: Callable[[Any], tuple[str, str, str] | None] = lambda config: None
