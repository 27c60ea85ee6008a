"""Models bigger than memory: the tensors stay on disk, one unit (a block, the embeddings) at a time in memory.

A streamed model is the architecture built on the meta device (no weights allocated; small
non-persistent buffers such as rotary frequencies are real) plus a `Stream`, which reads a unit's
tensors from the checkpoint's safetensors files (memory-mapped, shard by shard) when the calibration
driver or a stage reaches it and, when the work on it is done, writes what the unit now holds
(compressed layers included) to a spill file of its own and puts the unit back on the meta device.
A later stage reads the unit from its spill; saving (`save_streamed_dir`) writes the output's shards
unit by unit from the spills and the checkpoint. The safetensors files themselves are read and
written by `lmpress.io.tensors`.
Post-training stages (those whose method says ``streams``) work unchanged on a streamed model as long
as they touch a block's tensors only inside `lmpress.calib.blockwise` or `each_block`, and tensors
outside the blocks only inside `resident`; both are plain loops on a model held whole.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmpress.arch import Adapter, auto_class
from lmpress.arch.multimodal import kept_modules
from lmpress.errors import ModelLoadError
from lmpress.heap import trim_heap, tune_malloc
from lmpress.io.consistency import as_saved, checkpoint_names, expert_stacks
from lmpress.io.files import FORMAT_VERSION, META_FILE, atomic_dir, weight_bytes, write_json_atomic
from lmpress.io.load import _tied_keys
from lmpress.io.save import hide_from_plain_loaders, library_versions, module_formats, save_companions
from lmpress.io.tensors import DTYPES, Checkpoint, Planned, parameters_on_meta, read_header, read_tensor, write_shards
from lmpress.progress import phase, track

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One place a tensor lives: ``module._parameters[name]`` or ``module._buffers[name]``."""

    module: nn.Module
    name: str
    param: bool

    def get(self) -> Tensor | None:
        return (self.module._parameters if self.param else self.module._buffers)[self.name]


def _assign(slots: list[_Slot], t: Tensor) -> None:
    """Put ``t`` in every slot; parameter slots share one `nn.Parameter`, so ties survive."""
    param = None
    for s in slots:
        if s.param:
            if param is None:
                old = s.get()
                param = nn.Parameter(t, requires_grad=bool(old is not None and old.requires_grad))
            s.module._parameters[s.name] = param
        else:
            s.module._buffers[s.name] = t


def _slots(module: nn.Module, prefix: str) -> dict[str, _Slot]:
    """Full key -> slot of every saved tensor under ``module`` (tied copies under every name)."""
    out = {}
    for mname, m in module.named_modules(remove_duplicate=False):
        base = f"{prefix}.{mname}" if mname else prefix
        for n, p in m._parameters.items():
            if p is not None:
                out[f"{base}.{n}".lstrip(".")] = _Slot(m, n, True)
        for n, b in m._buffers.items():
            if b is not None and n not in m._non_persistent_buffers_set:
                out[f"{base}.{n}".lstrip(".")] = _Slot(m, n, False)
    return out


@dataclass
class Stream:
    """Which units of a meta-device model are in memory, and where each unit's tensors are read from.

    A unit is a module name: a decoder block, an embedding, the final norm, the head. ``spills``
    holds the units a stage changed; every other tensor comes from the source checkpoint.
    """

    model: nn.Module
    source: Checkpoint
    spill_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    spills: dict[str, Path] = field(default_factory=dict)
    described: dict[str, dict[str, Any]] = field(default_factory=dict)  # compressed layers' lmpress_format
    resident: dict[str, int] = field(default_factory=dict)  # unit -> how many users hold it
    renames: dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key, where they differ
    # model key -> per expert, the checkpoint keys concatenated into its matrix (experts stored one by one)
    stacks: dict[str, list[list[str]]] = field(default_factory=dict)

    aliases: dict[str, str] = field(default_factory=dict)  # tied key -> the key its tensor is saved under

    def _source_key(self, key: str) -> str:
        key = self.aliases.get(key, key)
        return self.renames.get(key, key)

    def _read(self, unit: str, slots: dict[str, _Slot]) -> dict[str, Tensor]:
        """The tensors of ``slots`` (full key -> slot) from the unit's spill or the checkpoint, floating
        point ones in the dtype the model holds them in (a `cast` stage changes it on the meta model)."""
        out: dict[str, Tensor] = {}
        if unit in self.spills:
            spill = self.spills[unit]
            header = read_header(spill)
            for k in slots:
                if k in header:
                    out[k] = read_tensor(spill, header, k)
        for k in slots:
            if k not in out and k in self.stacks:  # stacked as the experts module holds them
                out[k] = torch.stack([torch.cat([self.source.tensor(s) for s in e]) for e in self.stacks[k]])
            if k not in out:
                src = self._source_key(k)
                if src not in self.source.where:
                    raise ModelLoadError(
                        f"{self.source.path}: tensor {src} is missing from the weights; restore the model's files"
                    )
                out[k] = self.source.tensor(src)
        for k, s in slots.items():
            want = s.get()
            if want is not None and want.is_floating_point() and out[k].is_floating_point():
                out[k] = out[k].to(want.dtype)
        return out

    def load(self, unit: str) -> nn.Module:
        """Bring ``unit``'s tensors into memory (tied tensors are set under every name)."""
        module = self.model.get_submodule(unit)
        self.resident[unit] = self.resident.get(unit, 0) + 1
        if self.resident[unit] > 1:
            return module
        slots = _slots(module, unit)
        todo = {k: s for k, s in slots.items() if (t := s.get()) is not None and t.is_meta}
        if not todo:
            return module
        tied = self._holders()
        values = self._read(unit, todo)
        for k, s in todo.items():
            old = s.get()
            assert old is not None
            _assign(tied.get(id(old), [s]), values[k].to(self.device))
        return module

    def _holders(self) -> dict[int, list[_Slot]]:
        held: dict[int, list[_Slot]] = {}
        for s in _slots(self.model, "").values():
            t = s.get()
            if t is not None:
                held.setdefault(id(t), []).append(s)
        return held

    def release(self, unit: str, changed: bool) -> None:
        """Done with ``unit``: if a stage ``changed`` it, write what it holds now to its spill;
        then put it back on the meta device (tensors another resident unit shares stay)."""
        self.resident[unit] -= 1
        if self.resident[unit] > 0:
            return
        del self.resident[unit]
        module = self.model.get_submodule(unit)
        if changed:
            self._spill(unit, module)
        keep = {id(s.get()) for u in self.resident for s in _slots(self.model.get_submodule(u), u).values()}
        tied = self._holders()
        for s in _slots(module, unit).values():
            t = s.get()
            if t is None or t.is_meta or id(t) in keep:
                continue
            _assign(tied.get(id(t), [s]), torch.empty_like(t, device="meta"))
        for m in module.modules():  # a compressed layer's prepared kernel layout goes too
            forget = getattr(m, "forget_kernel", None)
            if callable(forget):
                forget()
        trim_heap()

    def _spill(self, unit: str, module: nn.Module) -> None:
        for m in module.modules():  # codes held only in a kernel layout come back to be written
            materialize = getattr(m, "materialize", None)
            if callable(materialize):
                materialize()
        state = {k: s.get() for k, s in _slots(module, unit).items()}
        seen: dict[int, str] = {}
        tensors: dict[str, Tensor] = {}
        for k, t in state.items():
            assert t is not None
            if id(t) in seen:  # tied inside the unit: stored once
                continue
            seen[id(t)] = k
            tensors[k] = t.detach().to("cpu").contiguous()
        for name, m in module.named_modules():
            describe = getattr(m, "lmpress_format", None)
            if callable(describe):
                self.described[f"{unit}.{name}".rstrip(".")] = describe()
        path = self.spill_dir / f"{unit}.safetensors"
        save_file(tensors, str(path))
        self.spills[unit] = path

    def units(self) -> list[str]:
        """Every unit in file order: the embeddings, the blocks, then the rest (final norm, head)."""
        adapter = Adapter(self.model)
        blocks = [adapter.block_name(i) for i in range(adapter.num_blocks)]
        head, _ = adapter.head()
        kept = kept_modules(self.model, (adapter.language_model, head)) if adapter.language_model else []
        if kept is None:  # the preflight does not stream it (`lmpress.preflight.why_whole`)
            raise ModelLoadError(
                f"{adapter.model_type}: tensors beside its language model are not streamed; load it whole"
            )
        return [*adapter.embeddings(), *blocks, adapter.final_norm()[0], head, *kept]  # kept: a vision tower


def stream_of(model: nn.Module) -> Stream | None:
    """The `Stream` of a streamed model; None for a model held whole."""
    return getattr(model, "_lmpress_stream", None)


@contextmanager
def resident(model: nn.Module, units: Iterable[str], changed: bool = False) -> Iterator[None]:
    """Hold ``units`` (module names) in memory for the body; a no-op for a model held whole."""
    stream = stream_of(model)
    if stream is None:
        yield
        return
    units = list(dict.fromkeys(units))
    held: list[str] = []
    try:
        for u in units:
            stream.load(u)
            held.append(u)
        yield
    except BaseException:
        for u in reversed(held):
            stream.release(u, changed=False)
        raise
    for u in reversed(held):
        stream.release(u, changed=changed)


def outside_units(model: nn.Module) -> list[str]:
    """The units outside the decoder blocks: embeddings, final norm, head."""
    adapter = Adapter(model)
    return [*adapter.embeddings(), adapter.final_norm()[0], adapter.head()[0]]


def each_block(model: nn.Module, progress: bool = False, label: str = "blocks") -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, block) with the block in memory; a streamed block is saved when the caller
    moves on (the caller may change it)."""
    adapter = Adapter(model)
    for i in track(range(adapter.num_blocks), label, enabled=progress):
        with resident(model, [adapter.block_name(i)], changed=True):
            yield i, adapter.blocks()[i]


def open_streamed(
    path: Path, dtype: torch.dtype | str = "auto", device: torch.device | None = None, work: Path | None = None
) -> nn.Module:
    """The model in ``path`` on the meta device with a `Stream` over its safetensors files.

    ``work``: where the spills go (a temporary directory by default; removed by `close`).
    """
    from transformers import AutoConfig  # at first use: importing it takes seconds

    source = Checkpoint(path)
    tune_malloc()
    config = AutoConfig.from_pretrained(path)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    with no_init_weights(), parameters_on_meta():
        model = auto_class(config).from_config(config, dtype=dtype)
    model.tie_weights()  # skipped at construction while both sides are on meta
    model.eval()
    spill = Path(tempfile.mkdtemp(prefix="lmpress-stream-", dir=work))
    stream = Stream(model, source, spill, device or torch.device("cpu"))
    stream.stacks, renamed = expert_stacks(model, set(source.keys()))
    stream.renames = {**renamed, **_renames(model, set(source.keys()))}
    first: dict[int, str] = {}
    for k, slot in _slots(model, "").items():  # state-dict order: the embeddings before a tied head
        t = slot.get()
        if id(t) in first:
            stream.aliases[k] = first[id(t)]
        first.setdefault(id(t), k)
    object.__setattr__(model, "_lmpress_stream", stream)
    missing = [k for k in _slots(model, "") if stream._source_key(k) not in source.where and k not in stream.stacks]
    if missing:
        close(model)
        raise ModelLoadError(f"{path}: tensor {missing[0]} is missing from the weights; restore the model's files")
    return model


def _renames(model: nn.Module, ckpt: set[str]) -> dict[str, str]:
    """Model key -> checkpoint key where a checkpoint names tensors differently (a checkpoint saved
    without the base model's prefix, or renamed the way ``save_pretrained`` renames: GPT-NeoX's
    untied head is saved as ``embed_out``, the module is ``lm_head``)."""
    own = _slots(model, "")
    converted = checkpoint_names(model, sorted(ckpt)) or {}  # file name -> model name
    out = {m: f for f, m in converted.items() if m != f and m in own and m not in ckpt}
    prefix = getattr(model, "base_model_prefix", "")
    for k in own:
        if k in out:
            continue
        if k in ckpt:
            continue
        if prefix and k.startswith(prefix + ".") and k[len(prefix) + 1 :] in ckpt:
            out[k] = k[len(prefix) + 1 :]
    return out


def close(model: nn.Module) -> None:
    """Remove a streamed model's spills."""
    stream = stream_of(model)
    if stream is not None:
        shutil.rmtree(stream.spill_dir, ignore_errors=True)
        stream.spills.clear()


def save_streamed(model: nn.Module, out_dir: Path, max_shard_bytes: int = 2 * 2**30) -> None:
    """Write a streamed model's tensors into ``out_dir`` as safetensors shards, one unit's tensors in
    memory at a time (`lmpress.io.tensors.write_shards`): each tensor's dtype and shape come from the
    unit's spill or the checkpoint's header (floating point in the model's dtype). A tensor tied to
    another (the head to the embeddings) is written once.
    """
    stream = stream_of(model)
    assert stream is not None
    tied = set(_tied_keys(model))
    plan: list[Planned] = []  # in file order
    done: set[str] = set()
    for unit in stream.units():
        spill = read_header(stream.spills[unit]) if unit in stream.spills else {}
        for k, slot in _slots(model.get_submodule(unit), unit).items():
            if k in tied or k in done:
                continue
            done.add(k)
            if k in spill:
                dtype, shape = DTYPES[spill[k]["dtype"]], spill[k]["shape"]
            elif (
                k in stream.stacks
            ):  # experts stacked from the checkpoint's one-by-one tensors: as the model holds them
                dtype, shape = slot.get().dtype, list(slot.get().shape)  # type: ignore[union-attr]
            else:
                entry = stream.source.entry(stream._source_key(k))
                dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
                want = slot.get()
                if want is not None and want.is_floating_point() and dtype.is_floating_point:
                    dtype = want.dtype
            n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            plan.append((unit, k, dtype, list(shape), n))

    # as save_pretrained writes them, unit by unit (a block's experts split one by one, renamed)
    saved: list[Planned] = []
    for unit in dict.fromkeys(u for u, *_ in plan):
        meta = {k: torch.empty(s, dtype=d, device="meta") for u, k, d, s, _ in plan if u == unit}
        for k, t in as_saved(model, meta).items():
            saved.append((unit, k, t.dtype, list(t.shape), t.numel() * t.element_size()))

    def read(unit: str, keys: list[str]) -> dict[str, Tensor]:
        slots = _slots(model.get_submodule(unit), unit)
        mine = {k: slots[k] for u, k, *_ in plan if u == unit}
        out = as_saved(model, stream._read(unit, mine))
        return {k: out[k] for k in keys}

    write_shards(out_dir, saved, read, max_shard_bytes)


def save_streamed_dir(
    model: nn.Module, tokenizer: Any, out: Path, meta: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """`lmpress.io.save` for a streamed model: its shards are written unit by unit from the
    checkpoint and the stages' spills (`save_streamed`), never the whole state dict at once."""
    stream = stream_of(model)
    assert stream is not None
    with atomic_dir(out, overwrite) as tmp, phase(f"saving {out}"):
        save_streamed(model, tmp)
        formats = module_formats(model, stream.described)
        save_companions(model, tokenizer, tmp)
        hide_from_plain_loaders(tmp, formats)
        record = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "modules": formats,
            **(meta or {}),
            "versions": library_versions(),
            "bytes_on_disk": weight_bytes(tmp),
        }
        write_json_atomic(tmp / META_FILE, record)
    return out
