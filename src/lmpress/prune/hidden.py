"""``hidden``: remove hidden (embedding) channels, the width of the residual stream, everywhere.

Minitron-style width pruning (Muralidharan et al. 2024, arXiv:2407.14679): a hidden channel matters
as much as the energy the normalization layers hand on in it, E[norm(x)_c²], summed over every
norm of the model on the calibration data. The least important channels are removed from the
token embeddings, every norm, the input columns of every projection that reads the residual
stream (attention q/k/v, MLP gate/up, the head) and the output rows of every projection that writes
it (attention and MLP output). The result is a plain Hugging Face model with a smaller
``hidden_size`` (``head_dim`` kept), a natural starting point for distillation.

An RMS norm over fewer channels divides by a different root mean square; each norm's weights are
rescaled by sqrt(E[Σ_kept x²]/kept ÷ E[Σ_all x²]/all) of its measured input, so that on average
it hands on the same magnitudes as before.

Supported for the families whose attention reads ``head_dim`` from the config (Llama, Mistral,
Qwen2, Qwen3): GPT-2-style models add position embeddings and biased layer norms, left for later.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lmpress.arch import Adapter, supporting
from lmpress.arch.widths import head_dim, slice_linear
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.prune.masks import PruneError


class HiddenConfig(MethodConfig):
    """Remove a share of the hidden channels (the residual stream's width)."""

    method: Literal["hidden"] = "hidden"
    share: float = Field(0.25, gt=0, lt=1)  # of the hidden channels to remove
    multiple_of: int = Field(32, ge=1)  # the kept width is a multiple of this (nearest)
    calib_batch_size: int = Field(8, ge=1)


@torch.no_grad()
def channel_statistics(
    model: nn.Module, windows: Tensor, norms: dict[str, nn.Module], batch: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per channel: Σ over norms of E[norm(x)_c²] (importance), and per norm E[x_c²] of its input."""
    importance = torch.zeros(0)
    inputs: dict[str, Tensor] = {}
    seen: dict[str, int] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            nonlocal importance
            x, y = args[0].float().flatten(0, -2), out.float().flatten(0, -2)  # (tokens, hidden)
            n = seen.get(name, 0)
            mean_in, mean_out = x.pow(2).mean(0), y.pow(2).mean(0)
            prev_in = inputs.get(name, torch.zeros_like(mean_in))
            inputs[name] = prev_in + (mean_in - prev_in) * x.shape[0] / (n + x.shape[0])
            seen[name] = n + x.shape[0]
            importance = mean_out if importance.numel() == 0 else importance + mean_out

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in norms.items()]
    try:
        device = next(model.parameters()).device
        for ids in windows.split(batch):
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return importance, inputs


def _width(norm: nn.Module) -> int | None:
    w = getattr(norm, "weight", None)
    return int(w.shape[0]) if isinstance(w, Tensor) else None


def _slice_vector(m: nn.Module, attr: str, keep: Tensor) -> None:
    t = getattr(m, attr, None)
    if isinstance(t, Tensor):
        setattr(m, attr, nn.Parameter(t.detach()[keep].clone()))


ROLES = ("hidden", "norms, heads and the config keys of its widths", "use drop_blocks")


def apply(model: nn.Module, config: HiddenConfig, ctx: Context) -> StageReport:
    t0 = time.perf_counter()
    adapter = Adapter(model)
    adapter.require_roles(*ROLES, PruneError)
    if not adapter.spec.hidden_prunable:
        raise PruneError(
            f"hidden: removing hidden channels is supported for {', '.join(supporting('hidden_prunable'))}, not "
            f"{adapter.model_type}; use structured (heads and neurons) or drop_blocks instead"
        )
    hidden = int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]
    kept_width = round(hidden * (1 - config.share) / config.multiple_of) * config.multiple_of
    if not 0 < kept_width < hidden:
        raise PruneError(
            f"hidden: share {config.share} of {hidden} channels in multiples of {config.multiple_of} "
            f"keeps {kept_width}; choose a share that keeps between 1 and {hidden - 1} multiples"
        )
    dims = {head_dim(adapter, i) for i in range(adapter.num_blocks)}
    norms = {
        f"{adapter.block_name(i)}.{n}": m for i in range(adapter.num_blocks) for n, m in adapter.block_norms(i).items()
    }
    norms[adapter.final_norm()[0]] = adapter.final_norm()[1]
    norms = {n: m for n, m in norms.items() if _width(m) == hidden}
    importance, inputs = channel_statistics(model, ctx.calib_data().windows, norms, config.calib_batch_size)
    keep = torch.topk(importance, kept_width).indices.sort().values

    with torch.no_grad():
        for name, norm in norms.items():
            energy = inputs[name]
            factor = ((energy[keep].sum() / kept_width) / (energy.sum() / hidden)).sqrt()
            _slice_vector(norm, "weight", keep)
            w: Tensor = norm.weight  # type: ignore[assignment]
            w.mul_(factor.to(w.dtype))
            _slice_vector(norm, "bias", keep)
        for emb in adapter.embeddings().values():
            table: Tensor = emb.weight  # type: ignore[assignment]
            emb.weight = nn.Parameter(table.detach()[:, keep].clone())
            emb.embedding_dim = kept_width  # type: ignore[assignment]
        for i in range(adapter.num_blocks):
            for group in (adapter.attention_linears(i), adapter.mlp_linears(i)):
                *reads, writes = group.values()
                for m in reads:
                    slice_linear(m, cols=keep)
                slice_linear(writes, rows=keep)
        head = adapter.head()[1]
        if head.weight is not adapter.embeddings()[adapter.spec.token_embedding()].weight:
            slice_linear(head, cols=keep)
        head.in_features = kept_width  # type: ignore[assignment]
    model.config.hidden_size = kept_width  # type: ignore[union-attr]
    model.config.head_dim = dims.pop()  # type: ignore[union-attr]
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # type: ignore[operator]
    for i in range(adapter.num_blocks):  # attention modules that cached the hidden size
        attn = adapter.model.get_submodule(f"{adapter.block_name(i)}.{adapter.spec.attention_module}")
        if hasattr(attn, "hidden_size"):
            attn.hidden_size = kept_width  # type: ignore[assignment]
    return {
        "hidden_size": kept_width,
        "removed_channels": hidden - kept_width,
        "non_embedding_parameters": adapter.non_embedding_parameters(),
        "prune_seconds": time.perf_counter() - t0,
    }


METHOD = Method(
    "hidden",
    HiddenConfig,
    apply,
    "remove hidden (embedding) channels everywhere: a narrower dense model",
    needs_roles=lambda config: ROLES,
)
