"""The ONNX graph under construction: nodes and initializers with unique names, and the small
op patterns the decoder graphs share (rotary rotation, the causal mask, tanh-GELU).

Large initializers go straight to the external data file when one is open (`Graph.init`), small
ones stay inside the graph; 16-bit weights keep their dtype on disk behind a ``Cast`` to float32.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmpress.errors import ExportError

INSTALL_HINT = "pip install 'lmpress[onnx]'"
DATA_FILE = "model.onnx.data"
INLINE_BYTES = 1024  # smaller tensors (constants, norms) stay in the graph
NEG = -3.0e38


def onnx_package() -> Any:
    try:
        import onnx
    except ImportError:
        raise ExportError(f"onnx export needs the onnx package: {INSTALL_HINT}") from None
    return onnx


def to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class Graph:
    """Nodes and initializers, with unique names."""

    def __init__(self, data: Any = None) -> None:
        self.onnx = onnx_package()
        self.data = data  # an open DATA_FILE, or None: every tensor inside the graph
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0
        self.consts: dict[tuple[Any, ...], str] = {}

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, domain: str = "", **attrs: Any) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], n_out: int, **attrs: Any) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outs, **attrs))
        return outs

    def init(self, hint: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        return self._add(hint, self.onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape), array)

    def _add(self, hint: str, data_type: int, dims: list[int], array: np.ndarray) -> str:
        """An initializer of ``array``'s bytes (little-endian, as ONNX stores them). A large one goes
        straight from the array to the external data file (64-byte aligned), never through the
        graph: protobuf frees a message's bytes only with the whole graph."""
        name = self.name(hint)
        tensor = self.onnx.TensorProto(name=name, data_type=data_type, dims=dims)
        if self.data is not None and array.nbytes > INLINE_BYTES:
            self.data.write(b"\0" * (-self.data.tell() % 64))
            offset = self.data.tell()
            self.data.write(array.reshape(-1).view(np.uint8).data)
            tensor.data_location = self.onnx.TensorProto.EXTERNAL
            for key, value in (("location", DATA_FILE), ("offset", offset), ("length", array.nbytes)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
        else:
            tensor.raw_data = array.tobytes()
        self.inits.append(tensor)
        return name

    def stored(self, hint: str, t: Tensor) -> str:
        """An initializer in ``t``'s own dtype (float32, bfloat16 or float16): no bytes added on disk."""
        t = t.detach().cpu().contiguous()
        kinds = {torch.bfloat16: self.onnx.TensorProto.BFLOAT16, torch.float16: self.onnx.TensorProto.FLOAT16}
        if t.dtype not in kinds:
            return self.init(hint, to_numpy(t.float()))
        return self._add(hint, kinds[t.dtype], list(t.shape), t.view(torch.int16).numpy())

    def to_float(self, name: str, t: Tensor) -> str:
        """``name`` (stored from ``t``) as float32: a Cast that ONNX Runtime folds once at load."""
        return name if t.dtype == torch.float32 else self.op("Cast", [name], to=self.onnx.TensorProto.FLOAT)

    def weight(self, hint: str, t: Tensor) -> str:
        """A float32 weight kept on disk in its own 16-bit dtype when it has one (exact upcast)."""
        return self.to_float(self.stored(hint, t), t)

    def const(self, values: list[int] | list[float] | float | int, dtype: Any = np.int64) -> str:
        key = (json.dumps(values), np.dtype(dtype).str)
        if key not in self.consts:
            self.consts[key] = self.init("const", np.array(values, dtype=dtype))
        return self.consts[key]


# ---- op patterns -----------------------------------------------------------------------------------


def rotate(g: Graph, x: str, rope: tuple[str, str], dim: int, rot: int | None = None) -> str:
    """x * cos + rotate_half(x) * sin, as transformers' Llama, over the first ``rot`` of the ``dim``
    channels of each head (partial rotary: the rest pass through). x: (B, H, S, dim)."""
    cos, sin = rope
    rot = rot or dim
    if rot < dim:
        x, rest = g.ops("Split", [x, g.const([rot, dim - rot])], 2, axis=-1)
    x1, x2 = g.ops("Split", [x, g.const([rot // 2, rot // 2])], 2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    out = g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])
    return out if rot == dim else g.op("Concat", [out, rest], axis=-1)


def causal_mask(g: Graph, window: int | None = None) -> str:
    """(B, 1, S, T) additive mask: causal over the cache and the new tokens, and attention_mask's
    padding; with a ``window``, a key also lies fewer than ``window`` places before its query (as
    transformers' sliding_window_overlay: kv > q - window)."""
    T = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
    S = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)
    past = g.op("Sub", [T, S])
    keys = g.op("Range", [g.const(0), T, g.const(1)])  # (T,)
    queries = g.op("Unsqueeze", [g.op("Range", [past, T, g.const(1)]), g.const([1])])  # (S, 1)
    causal = g.op("LessOrEqual", [keys, queries])  # (S, T)
    if window is not None:
        near = g.op("Greater", [keys, g.op("Sub", [queries, g.const(window)])])  # (S, T)
        causal = g.op("And", [causal, near])
    keep = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const([1, 2])])], to=g.onnx.TensorProto.BOOL)
    allowed = g.op("And", [g.op("Unsqueeze", [causal, g.const([0, 1])]), keep])  # (B, 1, S, T)
    return g.op("Where", [allowed, g.const(0.0, np.float32), g.const(NEG, np.float32)])


def soft_cap(g: Graph, x: str, cap: float) -> str:
    """cap * tanh(x / cap) (Gemma 2's soft-capping of attention scores and logits)."""
    capped = g.op("Tanh", [g.op("Div", [x, g.const(cap, np.float32)])])
    return g.op("Mul", [capped, g.const(cap, np.float32)])


def gelu_tanh(g: Graph, x: str) -> str:
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [cube, g.const(0.044715, np.float32)])]),
                         g.const(math.sqrt(2.0 / math.pi), np.float32)])  # fmt: skip
    return g.op(
        "Mul",
        [g.op("Mul", [x, g.const(0.5, np.float32)]), g.op("Add", [g.op("Tanh", [inner]), g.const(1.0, np.float32)])],
    )


def gelu_erf(g: Graph, x: str) -> str:
    """The exact GELU: 0.5 x (1 + erf(x / sqrt(2)))."""
    erf = g.op("Erf", [g.op("Mul", [x, g.const(1.0 / math.sqrt(2.0), np.float32)])])
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5, np.float32)]), g.op("Add", [erf, g.const(1.0, np.float32)])])


def silu(g: Graph, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


# transformers' activation modules (ACT2CLS) -> the nodes computing them
ACTIVATIONS = {
    "SiLUActivation": silu,
    "SiLU": silu,
    "GELUTanh": gelu_tanh,
    "NewGELUActivation": gelu_tanh,
    "GELUActivation": gelu_erf,
    "GELU": gelu_erf,
}
