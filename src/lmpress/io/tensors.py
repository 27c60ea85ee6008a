"""Safetensors files read tensor by tensor and written shard by shard, never a whole state dict at once.

A file's header gives each tensor's dtype, shape and byte offsets; `read_tensor` reads one tensor
into its own memory; `Checkpoint` finds each tensor of a model directory's shards by key, every
shard checked complete before anything is read; `write_shards` writes planned tensors into
``model.safetensors`` (or numbered shards with the index transformers reads), reading them one
unit at a time. `parameters_on_meta` builds an architecture whose parameters take no memory, for
the tensors to be assigned from the files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmpress.errors import ModelLoadError
from lmpress.io.files import check_safetensors

INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


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


class Checkpoint:
    """The tensors of a model directory's safetensors files, by key, read on demand (memory-mapped).

    Every shard the index names must exist and be complete (its header matches its size) before
    anything is read, so a missing or truncated shard fails up front, not halfway.
    """

    def __init__(self, path: Path) -> None:
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

    def entry(self, key: str) -> dict[str, Any]:
        """``key``'s header entry: its dtype (a safetensors name), shape and offsets."""
        return self.headers[self.where[key]][key]


Planned = tuple[str, str, torch.dtype, list[int], int]  # (unit, key, dtype, shape, bytes) of one tensor to write


def write_shards(
    out_dir: Path,
    plan: list[Planned],
    read: Callable[[str, list[str]], dict[str, Tensor]],
    max_shard_bytes: int = 2 * 2**30,
) -> None:
    """Write the tensors of ``plan`` (in its order) into ``out_dir``: each shard's header is written
    from the plan, then its tensors, read unit by unit with ``read(unit, keys)``.

    One shard is ``model.safetensors``; more are ``model-0000k-of-0000n.safetensors`` with the index
    transformers reads.
    """
    names = {v: k for k, v in DTYPES.items()}
    shards: list[list[Planned]] = [[]]
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
                values = read(unit, [k for _, k, *_ in mine])
                for _, k, dtype, _, n in mine:
                    t = values.pop(k).to(dtype).contiguous().view(-1).view(torch.uint8)
                    assert t.numel() == n, k
                    f.write(memoryview(t.numpy()))  # type: ignore[arg-type]
    if n_shards > 1:
        total = sum(item[4] for item in plan)
        (out_dir / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
