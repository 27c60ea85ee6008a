"""Models bigger than memory: the tensors stay on disk, one unit (a block, the embeddings) at a time in memory.

A streamed model is the architecture built on the meta device (no weights allocated; small
non-persistent buffers such as rotary frequencies are real) plus a `Stream`, which reads a unit's
tensors from the checkpoint's safetensors files (memory-mapped, shard by shard) when the calibration
driver or a stage reaches it and, when the work on it is done, writes what the unit now holds
(compressed layers included) to a spill file of its own and puts the unit back on the meta device.
A later stage reads the unit from its spill; saving publishes the spills as the output's shards.
Post-training stages (those whose method says ``streams``) work unchanged on a streamed model as long
as they touch a block's tensors only inside `lmpress.calib.blockwise` or `each_block`, and tensors
outside the blocks only inside `resident`; both are plain loops on a model held whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmpress.errors import ModelLoadError
from lmpress.memory import trim_heap, tune_malloc

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (buffers stay real: rotary
    frequencies and masks are computed in ``__init__`` and never saved). A parameter is allocated
    uninitialized and dropped at once, so no memory is touched."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and not param.is_meta:  # a meta one is already shared (tied): keep it
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class Checkpoint:
    """The tensors of a model directory's safetensors files, by key, read on demand (memory-mapped).

    Every shard the index names must exist and be complete (its header matches its size) before
    anything is read, so a missing or truncated shard fails up front, not halfway.
    """

    def __init__(self, path: Path) -> None:
        from lmpress.io.files import check_safetensors

        self.path = path
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise ModelLoadError(f"{index} is not a valid safetensors index; re-save the model") from None
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise ModelLoadError(f"{path}: shard {shard} named in {INDEX_FILE} is missing; restore it")
            files = sorted({path / s for s in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{path} has no weights (*.safetensors); give a complete model directory")
        self.where: dict[str, Path] = {}
        self.headers: dict[Path, dict[str, Any]] = {}
        for f in files:
            check_safetensors(f)
            self.headers[f] = read_header(f)
            for k in self.headers[f]:
                if k != "__metadata__":
                    self.where[k] = f

    def keys(self) -> Iterable[str]:
        return self.where.keys()

    def tensor(self, key: str) -> Tensor:
        f = self.where[key]
        return read_tensor(f, self.headers[f], key)


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_header(file: Path) -> dict[str, Any]:
    """A safetensors file's header, with each entry's absolute byte offsets under ``"start"``/``"end"``."""
    with file.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header: dict[str, Any] = json.loads(f.read(n))
    for k, v in header.items():
        if k != "__metadata__":
            v["start"], v["end"] = 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]
    return header


def read_tensor(file: Path, header: dict[str, Any], key: str) -> Tensor:
    """One tensor, read into its own memory (not memory-mapped: mapped pages would count in the
    process's resident memory long after the tensor is gone)."""
    entry = header[key]
    if entry["dtype"] not in DTYPES:
        raise ModelLoadError(f"{file}: tensor {key} has dtype {entry['dtype']}, which lmpress does not read")
    buf = torch.empty(entry["end"] - entry["start"], dtype=torch.uint8)
    with file.open("rb", buffering=0) as f:
        f.seek(entry["start"])
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise ModelLoadError(f"{file} is truncated (tensor {key}); re-save or re-download it")
            got += n
    return buf.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


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
        from safetensors.torch import save_file

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
        from lmpress.arch import Adapter

        adapter = Adapter(self.model)
        blocks = [adapter.block_name(i) for i in range(adapter.num_blocks)]
        head, _ = adapter.head()
        return [*adapter.embeddings(), *blocks, adapter.final_norm()[0], head]


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
    from lmpress.arch import Adapter

    adapter = Adapter(model)
    return [*adapter.embeddings(), adapter.final_norm()[0], adapter.head()[0]]


def each_block(model: nn.Module, progress: bool = False, label: str = "blocks") -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, block) with the block in memory; a streamed block is saved when the caller
    moves on (the caller may change it)."""
    from lmpress.arch import Adapter
    from lmpress.progress import track

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
    from transformers import AutoConfig, AutoModelForCausalLM

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
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped at construction while both sides are on meta
    model.eval()
    spill = Path(tempfile.mkdtemp(prefix="lmpress-stream-", dir=work))
    stream = Stream(model, source, spill, device or torch.device("cpu"))
    stream.renames = _renames(model, set(source.keys()))
    first: dict[int, str] = {}
    for k, slot in _slots(model, "").items():  # state-dict order: the embeddings before a tied head
        t = slot.get()
        if id(t) in first:
            stream.aliases[k] = first[id(t)]
        first.setdefault(id(t), k)
    object.__setattr__(model, "_lmpress_stream", stream)
    missing = [k for k in _slots(model, "") if stream._source_key(k) not in source.where]
    if missing:
        close(model)
        raise ModelLoadError(f"{path}: tensor {missing[0]} is missing from the weights; restore the model's files")
    return model


def _renames(model: nn.Module, ckpt: set[str]) -> dict[str, str]:
    """Model key -> checkpoint key where a checkpoint names tensors differently (a checkpoint saved
    without the base model's prefix, or renamed the way ``save_pretrained`` renames)."""
    own = _slots(model, "")
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for k in own:
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
    memory at a time: each shard's header is planned from the units' headers (spill or checkpoint)
    and the model's dtypes, then the tensors are read and written unit by unit.

    One shard is ``model.safetensors``; more are ``model-0000k-of-0000n.safetensors`` with the index
    transformers reads. A tensor tied to another (the head to the embeddings) is written once.
    """
    from lmpress.io.load import _tied_keys

    stream = stream_of(model)
    assert stream is not None
    tied = set(_tied_keys(model))
    names = {v: k for k, v in DTYPES.items()}
    # plan: (unit, key, dtype, shape, nbytes) in file order
    plan: list[tuple[str, str, torch.dtype, list[int], int]] = []
    done: set[str] = set()
    for unit in stream.units():
        spill = read_header(stream.spills[unit]) if unit in stream.spills else {}
        for k, slot in _slots(model.get_submodule(unit), unit).items():
            if k in tied or k in done:
                continue
            done.add(k)
            if k in spill:
                dtype, shape = DTYPES[spill[k]["dtype"]], spill[k]["shape"]
            else:
                src = stream._source_key(k)
                entry = stream.source.headers[stream.source.where[src]][src]
                dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
                want = slot.get()
                if want is not None and want.is_floating_point() and dtype.is_floating_point:
                    dtype = want.dtype
            n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            plan.append((unit, k, dtype, list(shape), n))
    shards: list[list[tuple[str, str, torch.dtype, list[int], int]]] = [[]]
    size = 0
    for item in plan:
        if size and size + item[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[4]
    n_shards = len(shards)
    weight_map = {}
    for j, shard in enumerate(shards, 1):
        name = "model.safetensors" if n_shards == 1 else f"model-{j:05d}-of-{n_shards:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for _, k, dtype, shape, n in shard:
            header[k] = {"dtype": names[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[k] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (out_dir / name).open("wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for unit in dict.fromkeys(u for u, *_ in shard):
                mine = [item for item in shard if item[0] == unit]
                slots = _slots(model.get_submodule(unit), unit)
                values = stream._read(unit, {k: slots[k] for _, k, *_ in mine})
                for _, k, dtype, _, n in mine:
                    t = values.pop(k).to(dtype).contiguous().view(-1).view(torch.uint8)
                    assert t.numel() == n, k
                    f.write(memoryview(t.numpy()))  # type: ignore[arg-type]
    if n_shards > 1:
        total = sum(item[4] for item in plan)
        (out_dir / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
