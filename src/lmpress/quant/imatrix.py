"""Importance matrices as llama.cpp computes and uses them, from lmpress's calibration pass.

`collect_imatrix` runs the calibration windows through the model one decoder block at a time (a
streamed model holds one block; nothing is changed) and sums, for every linear layer of the blocks,
each input column's squared activation over the tokens, keyed by the tensor's llama.cpp name
(``blk.3.ffn_down.weight``), the statistic llama.cpp's ``llama-imatrix`` stores
(`lmpress.formats.imatrix`). `layer_importance` reads one back as each layer's (in,) mean of x²,
the weights GGUF-grid fits put on each column's rounding error (`lmpress.quant.ggml_fit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmpress.arch import Adapter, linear_weight
from lmpress.arch.gguf_keys import ROLE_NAMES
from lmpress.calib import collect, first_block_inputs, shard_windows
from lmpress.formats.imatrix import Imatrix, ImatrixEntry, ImatrixError, read_imatrix
from lmpress.progress import track
from lmpress.streaming import resident

log = logging.getLogger(__name__)


def llama_names(model: nn.Module) -> dict[str, str]:
    """Module name -> llama.cpp tensor name of every linear layer in the decoder blocks."""
    adapter = Adapter(model)
    gguf = adapter.spec.gguf
    renamed = gguf.names if gguf is not None else {}
    out = {}
    for i in range(adapter.num_blocks):
        for name, role in adapter.linear_roles(i).items():
            base = renamed.get(role) or ROLE_NAMES.get(role, role)
            out[name] = f"blk.{i}.{base}.weight"
    return out


@dataclass
class SquareSum:
    """Σ x_j² per input column over the tokens seen, and their number."""

    in_sum2: Tensor  # (in,) float64
    n_tokens: int = 0

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # (tokens, in)
        self.in_sum2 += x.pow(2).sum(0)
        self.n_tokens += x.shape[0]

    def reduce(self, dist: Any) -> None:
        n = torch.tensor([float(self.n_tokens)], dtype=torch.float64, device=self.in_sum2.device)
        dist.all_reduce(self.in_sum2)
        dist.all_reduce(n)
        self.n_tokens = int(n.item())


@torch.no_grad()
def collect_imatrix(
    model: nn.Module, windows: Tensor, batch_size: int = 8, progress: bool = False, dataset: str = "lmpress"
) -> Imatrix:
    """The importance matrix of ``model`` on ``windows`` (N, T): one chunk per window."""
    names = llama_names(model)
    adapter = Adapter(model)
    was_training = model.training
    model.eval()
    entries: dict[str, ImatrixEntry] = {}
    try:
        inputs = first_block_inputs(model, shard_windows(windows), batch_size)
        for i in track(range(adapter.num_blocks), "importance matrix", enabled=progress):
            with resident(model, [adapter.block_name(i)]):
                block = adapter.blocks()[i]
                layers = {n: m for n, m in adapter.block_linears(i).items() if n in names}
                stats = collect(block, inputs.at(i), layers, _square_sums(inputs.hidden[0].device))
                for n, st in stats.items():
                    sums = st.in_sum2.float().cpu().numpy()[None]  # (1, in)
                    entries[names[n]] = ImatrixEntry(sums, np.array([st.n_tokens], np.float32))
                inputs = inputs.through(i, block)
    finally:
        model.train(was_training)
    return Imatrix(entries, [dataset], chunk_count=int(windows.shape[0]), chunk_size=int(windows.shape[1]))


def _square_sums(device: torch.device) -> Callable[[nn.Module], SquareSum]:
    """A `SquareSum` for a linear layer's inputs on ``device``."""
    return lambda m: SquareSum(torch.zeros(linear_weight(m).shape[1], dtype=torch.float64, device=device))


def layer_importance(model: nn.Module, path: Path) -> dict[str, Tensor]:
    """Module name -> (in,) mean x² from the importance matrix at ``path``, for the model's block
    linears that it covers. A file that names none of them, or whose widths differ, is of another
    model: an `ImatrixError`."""
    im = read_imatrix(path)
    names = llama_names(model)
    out = {}
    for module_name, gname in names.items():
        e = im.entries.get(gname)
        if e is None:
            continue
        width = int(linear_weight(model.get_submodule(module_name)).shape[1])
        if e.in_sum2.shape != (1, width):
            raise ImatrixError(
                f"importance matrix {path}: {gname} has {e.in_sum2.shape[-1]} columns but {module_name} "
                f"takes {width} inputs; it was made for another model"
            )
        out[module_name] = torch.from_numpy(e.mean_sq()[0].copy())
    if not out:
        example = next(iter(im.entries), "nothing")
        raise ImatrixError(
            f"importance matrix {path} covers none of this model's layers (it has {example}, the model "
            f"{next(iter(names.values()), 'no block linears')}); it was made for another model"
        )
    return out


def imatrix_report(path: Path | None, weighted: list[str]) -> dict[str, Any]:
    """What a stage's report says of the importance matrix it was given: the file and how many
    layers it weighted (the others had no GGUF grid, or no entry in the file)."""
    if path is None:
        return {}
    if not weighted:
        log.warning("importance matrix %s weighted no layer: it weights GGUF-grid fits (grid:, mix:) only", path)
    return {"imatrix": {"file": str(path), "weighted_layers": len(weighted)}}
