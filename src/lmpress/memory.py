"""A memory budget you can state: the peak of a run, estimated before any work, against ``--max-memory``.

The estimate adds what a run holds at its fullest moment, from the model's config and the data
options alone (nothing is loaded): the process itself (Python, torch, transformers), the model's
tensors that are in memory at once (one block and the embeddings when streaming; the model and its
original copy otherwise; for training stages also the teacher, gradients and optimizer state), the
calibration activations of one block, the largest per-layer solve (GPTQ's Hessian and its inverse),
and the evaluation's logits. It errs high by design: a run that fits the estimate fits the machine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from lmpress.arch import Shapes, text_config
from lmpress.errors import LmpressError

PROCESS_BYTES = 400 * 2**20  # python + torch + transformers + lmpress, measured: ~260 MB resident
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40})


class MemoryBudgetError(LmpressError):
    """A run whose estimated peak memory is over the budget."""


def parse_size(text: str) -> int:
    """'4GB', '3.5GiB', '512MB', '2000000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise MemoryBudgetError(f"--max-memory {text!r} is not a size; write it like 4GB, 3.5GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[unit])


def available_memory() -> int:
    """What this machine can give a new process now: MemAvailable (Linux), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


@dataclass
class Estimate:
    """The estimated peak of a run and what it is made of (bytes)."""

    streaming: bool
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"streaming": self.streaming, "peak_bytes": self.peak, "parts": self.parts}


def estimate(
    config: dict[str, Any],
    weight_bytes: int,
    methods: list[str],
    *,
    streaming: bool,
    seq_len: int,
    calib_windows: int,
    eval_windows: int,
    batch_size: int = 8,
    training: bool = False,
) -> Estimate:
    """The peak of compressing a model with ``config`` whose weights take ``weight_bytes``."""
    s = Shapes.of(text_config(config))  # a multimodal model: its text decoder's sizes
    per_param = weight_bytes / max(s.params, 1)  # bytes per weight as stored (2 for bf16)
    act = 4  # activations and solves in float32
    block = int(s.block_params * per_param)
    calib_hidden = 2 * calib_windows * seq_len * s.hidden * act  # one block's inputs and outputs
    eval_hidden = 4 * eval_windows * seq_len * s.hidden * act  # both models' inputs and outputs
    widest = max(s.hidden, s.intermediate, s.q_dim)
    calibrated = any(m in ("gptq", "sparsegpt", "lowrank", "share", "cluster", "structured") for m in methods)
    # one block's Hessians (q/k/v share one, gate/up share one), then the widest layer's solve:
    # a permuted copy of its Hessian and float32 copies of its weight
    stats = (2 * s.hidden**2 + s.q_dim**2 + s.intermediate**2) * act if calibrated else 0
    solve = (widest**2 + 3 * s.hidden * widest) * act if calibrated else 3 * s.hidden * widest * act
    logits = 5 * seq_len * s.vocab * act  # one window's logits, log-probabilities, both models
    head = int(s.vocab * s.hidden * per_param)
    e = Estimate(streaming)
    e.parts["process"] = PROCESS_BYTES
    if streaming:
        phases = {
            "calibration: one block, its Hessians and solve": int(1.5 * block) + calib_hidden + stats + solve,
            "evaluation: both models' block": 2 * block + eval_hidden,
            "evaluation: both models' heads": 2 * head + logits + eval_hidden // 2,
        }
        name = max(phases, key=lambda k: phases[k])
        e.parts[name] = phases[name]
        return e
    e.parts["model and original copy"] = 2 * weight_bytes
    if training:  # the student's gradients and Adam's two moments in float32, the teacher's logits
        e.parts["training state"] = 3 * s.params * act
    e.parts["working memory"] = max(calib_hidden + stats + solve, batch_size * logits)
    return e


@dataclass(frozen=True)
class Budget:
    """The memory a run may use: ``--max-memory`` when it was given (``stated``), else what the
    machine has available when the run is checked."""

    nbytes: int
    stated: bool

    @classmethod
    def of(cls, max_memory: int | None) -> Budget:
        return cls(max_memory, True) if max_memory is not None else cls(available_memory(), False)

    def check(self, e: Estimate, why_whole: str | None = None) -> None:
        """Stop before any work if the estimate is over the budget."""
        if e.peak <= self.nbytes:
            return
        source = "--max-memory is" if self.stated else "available:"
        if e.streaming:
            raise MemoryBudgetError(
                f"streaming needs about {gb(e.peak)} (at its fullest, {next(iter(set(e.parts) - {'process'}))}); "
                f"{source} {gb(self.nbytes)}; raise --max-memory or use fewer --calib-windows / a shorter --seq-len"
            )
        raise MemoryBudgetError(
            f"this run holds the whole model ({why_whole or 'it cannot stream'}): about {gb(e.peak)}; {source} "
            f"{gb(self.nbytes)}; use post-training stages with -o (they stream) or a machine with more memory"
        )

    def holds_whole(self, weight_bytes: int) -> bool:
        """Whether a model whose weights take ``weight_bytes`` can be held whole (to time it, or to
        generate) within the budget."""
        return PROCESS_BYTES + 1.3 * weight_bytes <= self.nbytes
