"""How each linear layer of an lmpress model becomes ONNX nodes, and the norms around them.

Every layer is written as lmpress computes with it:

- `QuantLinear` of 4 or 8 bits in groups of a power of two from 16 up (or per channel) becomes ONNX
  Runtime's ``MatMulNBits`` (com.microsoft) holding lmpress's own codes, scales and zero points: the
  codes are already in its layout (two 4-bit codes per byte, low nibble first; one row per output);
  a per-channel layer repeats its one scale over blocks of 128 (or fewer), which is exact; a width
  that is not a multiple of the block is padded with codes the activations never meet;
- W8A8 layers quantize each token's activations to int8 on lmpress's grid (max/127, round half to
  even) and multiply in int32 with ``MatMulInteger``, then rescale: the same arithmetic as lmpress;
- dense layers as ``MatMul``, and the embeddings, with their weights stored in the model's own
  dtype (bf16/fp16/fp32: the file is no larger than lmpress's) behind a ``Cast`` to float32 that
  ONNX Runtime folds once at load (an exact upcast);
- with ``densify``, sparse, low-rank and codebook layers as the dense weights they compute with (a
  quantized sparse layer stays ``MatMulNBits``, its pruned weights codes that decode to 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmpress.arch import Adapter
from lmpress.errors import ExportError
from lmpress.export.onnx_graph import Graph, to_numpy
from lmpress.formats.packing import pack
from lmpress.nn.quant_linear import QuantLinear


def _pow2_block(n: int) -> int:
    """The largest power of two from 16 to 128 that divides ``n`` (exact per-channel blocks), else 128."""
    for b in (128, 64, 32, 16):
        if n % b == 0:
            return b
    return 128


def _nbits_tensors(codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, block: int) -> tuple[Any, ...]:
    """MatMulNBits' B (N, blocks, blob), scales (N*blocks) and zero points of unsigned ``codes``
    (N, K) with per-block ``scales`` / ``zeros`` (N, blocks)."""
    N, K = codes.shape
    n_blocks = -(-K // block)
    if n_blocks * block != K:  # padded codes multiply activations that do not exist
        codes = torch.nn.functional.pad(codes, (0, n_blocks * block - K))
    B = pack(codes, bits).view(N, n_blocks, block * bits // 8)
    s = scales.float().reshape(N * n_blocks)
    z = None
    if zeros is not None:
        zq = zeros.round().to(torch.uint8)
        # 4-bit zero points two per byte, each row's ceil(blocks / 2) bytes (lmpress pads runs of 8)
        z = pack(zq, 4)[:, : -(-n_blocks // 2)].reshape(-1) if bits == 4 else zq.reshape(-1)
    return to_numpy(B), to_numpy(s), None if z is None else to_numpy(z)


def _quant_view(m: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, int, int | None, bool] | None:
    if isinstance(m, QuantLinear):
        return m.codes(), m.scales, None if m.symmetric else m.zeros(), m.bits, m.group_size, m.symmetric
    if type(m).__name__ == "SparseLinear" and getattr(m, "bits", None) is not None:
        codes, zeros = m.dense_codes()  # type: ignore[operator]
        return codes, m.scales, zeros, m.bits, m.group_size, m.symmetric  # type: ignore[return-value]
    return None


def check_linear(name: str, m: nn.Module, densify: bool) -> None:
    """Refuse a layer with no exact ONNX form, naming what would export."""
    kind = type(m).__name__
    if isinstance(m, QuantLinear):
        if m.float_zeros:
            raise ExportError(
                f"{name}: fractional zero points (hqq) have no MatMulNBits form; quantize with rtn, gptq or awq"
            )
        if m.act_bits:
            return
        if m.bits not in (4, 8):
            raise ExportError(
                f"{name}: {m.bits}-bit codes have no MatMulNBits form here (4 and 8 bits); quantize with bits: 4 "
                "or export to gguf"
            )
        g = m.group_size
        if g is not None and (g < 16 or g & (g - 1)):
            raise ExportError(
                f"{name}: MatMulNBits blocks are powers of two from 16; groups of {g} are not; "
                "quantize with group_size: 32, 64 or 128"
            )
        return
    if kind == "SparseLinear":
        if densify:
            return
        raise ExportError(
            f"{name}: ONNX Runtime has no sparse MatMul for this layout; pass --densify to write the kept weights "
            "densely (quantized sparse layers stay MatMulNBits, pruned weights as exact zero codes)"
        )
    if kind in ("LowRankLinear", "CodebookLinear"):
        if densify:
            return
        what = {"LowRankLinear": "low-rank", "CodebookLinear": "codebook"}[kind]
        raise ExportError(f"{name}: {what} layers have no ONNX form here; pass --densify to write them dense")
    if kind == "GGUFLinear":
        raise ExportError(f"{name}: GGUF block types (grid: ...) have no ONNX form; export to gguf")
    if kind == "LoRALinear":
        raise ExportError(f"{name}: LoRA adapters have no ONNX form; train with codes: train instead of lora_rank")
    if not (isinstance(m, nn.Linear) or hasattr(m, "nf")):  # nn.Linear or GPT-2's Conv1D
        raise ExportError(f"{name}: {kind} layers cannot be exported to onnx")


class LayerBuilder:
    """The graph's layers: each linear layer as the op it becomes (recorded in ``formats``), and the norms."""

    def __init__(self, model: Any, densify: bool, data: Any = None) -> None:
        self.g = Graph(data)
        self.model: Any = model
        self.adapter = Adapter(model)
        self.densify = densify
        self.formats: dict[str, str] = {}
        self.densified: list[str] = []
        self.seen: dict[int, str] = {}

    def linear(self, x: str, name: str) -> str:
        m = self.model.get_submodule(name)
        if id(m) in self.seen:
            raise ExportError(f"{name} is shared with {self.seen[id(m)]} (share); choose a recipe without share")
        self.seen[id(m)] = name
        check_linear(name, m, self.densify)
        g = self.g
        q = _quant_view(m)
        bias = getattr(m, "bias", None)
        if isinstance(m, QuantLinear) and m.act_bits:
            y = self._w8a8(x, m, name)
        elif q is not None:
            codes, scales, zeros, bits, group, _ = q
            N, K = codes.shape
            block = group or _pow2_block(K)
            if group is None:  # one scale per row, repeated over its blocks
                n_blocks = -(-K // block)
                scales = scales.reshape(N, 1).expand(N, n_blocks)
                zeros = None if zeros is None else zeros.reshape(N, 1).expand(N, n_blocks)
            B, s, z = _nbits_tensors(codes, scales, zeros, bits, block)
            inputs = [x, g.init(f"{name}.qweight", B), g.init(f"{name}.scales", s)]
            if z is not None:
                inputs.append(g.init(f"{name}.zeros", z))
            y = g.op(
                "MatMulNBits", inputs, domain="com.microsoft", K=K, N=N, bits=bits, block_size=block, accuracy_level=0
            )
            self.formats[name] = f"MatMulNBits w{bits} " + (f"g{group}" if group else "channel")
            if type(m).__name__ == "SparseLinear":
                self.densified.append(name)
        else:
            w = self._dense_weight(m, name)  # (out, in)
            y = g.op("MatMul", [x, g.weight(f"{name}.weight_t", w.T)])
            self.formats[name] = "MatMul"
        if isinstance(bias, Tensor):
            y = g.op("Add", [y, g.init(f"{name}.bias", to_numpy(bias.float()))])
        return y

    def _dense_weight(self, m: nn.Module, name: str) -> Tensor:
        fn = getattr(m, "dense_weight", None)
        if callable(fn):
            self.densified.append(name)
            return fn()  # type: ignore[no-any-return]
        w = m.weight
        assert isinstance(w, Tensor)
        return w.T if hasattr(m, "nf") else w  # Conv1D stores (in, out)

    def _w8a8(self, x: str, m: QuantLinear, name: str) -> str:
        """lmpress's int8 x int8: per-token max/127 scales, round half to even, int32 products."""
        g = self.g
        amax = g.op("ReduceMax", [g.op("Abs", [x])], axes=[-1], keepdims=1)
        s_x = g.op("Max", [g.op("Div", [amax, g.const(127.0, np.float32)]), g.const(1e-8, np.float32)])
        xq = g.op("Round", [g.op("Div", [x, s_x])])
        xq = g.op("Clip", [xq, g.const(-127.0, np.float32), g.const(127.0, np.float32)])
        xq = g.op("Cast", [xq], to=self.g.onnx.TensorProto.INT8)
        wT = g.init(f"{name}.qweight_t", to_numpy(m.qweight.view(torch.int8).T))
        acc = g.op("Cast", [g.op("MatMulInteger", [xq, wT])], to=self.g.onnx.TensorProto.FLOAT)
        s_w = g.init(f"{name}.scales", to_numpy(m.scales.float().view(-1)))
        self.formats[name] = "MatMulInteger w8a8"
        return g.op("Mul", [g.op("Mul", [acc, s_x]), s_w])

    def norm(self, x: str, norm: Any, name: str, kind: str) -> str:
        """The norm at ``name`` of ``kind`` (its spec's `NormKind`) over the last axis of ``x``."""
        if kind == "layernorm":
            return self.layer_norm(x, norm, name)
        if kind in ("rmsnorm", "rmsnorm_1p"):
            return self.rms_norm(x, norm, name, one_plus=kind == "rmsnorm_1p")
        raise ExportError(f"{name}: a {kind} norm is not in lmpress's ONNX graph; export GGUF instead")

    def rms_norm(self, x: str, norm: Any, name: str, one_plus: bool = False) -> str:
        """x / rms(x) * w, or * (1 + w) (Gemma: the sum in float32, as transformers computes it)."""
        g = self.g
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        w = norm.weight.float()
        w = 1.0 + w if one_plus else w
        var = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), g.init(f"{name}.weight", to_numpy(w))])

    def layer_norm(self, x: str, norm: Any, name: str) -> str:
        """LayerNorm, or StableLM's one LayerNorm per head (a ``norms`` list; x: (B, H, S, D)),
        written as one LayerNormalization and the heads' weights stacked (H, 1, D)."""
        g = self.g
        if isinstance(getattr(norm, "norms", None), nn.ModuleList):
            first = norm.norms[0]
            if any(getattr(n, "bias", None) is not None for n in norm.norms):
                raise ExportError(f"{name}: per-head LayerNorms with biases are not in lmpress's ONNX graph")
            ones = g.init(f"{name}.ones", np.ones(first.weight.shape[0], np.float32))
            y = g.op("LayerNormalization", [x, ones], axis=-1, epsilon=float(first.eps))
            stacked = torch.stack([n.weight.float() for n in norm.norms])[:, None, :]  # (H, 1, D)
            return g.op("Mul", [y, g.init(f"{name}.weight", to_numpy(stacked))])
        inputs = [x, g.init(f"{name}.weight", to_numpy(norm.weight.float()))]
        if getattr(norm, "bias", None) is not None:
            inputs.append(g.init(f"{name}.bias", to_numpy(norm.bias.float())))
        return g.op("LayerNormalization", inputs, axis=-1, epsilon=float(norm.eps))
