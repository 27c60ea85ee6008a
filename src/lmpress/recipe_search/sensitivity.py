"""The sensitivity cache: each block group's, the head's and the embeddings' KL when only they are
rounded to b bits, measured once per model; it predicts a trial's KL and seeds the search."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from lmpress.io import write_json_atomic
from lmpress.quant.base import quantize_embeddings
from lmpress.quant.rtn import RTNConfig
from lmpress.recipe_search.space import (
    SearchSpace,
    blocks_pattern,
)
from lmpress.recipe_search.trials import (
    Evaluator,
)

log = logging.getLogger(__name__)


def sensitivity(
    ev: Evaluator, space: SearchSpace, groups: list[list[int]], prefix: str, cache: Path | None
) -> dict[str, float]:
    """KL when only one part is changed (cached): rounded to b bits (``g{i}@{b}``, ``head@{b}``,
    ``embed@{b}``), a block group pruned to sparsity s (``g{i}@s{s}``), k blocks dropped (``drop@{k}``)."""
    if cache is not None and cache.is_file():
        return dict(json.loads(cache.read_text()))
    out: dict[str, float] = {}
    gs = max(space.group_sizes)
    for b in sorted(set(space.bits) | {x for x in space.head_bits + space.embedding_bits if x}):
        for g, blocks in enumerate(groups):
            stage = {"method": "rtn", "bits": b, "group_size": gs, "targets": [blocks_pattern(prefix, blocks)]}
            out[f"g{g}@{b}"] = _kl_of(ev, stage, f"g{g}@{b}")
        out[f"head@{b}"] = _kl_of(
            ev, {"method": "rtn", "bits": b, "group_size": gs, "targets": ["lm_head"], "ignore": []}, f"head@{b}"
        )
        out[f"embed@{b}"] = _embed_kl(ev, b, gs)
    for sp in sorted(x for x in space.sparsity if x):  # pruning alone (dense codes' share is the bits' entry)
        for g, blocks in enumerate(groups):
            out[f"g{g}@s{sp:g}"] = _kl_of(
                ev,
                {"method": "sparsegpt", "sparsity": sp, "targets": [blocks_pattern(prefix, blocks)]},
                f"g{g}@s{sp:g}",
            )
    for k in sorted(x for x in space.drop_blocks if x):
        out[f"drop@{k}"] = _kl_of(ev, {"method": "drop_blocks", "blocks": k}, f"drop@{k}")
    if cache is not None:
        write_json_atomic(cache, out)
    return out


def _kl_of(ev: Evaluator, stage: dict[str, Any], key: str) -> float:
    model, _ = ev.compress({"stages": [stage]})
    kl = float(ev.measure(model, ev.select_windows[: max(4, len(ev.select_windows) // 4)])["kl"])
    log.info("sensitivity %s (%s): KL %.4f", key, stage["method"], kl)
    return kl


def _embed_kl(ev: Evaluator, bits: int, group_size: int) -> float:
    """Embeddings only (a head tied to them is rounded with them)."""
    model = copy.deepcopy(ev.model)
    config = RTNConfig.model_validate({"bits": bits, "embedding_bits": bits, "embedding_group_size": group_size})
    quantize_embeddings(model, config)
    return float(ev.measure(model, ev.select_windows[: max(4, len(ev.select_windows) // 4)])["kl"])


def _space_key(space: SearchSpace, groups: list[list[int]]) -> str:
    """What the sensitivity cache depends on, as a short hash."""
    import hashlib

    parts = [groups, space.bits, space.head_bits, space.embedding_bits, space.group_sizes, space.sparsity]
    blob = json.dumps([*parts, space.drop_blocks], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def predicted_kl(choice: dict[str, Any], sens: dict[str, float], n_groups: int) -> float:
    """A trial's KL predicted as the sum of its parts' (first order: the parts' errors add)."""
    kl = sum(sens.get(f"g{g}@{choice[f'bits_g{g}']}", 0.0) for g in range(n_groups))
    kl += sum(sens.get(f"g{g}@s{choice.get(f'sparsity_g{g}', 0.0):g}", 0.0) for g in range(n_groups))
    kl += sens.get(f"drop@{choice.get('drop_blocks', 0)}", 0.0)
    if choice.get("head_bits"):
        kl += sens.get(f"head@{choice['head_bits']}", 0.0)
    if choice.get("embedding_bits"):
        kl += sens.get(f"embed@{choice['embedding_bits']}", 0.0)
    return kl


# ---- the study ----------------------------------------------------------------------------------


def _seed_choices(space: SearchSpace, n_groups: int, sens: dict[str, float], small: bool) -> list[dict[str, Any]]:
    """Uniform bits at every level, and the same with one step more bits for the most sensitive group;
    with a size budget (``small``), head and embeddings at their fewest bits."""
    out = []
    levels = sorted(space.bits)

    def pick(options: list[int | None]) -> int | None:
        quantized = [b for b in options if b]
        return min(quantized) if small and quantized else options[0]

    common = {
        "method": space.methods[0],
        "group_size": min(space.group_sizes),
        "head_bits": pick(space.head_bits),
        "embedding_bits": pick(space.embedding_bits),
        **{f"sparsity_g{g}": space.sparsity[0] for g in range(n_groups)},
        "drop_blocks": space.drop_blocks[0],
    }

    def above(options: list[int | None], b: int) -> int | None:
        higher = sorted(x for x in options if x and x > b)
        return higher[0] if higher else None

    for i, b in enumerate(levels):
        uniform = {**common, **{f"bits_g{g}": b for g in range(n_groups)}}
        out.append(uniform)
        if i + 1 < len(levels) and n_groups > 1 and sens:
            worst = max(range(n_groups), key=lambda g: sens.get(f"g{g}@{b}", 0.0))
            out.append({**uniform, f"bits_g{worst}": levels[i + 1]})
        if small:  # the usual hand-written choice: head and embeddings one step above the blocks
            head, embed = above(space.head_bits, b), above(space.embedding_bits, b)
            if head is not None and embed is not None:
                out.append({**uniform, "head_bits": head, "embedding_bits": embed})
    return out
