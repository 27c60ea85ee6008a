"""``share``: cross-layer weight sharing: similar blocks' attention or MLP parts use one set of weights.

ALBERT (Lan et al. 2019, arXiv:1909.11942) shares every block's weights; for a trained model the
question is which parts are alike enough to share and what the shared weights should be.

- **What is merged.** A *part* is one block's attention projections or its MLP projections. A
  group of parts of the same kind (and shapes) is replaced by one set of linear layers; each block
  keeps its own norms. The shared weight of each projection is the activation-aware least-squares
  merge W* = (Σ_i W_i H_i)(Σ_i H_i)⁻¹, which minimizes Σ_i ‖(W_i − W*) X_i‖² over every member's
  calibration inputs X_i (H_i = X_iᵀX_i), rather than the plain mean (``merge: mean``).
- **Which parts.** The cost of a group is the sum over its members and projections of the relative
  output error tr((W_i − W*) H_i (W_i − W*)ᵀ) / tr(W_i H_i W_iᵀ). Starting from one group per part,
  groups of the same kind are merged greedily, cheapest added error per parameter saved first,
  until ``target`` of the blocks' linear parameters is saved (``contiguous``: only runs of adjacent
  blocks, as in most layer-sharing work). Or name the groups yourself with ``groups``.
- **Stored once.** The blocks hold the same module object; the saved file holds its tensors once
  and ``lmpress.json`` records which module names are the same (`lmpress.io`). A later
  quantization stage replaces the shared module everywhere at once; a recovery ``distill`` stage
  trains the shared weights with the gradients of every block that uses them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from lmpress.arch import Adapter, is_conv1d, linear_weight
from lmpress.calib import InputStats, blockwise, collect
from lmpress.errors import LmpressError
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.quant.base import replace_module

Part = Literal["attention", "mlp"]


class ShareError(LmpressError):
    """Weight sharing that cannot be done as asked."""


class Group(BaseModel):
    """Blocks whose ``part`` shares one set of weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    part: Part
    blocks: list[int] = Field(min_length=2)


class ShareConfig(MethodConfig):
    """Share attention or MLP weights across similar blocks."""

    method: Literal["share"] = "share"
    target: float = Field(0.25, gt=0, lt=1)  # share of the blocks' linear parameters to save
    parts: list[Part] = ["attention", "mlp"]
    groups: list[Group] = []  # explicit groups (then target is not used)
    contiguous: bool = True  # automatic groups: only runs of adjacent blocks
    merge: Literal["activation", "mean"] = "activation"
    damp: float = Field(0.01, gt=0, le=1)
    calib_batch_size: int = Field(8, ge=1)


@dataclass
class Member:
    """One block's part: its projections' weights and input statistics."""

    block: int
    names: dict[str, str]  # projection (relative name) -> full module name
    weights: dict[str, Tensor]  # projection -> (out, in) float64
    hessians: dict[str, Tensor] = field(default_factory=dict)  # projection -> (in, in) float64

    def shape(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple(sorted((k, tuple(w.shape)) for k, w in self.weights.items()))


def merged_weight(members: list[Member], proj: str, merge: str, damp: float) -> Tensor:
    """The shared weight of one projection for a group.  (out, in) float64"""
    if merge == "mean" or not members[0].hessians:
        return torch.stack([m.weights[proj] for m in members]).mean(0)
    H = sum(m.hessians[proj] for m in members)
    assert isinstance(H, Tensor)
    WH = sum(m.weights[proj] @ m.hessians[proj] for m in members)
    assert isinstance(WH, Tensor)
    H = H + damp * H.diagonal().mean().clamp(min=1e-12) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve(H, WH.T).T  # W* H = Σ W_i H_i  (H symmetric)


def group_cost(members: list[Member], merge: str, damp: float) -> float:
    """Σ over members and projections of the relative output error of using the merged weights."""
    if len(members) == 1:
        return 0.0
    cost = 0.0
    for proj in members[0].weights:
        W = merged_weight(members, proj, merge, damp)
        for m in members:
            D = m.weights[proj] - W
            H = m.hessians.get(proj)
            if H is None:  # no data: relative Frobenius distance
                cost += float(D.pow(2).sum() / m.weights[proj].pow(2).sum().clamp(min=1e-30))
                continue
            num = torch.einsum("ri,ij,rj->", D, H, D)
            den = torch.einsum("ri,ij,rj->", m.weights[proj], H, m.weights[proj]).clamp(min=1e-30)
            cost += float(num / den)
    return cost


def part_modules(adapter: Adapter, i: int, part: Part) -> dict[str, str]:
    linears = adapter.attention_linears(i) if part == "attention" else adapter.mlp_linears(i)
    prefix = adapter.block_name(i) + "."
    return {name.removeprefix(prefix): name for name in linears}


def check_groups(adapter: Adapter, config: ShareConfig) -> None:
    """Explicit groups: blocks exist, are dense, appear once per part, and have the same shapes."""
    n = adapter.num_blocks
    seen: set[tuple[str, int]] = set()
    for g in config.groups:
        for b in g.blocks:
            if not 0 <= b < n:
                raise ShareError(f"share: block {b} does not exist; the model has blocks 0..{n - 1}")
            if (g.part, b) in seen:
                raise ShareError(f"share: block {b}'s {g.part} is in two groups; merge them into one group")
            seen.add((g.part, b))
        shapes = {b: part_shapes(adapter, b, g.part) for b in g.blocks}
        first = g.blocks[0]
        for b in g.blocks[1:]:
            if shapes[b] != shapes[first]:
                raise ShareError(
                    f"share: blocks {first} and {b} have {g.part} layers of different shapes "
                    f"({shapes[first]} vs {shapes[b]}); only same-shaped parts can share weights"
                )


def part_shapes(adapter: Adapter, i: int, part: Part) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(linear_weight(adapter.model.get_submodule(v)).shape) for k, v in part_modules(adapter, i, part).items()
    }


def _dense(m: nn.Module) -> bool:
    return type(m) is nn.Linear or is_conv1d(m)


def plan(members: dict[tuple[Part, int], Member], config: ShareConfig, total: int) -> list[list[tuple[Part, int]]]:
    """Greedy agglomeration of parts into groups until ``target`` of ``total`` parameters is saved."""
    groups: list[list[tuple[Part, int]]] = [[k] for k in sorted(members)]
    cost = {tuple(g): 0.0 for g in groups}
    saved, budget = 0, config.target * total

    def params(key: tuple[Part, int]) -> int:
        return sum(w.numel() for w in members[key].weights.values())

    while saved < budget:
        best: tuple[float, int, int, float] | None = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                ga, gb = groups[a], groups[b]
                if ga[0][0] != gb[0][0] or members[ga[0]].shape() != members[gb[0]].shape():
                    continue
                blocks = sorted(k[1] for k in ga + gb)
                if config.contiguous and blocks != list(range(blocks[0], blocks[-1] + 1)):
                    continue
                merged = group_cost([members[k] for k in ga + gb], config.merge, config.damp)
                extra = merged - cost[tuple(ga)] - cost[tuple(gb)]
                per_param = extra / params(ga[0])  # two stored copies become one
                if best is None or per_param < best[0]:
                    best = (per_param, a, b, merged)
        if best is None:
            raise ShareError(
                f"share: sharing saves at most {saved / total:.0%} of the blocks' linear parameters here; lower target"
            )
        _, a, b, merged = best
        new = sorted(groups[a] + groups[b], key=lambda k: k[1])
        saved += params(new[0])  # one more part's weights are no longer stored
        groups = [g for i, g in enumerate(groups) if i not in (a, b)] + [new]
        cost[tuple(new)] = merged
    return [g for g in groups if len(g) > 1]


ROLES = ("share", "attention and MLP layers", "use lowrank or cluster")


@torch.no_grad()
def apply(model: nn.Module, config: ShareConfig, ctx: Context) -> StageReport:
    t0 = time.perf_counter()
    adapter = Adapter(model)
    adapter.require_roles(*ROLES)
    check_groups(adapter, config)
    parts = sorted({g.part for g in config.groups}) if config.groups else config.parts
    members: dict[tuple[Part, int], Member] = {}
    for i in range(adapter.num_blocks):
        for part in parts:
            names = part_modules(adapter, i, part)
            mods = {k: model.get_submodule(v) for k, v in names.items()}
            if not all(_dense(m) for m in mods.values()):
                if any(g.part == part and i in g.blocks for g in config.groups):
                    raise ShareError(f"share: block {i}'s {part} is already compressed; share before compressing")
                continue
            members[(part, i)] = Member(i, names, {k: linear_weight(m).detach().double() for k, m in mods.items()})
    if config.merge == "activation":
        by_module = {v: (key, k) for key, m in members.items() for k, v in m.names.items()}
        for i, block, inputs in blockwise(model, ctx.calib_data().windows, config.calib_batch_size, ctx.progress):
            mine = {n: model.get_submodule(n) for n in by_module if n.startswith(adapter.block_name(i) + ".")}
            stats = collect(
                block, inputs, mine, lambda m: InputStats.empty(linear_weight(m).shape[1], linear_weight(m).device)
            )
            for name, st in stats.items():
                key, proj = by_module[name]
                members[key].hessians[proj] = st.H.double()
    total = sum(w.numel() for m in members.values() for w in m.weights.values())
    if config.groups:
        chosen = [[(g.part, b) for b in sorted(g.blocks)] for g in config.groups]
    else:
        chosen = plan(members, config, total)
    report_groups = []
    saved = 0
    for group in chosen:
        group_members = [members[k] for k in group]
        first = group_members[0]
        for proj, name in first.names.items():
            W = merged_weight(group_members, proj, config.merge, config.damp)
            shared = copy.deepcopy(model.get_submodule(name))
            weight, bias = shared.weight, getattr(shared, "bias", None)
            assert isinstance(weight, Tensor)
            weight.data.copy_((W.T if is_conv1d(shared) else W).to(weight.dtype))
            biases = [getattr(model.get_submodule(m.names[proj]), "bias", None) for m in group_members]
            if isinstance(bias, Tensor) and all(isinstance(b, Tensor) for b in biases):
                bias.data.copy_(torch.stack([b.detach().float() for b in biases if isinstance(b, Tensor)]).mean(0))
            for m in group_members:
                replace_module(model, m.names[proj], shared)
            saved += sum(p.numel() for p in shared.parameters()) * (len(group) - 1)
        report_groups.append(
            {
                "part": group[0][0],
                "blocks": [k[1] for k in group],
                "error": group_cost(group_members, config.merge, config.damp),
            }
        )
    return {
        "groups": report_groups,
        "saved_share": saved / max(total, 1),  # of the parts' weights (biases count towards saved too)
        "parameters_saved": saved,
        "share_seconds": time.perf_counter() - t0,
    }


METHOD = Method(
    "share",
    ShareConfig,
    apply,
    "cross-layer weight sharing: similar blocks' attention/MLP use one set",
    needs_roles=lambda config: ROLES,
)
