"""The files of a Hugging Face checkpoint directory an export writes: ``model.safetensors`` (or
shards with the index transformers reads), the edits to ``config.json`` after the companions are
saved, and the check that the tensors fit the model transformers builds from that config."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import torch
from torch import Tensor, nn

from lmpress.arch import auto_class
from lmpress.errors import ExportError
from lmpress.io.load import _tied_keys as tied_keys

__all__ = ["MAX_SHARD_BYTES", "check_init", "check_shapes", "dequantize_on_load", "set_dtype", "write_shards"]

MAX_SHARD_BYTES = 2 * 2**30


def check_shapes(model: nn.Module, tensors: dict[str, Tensor], schemes: Collection[str]) -> None:
    """The tensors fit the model transformers builds from the config (per-block widths, for
    example, do not): refuse before writing, naming the first module that does not fit.
    ``schemes``: the quantized modules (their shape is ``weight_shape``)."""
    with torch.device("meta"):
        skeleton = auto_class(model.config).from_config(model.config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = set(tied_keys(skeleton))
    for key, shape in expected.items():
        module = key.rsplit(".", 1)[0]
        if module in schemes and key.endswith(".weight"):
            got = (
                tuple(int(x) for x in tensors[f"{module}.weight_shape"])
                if f"{module}.weight_shape" in tensors
                else (tuple(tensors[key].shape) if key in tensors else None)
            )
        elif key in tied:
            continue
        else:
            got = tuple(tensors[key].shape) if key in tensors else None
        if got is None:
            raise ExportError(f"{key}: the config's model has this tensor but lmpress's lacks it; cannot export")
        if got != shape:
            raise ExportError(
                f"{module} is {'x'.join(map(str, got))} but the config says {'x'.join(map(str, shape))} "
                "(structured with uniform: false?); Hugging Face configs need the same widths in every block: "
                "prune with uniform: true"
            )


def check_init(model: nn.Module, schemes: Collection[str]) -> None:
    """transformers loads the checkpoint: its quantized layers hold ``weight_packed``, not ``weight``,
    and some families' weight initialisation (run over every module after loading) reads
    ``weight`` regardless (Falcon's ``FalconLinear``, GPT-BigCode's ``c_proj``). Run that
    initialisation on a skeleton whose quantized layers lack ``weight``: refuse before writing."""
    with torch.device("meta"):
        skeleton = auto_class(model.config).from_config(model.config)
    for name in schemes:
        skeleton.get_submodule(name)._parameters.pop("weight", None)
    try:
        skeleton.initialize_weights()
    except AttributeError as e:
        raise ExportError(
            f"{type(skeleton).__name__}: transformers cannot load its quantized layers as compressed-tensors "
            f"({e} in its weight initialisation); export to gguf or onnx"
        ) from None


def dequantize_on_load(config_file: Path) -> None:
    """Ask transformers to decode asymmetric layers while loading: its compressed route builds
    unpacked zero points that compressed-tensors 0.20 then cannot unpack (the checkpoint holds them
    packed, as llm-compressor writes them and vLLM reads them); vLLM ignores the key."""
    data = json.loads(config_file.read_text())
    data["quantization_config"]["dequantize"] = True
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def set_dtype(config_file: Path, dtype: torch.dtype) -> None:
    data = json.loads(config_file.read_text())
    data["dtype"] = str(dtype).removeprefix("torch.")
    data.pop("torch_dtype", None)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_shards(tensors: dict[str, Tensor], out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards with the index
    transformers reads when the tensors pass ``max_shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if size and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for j, shard in enumerate(shards, 1):
        name = f"model-{j:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
