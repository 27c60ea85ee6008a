"""What every weight quantizer shares: the config fields, choosing layers, and swapping them in.

A method supplies one function that turns a layer's (out, in) weight into `Quantized` codes; this
module finds the targeted layers (exact names or ``re:`` regexes; GPT-2's ``Conv1D`` included),
applies per-layer overrides, replaces each layer with a `QuantLinear`, and checks that every
result is finite.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from lmpress.arch import Adapter, has_spec, is_conv1d, linear_weight, replace_module
from lmpress.calib import blockwise, collect, outside_stats
from lmpress.errors import LmpressError
from lmpress.formats import ggml
from lmpress.formats.ggml import GRID_FALLBACK, GridName
from lmpress.formats.grid import Quantized
from lmpress.method import Context, MethodConfig, StageReport
from lmpress.nn.gguf_linear import GGUFEmbedding, GGUFLinear
from lmpress.nn.quant_embedding import QuantEmbedding
from lmpress.nn.quant_linear import QuantLinear
from lmpress.quant import ggml_fit
from lmpress.quant.experts import float_modules, quantize_experts, refuse_calibrated, targeted_experts
from lmpress.quant.grid import quantize
from lmpress.quant.mix import MIX_BASE, mix_layer_types, table_fields
from lmpress.select import Patterns, matches, select
from lmpress.streaming import each_block, outside_units, resident


class QuantError(LmpressError):
    """A quantization step that cannot be carried out as asked."""


class Override(BaseModel):
    """Different settings for the layers matched by ``targets`` (first matching override wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: Patterns
    bits: int | None = Field(None, ge=2, le=8)
    group_size: int | None = Field(None, gt=0)
    symmetric: bool | None = None
    grid: GridName | None = None  # a GGUF block type for these layers (wins over bits/group_size)


class WeightQuantConfig(MethodConfig):
    """Fields shared by weight-only quantizers."""

    bits: int = Field(4, ge=2, le=8)  # bits per weight code
    group_size: int | None = Field(128, gt=0)  # weights sharing one scale (and zero); None: one group per output row
    symmetric: bool = False  # zero point fixed at the grid's middle (no stored zeros)
    scale_dtype: Literal["float16", "bfloat16"] = "float16"  # storage type of the scales
    targets: Patterns = ["re:.*"]  # layers to quantize: exact names or re: regexes
    ignore: Patterns = ["lm_head"]  # layers to leave alone (wins over targets)
    overrides: list[Override] = []  # different bits/groups for some layers; the first match wins
    # a targeted layer that saw no calibration tokens (an expert never routed to): stop, or round it
    uncalibrated: Literal["error", "rtn"] = "error"
    embedding_bits: int | None = Field(None, ge=2, le=8)  # None: token embeddings stay as they are
    embedding_group_size: int | None = Field(128, gt=0)  # group size of the embedding codes
    # optimize on exactly a GGUF block type's grid (llama.cpp's q4_k, q6_k, q8_0 ...): the layer
    # stores that type's bytes and exports to GGUF without a second rounding; bits/group_size/
    # symmetric are then the type's own
    grid: GridName | None = None
    embedding_grid: GridName | None = None  # the token embeddings in a GGUF block type
    # llama.cpp's per-layer mix for its _M files (more bits for the head and some v/down layers); sets grid
    mix: Literal["q2_k", "q3_k_m", "q4_0", "q4_k_m", "q5_k_m", "q8_0"] | None = None


C = TypeVar("C", bound=WeightQuantConfig)


def with_mix(model: nn.Module, config: C) -> C:
    """``config`` with its ``mix`` spelled out as exact-name overrides for ``model`` (after the
    recipe's own, which win), and ``grid`` set to the mix's base type. A head tied to the embeddings
    is one table, quantized once with them (`table_fields`: the mix's head type)."""
    base = config.grid or MIX_BASE.get(config.mix or "", "")
    table = table_fields(
        model, config.mix, base, config.embedding_bits is not None or config.embedding_grid is not None
    )
    head = table.pop("head", None)
    update: dict[str, Any] = {**table, "ignore": [*config.ignore, head]} if head else {}
    if config.mix is not None:
        types = mix_layer_types(model, config.mix)
        extra = [Override.model_validate({"targets": [n], "grid": t}) for n, t in types.items() if n != head]
        update.update(grid=base, overrides=[*config.overrides, *extra])
    return config.model_copy(update=update) if update else config


class LayerSettings(BaseModel):
    """The effective settings of one layer after overrides."""

    model_config = ConfigDict(frozen=True)

    bits: int
    group_size: int | None
    symmetric: bool
    grid: str | None = None  # a GGUF block type (`lmpress.formats.ggml`); then the other fields are its own


def grid_settings(name: str, in_features: int, grid: str) -> LayerSettings:
    """Settings of a GGUF-grid layer; a row that no 256-weight super-block divides falls back to
    the 32-block type llama.cpp would use, and a row no 32-block divides is an error."""
    t = ggml.ggml_type(grid)
    if in_features % t.block and grid in GRID_FALLBACK:
        t = ggml.ggml_type(GRID_FALLBACK[grid])
    if in_features % t.block:
        raise QuantError(
            f"layer {name}: {in_features} inputs are not a multiple of {t.block}, which GGUF type {grid} needs; "
            f"leave it out with ignore: [{name!r}] or quantize it without grid"
        )
    return LayerSettings(bits=t.bits, group_size=t.sub, symmetric=not t.affine, grid=t.name)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and GPT-2 ``Conv1D`` of the model's text part, by name (a multimodal
    model's vision tower and projector are kept as they are)."""
    text = Adapter(model).is_text if has_spec(getattr(model, "config", None)) else lambda name: True
    return {n: m for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_conv1d(m)) and text(n)}


def targeted_layers(model: nn.Module, config: MethodConfig) -> dict[str, nn.Module]:
    """The layers this stage quantizes; an empty selection is an error, not a silent no-op."""
    targets, ignore = config.targets, config.ignore  # type: ignore[attr-defined]
    layers = linear_layers(model)
    chosen = select(layers, targets, [*ignore, *float_modules(model)])  # routers stay in float
    if not chosen and not targeted_experts(model, config):  # an experts module is no linear
        example = next(iter(layers), "none")
        raise QuantError(
            f"recipe stage ({config.method}): targets {targets} minus ignore {ignore} match no linear "
            f"layer; names look like {example!r}"
        )
    return chosen


def settings_for(name: str, config: WeightQuantConfig, in_features: int | None = None) -> LayerSettings:
    """A layer's settings: the first matching override, else the config. An override's ``grid``
    wins; an override that sets bits, group_size or symmetric but no grid leaves the GGUF grid."""
    grid = config.grid
    for o in config.overrides:
        if matches(name, o.targets):
            integer = o.bits is not None or o.group_size is not None or o.symmetric is not None
            grid = o.grid if o.grid is not None else (None if integer else config.grid)
            if grid is None:
                return LayerSettings(
                    bits=o.bits if o.bits is not None else config.bits,
                    group_size=o.group_size if o.group_size is not None else config.group_size,
                    symmetric=o.symmetric if o.symmetric is not None else config.symmetric,
                )
            break
    if grid is not None and in_features is not None:
        return grid_settings(name, in_features, grid)
    if grid is not None:
        t = ggml.ggml_type(grid)
        return LayerSettings(bits=t.bits, group_size=t.sub, symmetric=not t.affine, grid=t.name)
    return LayerSettings(bits=config.bits, group_size=config.group_size, symmetric=config.symmetric)


def to_quant_linear(
    name: str,
    module: nn.Module,
    q: Quantized,
    symmetric: bool,
    scale_dtype: str,
    float_zeros: bool = False,
    act_bits: int | None = None,
) -> QuantLinear:
    """A `QuantLinear` for ``module`` from its codes; stops on non-finite scales."""
    if not (torch.isfinite(q.scales).all() and torch.isfinite(q.zeros).all()):
        raise QuantError(f"layer {name}: non-finite scales after quantization; check the layer's weights")
    bias = getattr(module, "bias", None)
    bias = bias.detach().to(linear_weight(module).dtype) if isinstance(bias, Tensor) else None
    return QuantLinear.from_quantized(q, bias, symmetric, getattr(torch, scale_dtype), float_zeros, act_bits)


def check_finite(name: str, w: Tensor) -> None:
    if not torch.isfinite(w).all():
        raise QuantError(f"layer {name}: weight has non-finite values; fix or exclude it with ignore: [{name!r}]")


QuantizeFn = Callable[[str, nn.Module, LayerSettings], "Quantized | ggml.GGMLBlocks"]


def to_gguf_linear(name: str, module: nn.Module, b: ggml.GGMLBlocks) -> GGUFLinear:
    """A `GGUFLinear` for ``module`` from its blocks; stops on non-finite scales."""
    parts = [p for p in (b.d, b.dmin) if p is not None]
    if not all(torch.isfinite(p.float()).all() for p in parts):
        raise QuantError(f"layer {name}: non-finite scales after quantization; check the layer's weights")
    bias = getattr(module, "bias", None)
    bias = bias.detach().to(linear_weight(module).dtype) if isinstance(bias, Tensor) else None
    return GGUFLinear.from_blocks(b, bias)


def quantize_layers(
    model: nn.Module,
    layers: dict[str, nn.Module],
    config: WeightQuantConfig,
    fn: QuantizeFn,
    float_zeros: bool = False,
) -> dict[str, int]:
    """Quantize each layer with ``fn`` and swap in a `QuantLinear`; returns a count per bit width."""
    counts: dict[str, int] = {}
    for name, module in layers.items():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):  # experts: `lmpress.quant.experts`
            _add(counts, quantize_experts(model, name, fn, settings_for, config, float_zeros))
            continue
        w = linear_weight(module)
        s = settings_for(name, config, w.shape[1])
        check_finite(name, w)
        q = fn(name, module, s)
        if isinstance(q, ggml.GGMLBlocks):
            layer: nn.Module = to_gguf_linear(name, module, q)
            key = q.type.name
        else:
            layer = to_quant_linear(name, module, q, s.symmetric, config.scale_dtype, float_zeros)
            key = f"w{s.bits}g{s.group_size or 'row'}"
        replace_module(model, name, layer)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v


def units_of(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The streaming units (`lmpress.streaming.outside_units`) that hold the modules ``names``."""
    units = outside_units(model)
    return [u for u in units if any(n == u or n.startswith(u + ".") for n in names)]


def quantize_each_block(
    model: nn.Module,
    layers: Iterable[str],
    config: WeightQuantConfig,
    fn: QuantizeFn,
    float_zeros: bool = False,
) -> dict[str, int]:
    """`quantize_layers` on the layers named ``layers``, one decoder block at a time
    (`lmpress.streaming.each_block`: a streamed model holds one block in memory), then the layers
    outside the blocks. Names, not modules: each replaced layer's weights are freed as it goes."""
    adapter = Adapter(model)
    layers = set(layers)
    counts: dict[str, int] = {}
    in_blocks: set[str] = set()
    for i, _ in each_block(model):
        block = {**adapter.block_linears(i), **adapter.experts(i)}
        mine = {n: m for n, m in block.items() if n in layers}
        in_blocks.update(block)
        _add(counts, quantize_layers(model, mine, config, fn, float_zeros))
    rest = sorted(layers - in_blocks)
    if rest:
        with resident(model, units_of(model, rest), changed=True):
            _add(counts, quantize_layers(model, {n: model.get_submodule(n) for n in rest}, config, fn, float_zeros))
    return counts


def quantize_embeddings(model: nn.Module, config: WeightQuantConfig) -> dict[str, int]:
    """`_quantize_embeddings` with the embeddings and the head in memory (a streamed model)."""
    if config.embedding_bits is None and config.embedding_grid is None:
        return {}
    adapter = Adapter(model)
    with resident(model, [*adapter.embeddings(), adapter.head()[0]], changed=True):
        return _quantize_embeddings(model, config)


def _quantize_embeddings(model: nn.Module, config: WeightQuantConfig) -> dict[str, int]:
    """Quantize the token embedding table (round to nearest, MSE-clipped) when ``embedding_bits`` is set.

    A head tied to the embeddings gets its own layer with the same codes (a `GGUFLinear` reading the
    `GGUFEmbedding`'s blocks), and the config is untied, so the saved model reloads as it ran.
    """
    if config.embedding_bits is None and config.embedding_grid is None:
        return {}
    embed = model.get_input_embeddings()  # type: ignore[operator]
    if not isinstance(embed, nn.Embedding):
        raise QuantError(
            f"recipe stage ({config.method}): the token embedding is {type(embed).__name__}, "
            "not nn.Embedding; remove embedding_bits / embedding_grid"
        )
    names = {id(m): n for n, m in model.named_modules()}
    name = names[id(embed)]
    check_finite(name, embed.weight)
    head = model.get_output_embeddings()  # type: ignore[operator]
    tied = head is not None and getattr(head, "weight", None) is embed.weight
    if config.embedding_grid is not None:
        s = grid_settings(name, embed.embedding_dim, config.embedding_grid)
        assert s.grid is not None
        b = ggml_fit.quantize(embed.weight.detach(), s.grid)
        table = GGUFEmbedding.from_blocks(b, embed.weight.dtype, embed.padding_idx)
        if tied:  # the head reads the table's blocks: one table, saved once
            replace_module(model, names[id(head)], to_gguf_linear(names[id(head)], head, b).tie(table, name))
            model.config.tie_word_embeddings = False  # type: ignore[union-attr]
        replace_module(model, name, table)
        return {f"embedding {s.grid}": 1}
    assert config.embedding_bits is not None
    q = quantize(embed.weight.detach(), config.embedding_bits, config.embedding_group_size, mse_clip=True)
    if tied:
        head_q = to_quant_linear(names[id(head)], head, q, False, config.scale_dtype)
        head_q.tied_to = name  # the codes are stored twice, the weights counted once
        replace_module(model, names[id(head)], head_q)
        model.config.tie_word_embeddings = False  # type: ignore[union-attr]
    layer = QuantEmbedding.from_quantized(
        q, False, embed.weight.dtype, getattr(torch, config.scale_dtype), embed.padding_idx
    )
    replace_module(model, name, layer)
    return {f"embedding w{config.embedding_bits}g{config.embedding_group_size or 'row'}": 1}


def quantize_weights(
    model: nn.Module, config: WeightQuantConfig, fn: QuantizeFn, float_zeros: bool = False
) -> StageReport:
    """The loop every calibration-free weight quantizer shares: ``fn`` quantizes each targeted
    layer (`quantize_each_block`), then the embeddings follow ``embedding_bits``."""
    t0 = time.perf_counter()
    config = with_mix(model, config)
    layers = [*targeted_layers(model, config), *targeted_experts(model, config)]  # names: replaced layers freed
    counts = quantize_each_block(model, layers, config, fn, float_zeros)
    counts.update(quantize_embeddings(model, config))
    return {"layers": counts, "quantize_seconds": time.perf_counter() - t0}


BlockQuantizer = Callable[[int, dict[str, nn.Module], dict[str, Any]], QuantizeFn]


def quantize_calibrated(
    model: nn.Module,
    config: WeightQuantConfig,
    ctx: Context,
    make_stats: Callable[[nn.Module], Any],
    per_block: BlockQuantizer,
    batch_size: int = 8,
    calibrate_outside: bool = False,
) -> StageReport:
    """The loop every data-driven weight quantizer shares.

    Block by block (`lmpress.calib.blockwise`): collect ``make_stats(layer)`` for the block's
    targeted linears, let ``per_block(i, layers, stats)`` prepare the block (fold scales, check
    token counts) and return the function that quantizes one layer, swap the layers in. Targeted
    layers outside the blocks (``lm_head``) get round-to-nearest; embeddings follow
    ``embedding_bits``; with ``calibrate_outside`` the head is quantized like a block's layers
    (``per_block(-1, ...)``) on its inputs from the already-quantized model's forward.
    """
    t0 = time.perf_counter()
    refuse_calibrated(model, config, QuantError)
    config = with_mix(model, config)
    targets = list(targeted_layers(model, config))  # names: a replaced layer's old weights must not stay alive
    adapter = Adapter(model)
    calib = ctx.calib_data()
    done: dict[str, int] = {}
    handled: set[str] = set()

    def count(counts: dict[str, int]) -> None:
        for k, v in counts.items():
            done[k] = done.get(k, 0) + v

    for i, block, inputs in blockwise(model, calib.windows, batch_size, ctx.progress):
        layers = {n: m for n, m in adapter.block_linears(i).items() if n in targets}
        if not layers:
            continue
        stats = collect(block, inputs, layers, make_stats)
        unseen = [n for n, st in stats.items() if st.n_tokens == 0]
        if unseen and config.uncalibrated == "error":
            raise QuantError(
                f"layer {unseen[0]} received no calibration tokens; exclude it with ignore: [{unseen[0]!r}] "
                "or set uncalibrated: rtn to round such layers to nearest"
            )
        layers = {n: m for n, m in layers.items() if n not in unseen}
        stats = {n: st for n, st in stats.items() if n not in unseen}
        count(quantize_layers(model, layers, config, per_block(i, layers, stats)))
        handled.update(layers)
    in_blocks = {n for i in range(adapter.num_blocks) for n in adapter.block_linears(i)}
    outside = {n: model.get_submodule(n) for n in targets if n not in handled and n not in in_blocks}
    if outside and calibrate_outside:  # the head: calibrated on what the quantized blocks hand it
        stats = outside_stats(model, calib.windows, outside, make_stats, batch_size)
        with resident(model, units_of(model, outside), changed=True):
            count(quantize_layers(model, outside, config, per_block(-1, outside, stats)))
        handled.update(outside)
    rest = [n for n in targets if n not in handled]
    if rest:  # no block inputs (lm_head) or no calibration tokens (uncalibrated: rtn): round to nearest

        def rtn(name: str, module: nn.Module, s: LayerSettings) -> Quantized | ggml.GGMLBlocks:
            if s.grid is not None:
                return ggml_fit.quantize(linear_weight(module).detach(), s.grid)
            return quantize(linear_weight(module), s.bits, s.group_size, s.symmetric)

        count(quantize_each_block(model, rest, config, rtn))
    count(quantize_embeddings(model, config))
    return {"layers": done, "calib_tokens": calib.windows.numel(), "quantize_seconds": time.perf_counter() - t0}
