"""``structured``: remove whole attention units and MLP neurons, leaving a smaller dense model.

Importance comes from one pass of the dense model over the calibration data: a neuron j matters
as much as the energy it sends into the block's output, E[h_j²]·‖W_down[:, j]‖² (h the output
projection's input); an attention unit (a key/value head with its query heads) sums the same over
the output projection's columns of its heads. With ``importance: magnitude`` the activations are
left out (no data needed).

The recipe gives a target: the share of non-embedding parameters to remove. Attention units are
coarse (a model with two KV heads per block can only lose half its attention), so lmpress removes
the largest share of attention units not above the target (``attention_share`` scales it) and
takes the rest from the MLP. With ``uniform: true`` every block loses the same number of units
and the result is a plain Hugging Face model (heads where the config has a ``head_dim``; neurons
always); with ``uniform: false`` the least important units across all blocks go first and lmpress
records per-block widths in ``lmpress.json`` so its loader restores them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lmpress.arch import Adapter, linear_weight
from lmpress.arch.widths import (
    attention_counts,
    head_dim,
    keep_attention_units,
    keep_neurons,
    mlp_width,
    uniform_config_update,
    unit_heads,
)
from lmpress.calib import SquareNorm, blockwise, collect
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.prune.masks import PruneError


class StructuredConfig(MethodConfig):
    """Structured pruning of attention units and MLP neurons to a parameter target."""

    method: Literal["structured"] = "structured"
    target: float = Field(0.25, gt=0, lt=1)  # share of non-embedding parameters to remove
    attention: bool = True  # may remove attention units
    mlp: bool = True  # may remove MLP neurons
    attention_share: float = Field(1.0, ge=0, le=1)  # scales the share of attention units removed
    uniform: bool = True  # same widths in every block
    # kept MLP widths are multiples of this, rounded to the nearest (odd widths make CPU GEMMs slow:
    # a 4864 -> 3107-neuron MLP ran prefill at 0.86x the unpruned model's speed)
    multiple_of: int = Field(32, ge=1)
    importance: Literal["activation", "magnitude"] = "activation"
    calib_batch_size: int = Field(8, ge=1)


@dataclass
class BlockScores:
    units: Tensor  # (units,) importance of each attention unit
    neurons: Tensor  # (neurons,)


def _col_energy(w_out: Tensor, stats: SquareNorm | None) -> Tensor:
    """E[x_j²]·‖W[:, j]‖² per input column j of an output projection (out, in)."""
    e = w_out.detach().float().pow(2).sum(0)
    return e * stats.mean_sq if stats is not None else e


@torch.no_grad()
def importance(model: nn.Module, config: StructuredConfig, ctx: Context) -> list[BlockScores]:
    """Per block, the importance of each attention unit and each MLP neuron."""
    adapter = Adapter(model)
    out_attn = {i: list(adapter.attention_linears(i).items())[-1] for i in range(adapter.num_blocks)}
    out_mlp = {i: list(adapter.mlp_linears(i).items())[-1] for i in range(adapter.num_blocks)}
    stats: dict[int, dict[str, SquareNorm]] = {}
    if config.importance == "activation":
        windows = ctx.calib_data().windows
        for i, block, inputs in blockwise(model, windows, config.calib_batch_size, ctx.progress):
            layers = dict([out_attn[i], out_mlp[i]])
            stats[i] = collect(
                block, inputs, layers, lambda m: SquareNorm.empty(linear_weight(m).shape[1], linear_weight(m).device)
            )
    scores = []
    for i in range(adapter.num_blocks):
        st = stats.get(i, {})
        a_name, a_mod = out_attn[i]
        m_name, m_mod = out_mlp[i]
        cols = _col_energy(linear_weight(a_mod), st.get(a_name))
        hd = head_dim(adapter, i)
        per_head = cols.view(-1, hd).sum(1)
        units = torch.stack([per_head[h].sum() for h in unit_heads(adapter, i)])
        scores.append(BlockScores(units, _col_energy(linear_weight(m_mod), st.get(m_name))))
    return scores


def unit_costs(adapter: Adapter, i: int) -> tuple[int, int]:
    """Parameters one attention unit and one MLP neuron of block i hold (weights and biases)."""
    n_kv = attention_counts(adapter, i)[1]
    lin = list(adapter.attention_linears(i).values())
    attn_params = sum(linear_weight(m).numel() + _bias_size(m) for m in lin) - _bias_size(lin[-1])
    mlp = list(adapter.mlp_linears(i).values())
    per_neuron = sum(int(linear_weight(m).shape[1]) + (1 if _bias_size(m) else 0) for m in mlp[:-1])
    per_neuron *= 2 if adapter.spec.gate_up else 1  # a row in each half of a fused gate/up
    per_neuron += int(linear_weight(mlp[-1]).shape[0])
    return attn_params // n_kv, per_neuron


def _bias_size(m: nn.Module) -> int:
    b = getattr(m, "bias", None)
    return b.numel() if isinstance(b, Tensor) else 0


def plan(
    adapter: Adapter, scores: list[BlockScores], config: StructuredConfig
) -> tuple[list[list[int]], list[Tensor], int]:
    """Which units and neurons each block keeps, and the parameters removed."""
    n = adapter.num_blocks
    costs = [unit_costs(adapter, i) for i in range(n)]
    budget = config.target * adapter.non_embedding_parameters()
    n_units = [len(s.units) for s in scores]
    n_neurons = [len(s.neurons) for s in scores]
    # attention: the largest share of units not above the target, at least one unit left per block
    remove_units = [0] * n
    if config.attention:
        share = config.target * config.attention_share
        if config.uniform:
            r = min(math.floor(share * min(n_units) + 1e-9), min(n_units) - 1)
            remove_units = [r] * n
        else:
            total = math.floor(share * sum(n_units) + 1e-9)
            remove_units = _spread(scores, total, [u - 1 for u in n_units], lambda s: s.units)
    removed = sum(r * costs[i][0] for i, r in enumerate(remove_units))
    rest = max(budget - removed, 0)
    remove_neurons = [0] * n
    if rest > 0:
        if not config.mlp:
            raise PruneError(
                f"removing {config.target:.0%} of non-embedding parameters needs MLP neurons too; "
                "set mlp: true or lower target"
            )
        per_block_cost = sum(c[1] for c in costs) / n
        mult = config.multiple_of
        if config.uniform:
            per_block = rest / (per_block_cost * n)
            kept = round((min(n_neurons) - per_block) / mult) * mult  # the nearest multiple: closest to the target
            if kept <= 0:
                raise PruneError(
                    f"target {config.target:.0%} would remove every MLP neuron (kept widths are multiples of "
                    f"{mult}); lower target or multiple_of"
                )
            remove_neurons = [max(w - kept, 0) for w in n_neurons]
        else:
            total = math.ceil(rest / per_block_cost)
            if total > sum(n_neurons) - n * mult:
                raise PruneError(f"target {config.target:.0%} would remove every MLP neuron; lower it")
            remove_neurons = _spread(scores, total, [w - mult for w in n_neurons], lambda s: s.neurons)
            # each block's kept width to the nearest multiple, at least one multiple
            remove_neurons = [
                max(w - max(round((w - r) / mult), 1) * mult, 0) for w, r in zip(n_neurons, remove_neurons, strict=True)
            ]
    keep_units = [
        sorted(torch.topk(s.units, len(s.units) - remove_units[i]).indices.tolist()) for i, s in enumerate(scores)
    ]
    keep_neuron_idx = [torch.topk(s.neurons, len(s.neurons) - remove_neurons[i]).indices for i, s in enumerate(scores)]
    removed += sum(r * costs[i][1] for i, r in enumerate(remove_neurons))
    return keep_units, keep_neuron_idx, removed


def _spread(scores: list[BlockScores], total: int, most: list[int], get: Callable[[BlockScores], Tensor]) -> list[int]:
    """Remove ``total`` units across blocks, least important first, at most ``most[i]`` from block
    i. Scores are compared as they are: each is the energy a unit adds to the residual stream, which
    every block writes into on the same scale."""
    cands = [(float(x), i) for i, s in enumerate(scores) for x in get(s).float()]
    cands.sort()
    out = [0] * len(scores)
    for _, i in cands:
        if total == 0:
            break
        if out[i] < most[i]:
            out[i] += 1
            total -= 1
    return out


ROLES = ("structured", "attention heads and MLP neurons", "use magnitude, wanda or sparsegpt")


def apply(model: nn.Module, config: StructuredConfig, ctx: Context) -> StageReport:
    t0 = time.perf_counter()
    if not (config.attention or config.mlp):
        raise PruneError("structured: set attention or mlp (or both) to true")
    adapter = Adapter(model)
    adapter.require_roles(*ROLES, PruneError)
    if adapter.spec.experts is not None:
        raise PruneError(f"structured: {adapter.model_type} has experts, which lmpress cannot cut yet (issue 32)")
    if adapter.spec.optional_linears:
        raise PruneError(
            f"structured: {adapter.model_type} blocks are of several kinds (attention and others) whose widths "
            "lmpress does not cut apart; use magnitude, wanda or sparsegpt"
        )
    why = adapter.spec.heads_refuse(model.config) if config.attention else None
    if why:
        raise PruneError(f"structured: {why}; set attention: false to remove MLP neurons only")
    before = adapter.non_embedding_parameters()
    scores = importance(model, config, ctx)
    keep_units, keep_neuron_idx, _ = plan(adapter, scores, config)
    for i in range(adapter.num_blocks):
        if len(keep_units[i]) < len(scores[i].units):
            keep_attention_units(adapter, i, keep_units[i])
        if len(keep_neuron_idx[i]) < len(scores[i].neurons):
            keep_neurons(adapter, i, keep_neuron_idx[i])
    plain = uniform_config_update(model)
    after = adapter.non_embedding_parameters()
    return {
        "removed_share": 1 - after / before,
        "non_embedding_parameters": after,
        "blocks": [
            {
                "heads": attention_counts(adapter, i)[0],
                "kv_heads": attention_counts(adapter, i)[1],
                "mlp": mlp_width(adapter, i),
            }
            for i in range(adapter.num_blocks)
        ],
        "plain_transformers": plain,
        "prune_seconds": time.perf_counter() - t0,
    }


METHOD = Method(
    "structured",
    StructuredConfig,
    apply,
    "remove attention heads (KV groups) and MLP neurons: a smaller dense model",
    needs_roles=lambda config: ROLES,
)
