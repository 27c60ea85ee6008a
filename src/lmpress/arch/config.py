"""What a ``config.json`` says about sizes, read the same way for every family.

Families spell the same size differently (``hidden_size``, ``n_embd``, ``d_model``); `CONFIG_KEYS`
lists the spellings of each, for checks that must read any config (plausible sizes, a memory
estimate) before a model is built. `Shapes` is the parameter count a config implies, without
building it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from lmpress.arch.discover import block_linears, find_blocks
from lmpress.arch.multimodal import auto_class
from lmpress.arch.registry import is_supported, spec_for

log = logging.getLogger(__name__)

# size -> the config keys that spell it, in the order they are read
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "vocab": ("vocab_size",),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size"),
    "heads": ("num_attention_heads", "n_head", "num_key_value_heads"),
    "experts": ("num_experts", "num_local_experts", "n_routed_experts"),
}
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def first_value(config: dict[str, Any], size: str, default: int = 0) -> int:
    """The first of ``size``'s keys the config sets (truthy), else ``default``."""
    for key in CONFIG_KEYS[size]:
        if config.get(key):
            return int(config[key])
    return default


@dataclass(frozen=True)
class Shapes:
    """The sizes a parameter count needs, from a config as a dict."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    q_dim: int  # heads x head_dim
    kv_dim: int
    tied: bool
    gated: bool  # a gated MLP (Llama) has three projections, else two
    # a model without a spec: its block's linear parameters as transformers builds it (the discovered
    # linears of block 0, `lmpress.arch.discover`), instead of the count from the sizes; None: counted
    discovered: int | None = None

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shapes:
        h = first_value(config, "hidden")
        layers = first_value(config, "layers")
        inter = int(config.get("intermediate_size") or config.get("n_inner") or config.get("ffn_dim") or 4 * h)
        heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
        head_dim = int(config.get("head_dim") or h // heads)
        kv = int(config.get("num_key_value_heads") or heads)
        model_type = config.get("model_type")
        spec = spec_for(model_type) if is_supported(model_type) else None
        discovered = _discovered_block(config) if spec is None else None
        return cls(
            h,
            layers,
            inter,
            int(config.get("vocab_size") or 0),
            heads * head_dim,
            kv * head_dim,
            bool(config.get("tie_word_embeddings", spec is not None and spec.tied_by_default)),
            spec is not None and spec.gated,
            discovered,
        )

    @property
    def block_params(self) -> int:
        if self.discovered is not None:
            return self.discovered
        attn = self.hidden * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden
        return attn + (3 if self.gated else 2) * self.hidden * self.intermediate

    @property
    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.outside_params


def _discovered_block(config: dict[str, Any]) -> int | None:
    """The weights of block 0's linears (`lmpress.arch.discover`) in the model transformers builds
    from ``config`` on the meta device (no memory), where it builds one; None where it cannot (no
    model_type it knows, remote code, sizes it refuses)."""
    from transformers import AutoConfig  # at first use: importing it takes seconds

    try:
        settings = {k: v for k, v in config.items() if k != "model_type"}
        built = AutoConfig.for_model(str(config.get("model_type")), **settings)
        with torch.device("meta"):
            model = auto_class(built).from_config(built)
    except Exception as e:  # any refusal of the config: the sizes' count stands
        log.debug("no model built from %s's config: %s", config.get("model_type"), e)
        return None
    blocks = find_blocks(model)
    if blocks is None:
        return None
    first = model.get_submodule(blocks)[0]
    total = 0
    for path in block_linears(model.get_submodule(blocks)):
        try:
            m = first.get_submodule(path)
        except AttributeError:  # a hybrid model's block 0 lacks this kind's linears
            continue
        total += sum(p.numel() for p in m.parameters())
    return total
