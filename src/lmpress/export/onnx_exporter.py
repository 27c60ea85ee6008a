"""The ONNX format as an `Exporter`: a directory with a decoder graph and its KV cache for ONNX
Runtime (`lmpress.export.onnx` writes it, `lmpress.export.onnx_runtime` runs it back for
evaluation, `read_onnx` reads its initializers for ``lmpress inspect``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmpress.errors import ModelLoadError
from lmpress.export.base import Contents, Exporter, ExportOptions, runtime_missing
from lmpress.export.onnx import GRAPH_FILE, OnnxReport, export_onnx
from lmpress.io import LoadedModel, load_tokenizer, resolve_path, weight_bytes

__all__ = ["EXPORTER", "OnnxExporter", "read_onnx"]

_NO_ORT = "running an ONNX directory needs ONNX Runtime: pip install 'lmpress[onnx]'"
_ONNX_FLOATS = {"float": "float32", "float16": "float16", "bfloat16": "bfloat16", "double": "float64"}


class OnnxExporter(Exporter):
    name = "onnx"
    help = "ONNX Runtime"
    artifact = "ONNX directory"
    file_suffixes = (".onnx",)
    package = ("onnx", "onnx")
    runtime = "ONNX Runtime"

    def write(self, model: nn.Module, tokenizer: Any, path: Path, options: ExportOptions) -> OnnxReport:
        return export_onnx(model, tokenizer, path, densify=options.densify, overwrite=options.overwrite)

    def recognizes(self, source: str | Path) -> bool:
        """A directory holding the graph lmpress writes."""
        path = Path(source).expanduser()
        return path.is_dir() and (path / GRAPH_FILE).is_file()

    def load_back(self, path: Path, tokenizer: str | Path | None = None) -> LoadedModel:
        """ONNX Runtime runs the graph; the tokenizer is the one saved beside it (or ``tokenizer``'s)."""
        tok_path = resolve_path(tokenizer) if tokenizer is not None else path
        try:
            from lmpress.export.onnx_runtime import OnnxModel
        except ModuleNotFoundError as e:
            raise runtime_missing(e, "onnxruntime", _NO_ORT) from None
        return LoadedModel(OnnxModel(path).eval(), load_tokenizer(tok_path), str(path), path)

    def contents(self, path: Path) -> Contents:
        return read_onnx(path)


def _onnx_graph(onnx: Any, file: Path) -> Any:
    """The graph of ``file`` (its external data left on disk); one line when it is not one."""
    try:
        model = onnx.load(str(file), load_external_data=False)
    except OSError as e:
        raise ModelLoadError(f"cannot read {file} ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # protobuf's DecodeError, onnx's own errors: the bytes are not a ModelProto
        reason = (str(e) or type(e).__name__).splitlines()[0][:120]
        raise ModelLoadError(
            f"{file} is not a valid ONNX graph ({reason}); re-export it with lmpress export --to onnx"
        ) from None
    if not model.graph.node:  # an empty file parses as an empty ModelProto
        raise ModelLoadError(
            f"{file} is not a valid ONNX graph (it holds no nodes); re-export it with lmpress export --to onnx"
        )
    return model.graph


def read_onnx(path: Path) -> Contents:
    """An ONNX directory's initializers by the operator that uses them (``MatMulNBits``,
    ``MatMulInteger``; the rest dense weights or graph constants); its architecture is the
    ``config.json`` beside the graph."""
    try:
        import onnx
    except ImportError:
        raise ModelLoadError("reading an ONNX graph needs the onnx package: pip install 'lmpress[onnx]'") from None
    graph = _onnx_graph(onnx, path / GRAPH_FILE)
    sizes = {}
    for init in graph.initializer:
        external = {e.key: e.value for e in init.external_data}
        nbytes = int(external["length"]) if "length" in external else len(init.raw_data)
        numel = 1
        for d in init.dims:
            numel *= int(d)
        sizes[init.name] = (nbytes, numel, onnx.TensorProto.DataType.Name(init.data_type).lower())
    modules: list[tuple[str, int, int, int]] = []
    used: set[str] = set()
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            name = f"MatMulNBits int{attrs.get('bits', 4)} b{attrs.get('block_size')}"
            weights = int(attrs["K"]) * int(attrs["N"])
        elif node.op_type == "MatMulInteger":
            name, weights = "MatMulInteger int8", None
        else:
            continue
        inputs = [i for i in node.input if i in sizes and i not in used]
        used.update(inputs)
        n = weights if weights is not None else max((sizes[i][1] for i in inputs), default=0)
        modules.append((name, n, n, sum(sizes[i][0] for i in inputs)))
    for init, (nbytes, numel, dtype) in sizes.items():
        if init in used:
            continue
        weight = dtype in _ONNX_FLOATS and numel > 1  # not a scalar or a shape: a model's weight
        label = f"dense {_ONNX_FLOATS[dtype]}" if weight else "graph constants"
        modules.append((label, numel if weight else 0, numel if weight else 0, nbytes))
    return Contents(modules, weight_bytes(path))


EXPORTER = OnnxExporter()
