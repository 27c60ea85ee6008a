"""``drop_blocks``: remove whole decoder blocks, the ones that change their input least.

A block's influence is the angular distance between the hidden states entering and leaving it,
arccos(cos(x_in, x_out)) / π averaged over calibration tokens (ShortGPT's block influence, Men et
al. 2024, arXiv:2403.03853; Gromov et al. 2024 use the same distance over runs of blocks). Blocks
whose output points where their input did are nearly identities and go first. ``score: last`` and
``score: random`` are the baselines. The result is a plain Hugging Face model with fewer layers.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lmpress.arch import Adapter
from lmpress.arch.widths import text_config_of
from lmpress.calib import blockwise, run_block
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.prune.masks import PruneError


class DropBlocksConfig(MethodConfig):
    """Remove whole decoder blocks."""

    method: Literal["drop_blocks"] = "drop_blocks"
    blocks: int | None = Field(None, ge=1)  # how many to remove; or
    target: float | None = Field(None, gt=0, lt=1)  # the share of non-embedding parameters to remove
    score: Literal["angular", "last", "random"] = "angular"
    keep_first: bool = True  # never remove block 0 (it turns embeddings into the residual stream)
    iterative: bool = True  # angular: re-measure after each removal
    seed: int = 0
    calib_batch_size: int = Field(8, ge=1)


def _angular(a: Tensor, b: Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1]))
    return float(torch.arccos(cos.clamp(-1, 1)).mean() / torch.pi)


@torch.no_grad()
def block_influence(model: nn.Module, ctx: Context, batch_size: int = 8) -> list[float]:
    """Angular distance between each block's input and output on calibration data."""
    out = []
    for _, block, inputs in blockwise(model, ctx.calib_data().windows, batch_size, ctx.progress):
        outs = run_block(block, inputs)
        out.append(sum(_angular(h, o) * h.shape[0] for h, o in zip(inputs.hidden, outs, strict=True)))
        out[-1] /= sum(h.shape[0] for h in inputs.hidden)
    return out


def _iterative(
    model: nn.Module, ctx: Context, config: DropBlocksConfig, candidates: list[int], k: int, first: list[float]
) -> list[int]:
    """Remove the least influential block, measure again on the smaller model, repeat. Removes the
    blocks from ``model`` as it goes; returns their original indices."""
    alive = list(range(Adapter(model).num_blocks))  # original index of each remaining block
    drop: list[int] = []
    for step in range(k):
        infl = block_influence(model, ctx, config.calib_batch_size) if step else first
        pos = min((p for p, orig in enumerate(alive) if orig in candidates), key=lambda p: infl[p])
        drop.append(alive.pop(pos))
        remove_blocks(model, [pos])
    return sorted(drop)


def remove_blocks(model: nn.Module, drop: list[int]) -> None:
    """Delete blocks ``drop`` and renumber the rest (cache slots, config, per-layer types)."""
    adapter = Adapter(model)
    blocks = adapter.blocks()
    kept = [b for i, b in enumerate(blocks) if i not in set(drop)]
    parent, _, name = adapter.spec.blocks.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.ModuleList(kept))
    for new_idx, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_idx  # type: ignore[assignment]
    cfg: Any = text_config_of(model)  # a multimodal model's text config
    cfg.num_hidden_layers = len(kept)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == len(blocks):
        cfg.layer_types = [t for i, t in enumerate(types) if i not in set(drop)]


def apply(model: nn.Module, config: DropBlocksConfig, ctx: Context) -> StageReport:
    t0 = time.perf_counter()
    adapter = Adapter(model)
    n = adapter.num_blocks
    if (config.blocks is None) == (config.target is None):
        raise PruneError("drop_blocks: give exactly one of blocks (a count) or target (a parameter share)")
    if config.blocks is not None:
        k = config.blocks
    else:
        per_block = adapter.non_embedding_parameters() / n
        k = round(config.target * adapter.non_embedding_parameters() / per_block)  # type: ignore[operator]
    available = n - 1 if config.keep_first else n
    if not 1 <= k < n or k > available:
        raise PruneError(f"drop_blocks: cannot remove {k} of {n} blocks; at most {min(available, n - 1)}")
    candidates = list(range(1 if config.keep_first else 0, n))
    before = adapter.non_embedding_parameters()
    scores: list[float] | None = None
    if config.score == "angular":
        scores = block_influence(model, ctx, config.calib_batch_size)
        if config.iterative:  # measure again after each removal: the blocks after it see new inputs
            drop = _iterative(model, ctx, config, candidates, k, scores)
        else:
            drop = sorted(sorted(candidates, key=lambda i: scores[i])[:k])  # type: ignore[index]
    elif config.score == "last":
        drop = candidates[-k:]
    else:
        g = torch.Generator().manual_seed(config.seed)
        drop = sorted(candidates[j] for j in torch.randperm(len(candidates), generator=g)[:k].tolist())
    if Adapter(model).num_blocks == n:  # the iterative search removed them already
        remove_blocks(model, drop)
    after = Adapter(model).non_embedding_parameters()
    return {
        "dropped": drop,
        "influence": [round(s, 5) for s in scores] if scores else None,
        "removed_share": 1 - after / before,
        "prune_seconds": time.perf_counter() - t0,
    }


METHOD = Method(
    "drop_blocks", DropBlocksConfig, apply, "remove whole decoder blocks by block influence (angular distance)"
)
