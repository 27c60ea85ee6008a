"""Training checkpoints: safetensors (trainable parameters, their best values and AdamW's moments)
plus a JSON file (step, schedule, history and the run's fingerprint); nothing is pickled. Loading
checks the fingerprint, so a checkpoint of another run is refused instead of silently continued.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmpress.errors import TrainError


def save_checkpoint(
    path: Path,
    named: dict[str, nn.Parameter],
    best: dict[str, Tensor] | None,
    opt: torch.optim.Optimizer,
    meta: dict[str, Any],
) -> None:
    """Write the checkpoint into a temporary folder, then swap it in: never half-written."""
    tensors = {f"param/{n}": p.detach().contiguous() for n, p in named.items()}
    if best is not None:
        tensors |= {f"best/{n}": t.contiguous() for n, t in best.items()}
    index = {id(p): n for n, p in named.items()}
    for p, state in opt.state.items():
        for k, v in state.items():
            if isinstance(v, Tensor):
                tensors[f"opt/{index[id(p)]}/{k}"] = v.detach().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n")
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path, named: dict[str, nn.Parameter], opt: torch.optim.Optimizer, fingerprint: str
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """Load the checkpoint into the parameters and ``opt``: its JSON, and the best parameters it kept."""
    meta = json.loads((path / "trainer.json").read_text())
    if meta.get("fingerprint") != fingerprint:
        raise TrainError(
            f"the checkpoint in {path} belongs to another run (different model, data or settings); "
            "give a new run directory or delete that checkpoint"
        )
    tensors = load_file(str(path / "state.safetensors"))
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[f"param/{n}"])
    for n, p in named.items():
        state = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt/{n}/")}
        if state:
            opt.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in state.items()}
    best = {n[5:]: t for n, t in tensors.items() if n.startswith("best/")} or None
    return meta, best
