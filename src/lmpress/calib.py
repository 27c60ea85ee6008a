"""The calibration driver: one decoder block at a time, fed the outputs of the compressed blocks.

GPTQ, AWQ, SparseGPT, Wanda, activation-aware SVD and structured importance all need the same
thing: the inputs of each block, statistics of each linear layer's inputs, and the block's outputs
after it is compressed. `blockwise` captures what the first block receives (hidden states plus
whatever else the model passes it: attention mask, position ids, rotary embeddings; no cache; in a
model whose layers attend differently, as ``config.layer_types`` lists them, those of each type), then
yields each block with its inputs; when the caller has compressed the block, the driver runs it
again to produce the next block's inputs. Peak memory is one block's activations for the
calibration set plus one block's weights. Hooks are removed on every exit path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from lmpress.arch import Adapter
from lmpress.progress import track
from lmpress.streaming import resident, stream_of


@dataclass
class BlockInputs:
    """What one block receives for each calibration batch."""

    hidden: list[Tensor]  # per batch: (B, T, D)
    args: list[tuple[Any, ...]]  # per batch: further positional arguments
    kwargs: list[dict[str, Any]]  # per batch: the other arguments (mask, positions, rotary)
    # a model whose layers differ in attention (sliding-window and full layers, each with its own
    # mask and rotary: Gemma 2/3): each block's type, and the kwargs of each type
    layer_types: tuple[str, ...] = ()
    by_type: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def at(self, i: int) -> BlockInputs:
        """These inputs as block ``i`` receives them (its layer type's mask and rotary)."""
        return replace(self, kwargs=self.by_type[self.layer_types[i]]) if self.by_type else self

    def through(self, i: int, block: nn.Module) -> BlockInputs:
        """The next block's inputs: block ``i``'s outputs on these."""
        return replace(self, hidden=run_block(block, self.at(i)))


@dataclass
class InputStats:
    """Running H = (2/N) Σ x xᵀ over N calibration tokens of one linear layer."""

    H: Tensor  # (in, in) float32
    n_tokens: int = 0

    @classmethod
    def empty(cls, in_features: int, device: torch.device) -> InputStats:
        return cls(torch.zeros(in_features, in_features, device=device))

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        n = x.shape[0]
        self.H.mul_(self.n_tokens / (self.n_tokens + n))
        self.n_tokens += n
        add_gram(self.H, x, 2.0 / self.n_tokens)

    def reduce(self, dist: Any) -> None:
        self.n_tokens = _reduce_mean(dist, self.H, self.n_tokens)


GRAM_PIECES = 4  # xᵀx of a wide layer in 4 column pieces: 10 of the 16 products, about 30% faster


def add_gram(H: Tensor, x: Tensor, alpha: float) -> None:
    """H += alpha xᵀx for (tokens, in) ``x``: the products on and above the diagonal in column
    pieces (the matrix is symmetric), the ones below copied from them."""
    n = x.shape[1]
    if n < 1024:
        H.addmm_(x.T, x, alpha=alpha)
        return
    edges = [n * i // GRAM_PIECES for i in range(GRAM_PIECES + 1)]
    for a, b in pairwise(edges):
        H[a:b, a:].addmm_(x[:, a:b].T, x[:, a:], alpha=alpha)
    for a, b in pairwise(edges[1:]):
        H[a:b, :a].copy_(H[:a, a:b].T)


@dataclass
class SquareNorm:
    """Running mean of x_j² per input column over calibration tokens (Wanda, AWQ, SmoothQuant)."""

    mean_sq: Tensor  # (in,)
    abs_max: Tensor  # (in,)
    n_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, in_features: int, device: torch.device) -> SquareNorm:
        return cls(torch.zeros(in_features, device=device), torch.zeros(in_features, device=device))

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.mean_sq.mul_(self.n_tokens / (self.n_tokens + n)).add_(x.pow(2).sum(0), alpha=1.0 / (self.n_tokens + n))
        self.abs_max = torch.maximum(self.abs_max, x.abs().amax(0))
        self.n_tokens += n

    def reduce(self, dist: Any) -> None:
        dist.all_reduce(self.abs_max, op=dist.ReduceOp.MAX)
        self.n_tokens = _reduce_mean(dist, self.mean_sq, self.n_tokens)


class _StopForwardError(Exception):
    """Raised by the capture hook to end the forward pass at the first block."""


@contextmanager
def capture_inputs(modules: Mapping[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, input)`` with each module's input while the context is open."""
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: fn(name, args[0])) for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def shard_windows(windows: Tensor) -> Tensor:
    """This process's share of the calibration windows under ``torch.distributed`` (every
    ``world``-th window from its rank); all of them in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return windows[dist.get_rank() :: dist.get_world_size()]
    return windows


def all_reduce_stats(stats: Mapping[str, Any]) -> None:
    """Make every process's statistics those of all processes' windows (`InputStats`, `SquareNorm`:
    token-weighted means, maxima of ``abs_max``); a no-op in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for st in {id(s): s for s in stats.values()}.values():
        if not hasattr(st, "reduce"):
            raise TypeError(f"{type(st).__name__} statistics cannot be combined across processes")
        st.reduce(dist)


def _reduce_mean(dist: Any, mean: Tensor, n_tokens: int) -> int:
    """Token-weighted mean of ``mean`` over processes, in place; returns the total token count."""
    n = torch.tensor([float(n_tokens)], dtype=torch.float64, device=mean.device)
    mean.mul_(n_tokens)
    dist.all_reduce(mean)
    dist.all_reduce(n)
    total = int(n.item())
    mean.div_(max(total, 1))
    return total


@torch.no_grad()
def first_block_inputs(model: nn.Module, windows: Tensor, batch_size: int) -> BlockInputs:
    """Run the model up to its first block on each batch of ``windows`` (N, T); keep the block's inputs."""
    adapter = Adapter(model)
    stream = stream_of(model)
    if stream is not None:
        with resident(model, adapter.embeddings()):
            return _typed_inputs(model, adapter, windows, batch_size, stream.device)
    return _typed_inputs(model, adapter, windows, batch_size, next(model.parameters()).device)


def _typed_inputs(
    model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int, device: torch.device
) -> BlockInputs:
    """The first block's inputs; where ``config.layer_types`` names more than one type, also the
    kwargs the first block would get were it of each type (the model's forward picks the mask and
    rotary by that list, so the first entry is relabelled for each capture)."""
    config: Any = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = list(getattr(config, "layer_types", None) or [])
    inputs = _first_block_inputs(model, adapter, windows, batch_size, device)
    if len(set(types)) < 2 or len(types) != adapter.num_blocks:
        return inputs
    by_type = {}
    try:
        for t in dict.fromkeys(types):
            config.layer_types = [t, *types[1:]]
            by_type[t] = _first_block_inputs(model, adapter, windows, batch_size, device).kwargs
    finally:
        config.layer_types = types
    return replace(inputs, layer_types=tuple(types), by_type=by_type)


def _first_block_inputs(
    model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int, device: torch.device
) -> BlockInputs:
    inputs = BlockInputs([], [], [])

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.hidden.append(hidden.detach())
        inputs.args.append(tuple(args[1:]))
        inputs.kwargs.append({k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")})
        raise _StopForwardError

    handle = adapter.blocks()[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, windows.shape[0], batch_size):
            with suppress(_StopForwardError):
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return inputs


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
    """The block's outputs for every batch.  [(B, T, D)]"""
    outs = []
    for h, a, kw in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
        out = block(h, *a, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def collect(
    block: nn.Module, inputs: BlockInputs, layers: Mapping[str, nn.Module], make: Callable[[nn.Module], Any]
) -> dict[str, Any]:
    """Run the block with hooks; ``make(layer)`` builds a stats object with ``update(x)``. Each
    batch stops as soon as every layer has seen its input (for q/k/v that is right after the norm).
    Layers fed the very same tensor (q/k/v after one norm) share one stats object, computed once."""
    stats = {name: make(m) for name, m in layers.items()}
    seen: set[str] = set()
    # this batch: the inputs taken so far (held, so no later tensor reuses their memory) and whose
    # stats took them; layers fed the very same tensor (q/k/v, gate/up) share one stats object
    owner: list[tuple[Tensor, str]] = []
    aliases: dict[str, str] = {}

    def update(name: str, x: Tensor) -> None:
        seen.add(name)
        if name not in aliases and first_batch:
            for t, first in owner:
                if t is x and type(stats[first]) is type(stats[name]):
                    aliases[name] = first
                    break
        if name not in aliases:
            owner.append((x, name))
            stats[name].update(x)
        if len(seen) == len(stats):  # every layer has its input: the rest of the block is not needed
            raise _StopForwardError

    with capture_inputs(layers, update):
        for b, (h, a, kw) in enumerate(zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True)):
            seen.clear()
            owner.clear()
            first_batch = b == 0
            with suppress(_StopForwardError):
                block(h, *a, **kw)
    for name, first in aliases.items():
        stats[name] = stats[first]
    all_reduce_stats(stats)
    return stats


@torch.no_grad()
def outside_stats(
    model: nn.Module,
    windows: Tensor,
    layers: Mapping[str, nn.Module],
    make: Callable[[nn.Module], Any],
    batch_size: int = 8,
) -> dict[str, Any]:
    """Input statistics of layers outside the decoder blocks (the output head) from the model's
    own forward on ``windows`` (N, T); each batch stops once every layer has seen its input, so no
    logits are computed."""
    windows = shard_windows(windows)
    if stream_of(model) is not None:
        if set(layers) - {Adapter(model).head()[0]}:
            raise ValueError(f"streamed calibration reaches only the head after the blocks, not {sorted(layers)}")
        return _streamed_head_stats(model, windows, make, batch_size)
    stats = {name: make(m) for name, m in layers.items()}
    seen: set[str] = set()

    def update(name: str, x: Tensor) -> None:
        seen.add(name)
        stats[name].update(x)
        if len(seen) == len(stats):
            raise _StopForwardError

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with capture_inputs(layers, update):
            for i in range(0, windows.shape[0], batch_size):
                seen.clear()
                with suppress(_StopForwardError):
                    model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    all_reduce_stats(stats)
    return stats


@torch.no_grad()
def _streamed_head_stats(
    model: nn.Module, windows: Tensor, make: Callable[[nn.Module], Any], batch_size: int
) -> dict[str, Any]:
    """`outside_stats` for a streamed model: carry the windows through the blocks one at a time,
    then through the final norm to the head (the only layer after the blocks lmpress targets)."""
    adapter = Adapter(model)
    head_name, _ = adapter.head()
    inputs = first_block_inputs(model, windows, batch_size)
    for i in range(adapter.num_blocks):
        with resident(model, [adapter.block_name(i)]):
            inputs = inputs.through(i, adapter.blocks()[i])
    norm_name, norm = adapter.final_norm()
    with resident(model, [norm_name, head_name]):
        stats = {head_name: make(model.get_submodule(head_name))}
        for h in inputs.hidden:
            stats[head_name].update(norm(h))
    all_reduce_stats(stats)
    return stats


def blockwise(
    model: nn.Module, windows: Tensor, batch_size: int = 8, progress: bool = False
) -> Iterator[tuple[int, nn.Module, BlockInputs]]:
    """Yield (index, block, inputs) for each block; after the caller compresses a block, its
    outputs on ``inputs`` become the next block's inputs."""
    adapter = Adapter(model)
    was_training = model.training
    model.eval()
    inputs = first_block_inputs(model, shard_windows(windows), batch_size)
    try:
        for i in track(range(adapter.num_blocks), "calibrating blocks", enabled=progress):
            with resident(model, [adapter.block_name(i)], changed=True):
                block = adapter.blocks()[i]
                yield i, block, inputs.at(i)
                inputs = inputs.through(i, block)
    finally:
        model.train(was_training)
