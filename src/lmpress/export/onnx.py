"""ONNX export: an lmpress model as a decoder graph with its KV cache, for ONNX Runtime.

The graph is built node by node (no tracing), in float32, with the inputs and outputs optimum's and
ONNX Runtime GenAI's decoder classes use: ``input_ids``, ``attention_mask`` (batch, past + new),
``position_ids`` and ``past_key_values.{i}.key|value`` (batch, kv heads, past, head dim) in;
``logits`` and ``present.{i}.key|value`` out. The tokenizer files and ``config.json`` lie beside
``model.onnx``.

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

Llama-family models (Llama, Mistral, Qwen2/3) and GPT-2.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmpress.arch import Adapter, is_supported, spec_for, supporting
from lmpress.errors import ExportError
from lmpress.evaluation import count_parameters
from lmpress.export.walk import count_types
from lmpress.formats.packing import pack
from lmpress.io import atomic_dir, save_companions
from lmpress.nn.quant_linear import QuantLinear

INSTALL_HINT = "pip install 'lmpress[onnx]'"
OPSET = 17
# protobuf's 2 GB limit: a model that could pass 1.5 GB keeps its weights beside the graph, written
# there as the graph is built (the graph never holds them in memory)
EXTERNAL_DATA_BYTES = 1_500_000_000
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PARAMETERS_KEY = "lmpress.parameters"  # metadata: the logical weights the graph computes with
INLINE_BYTES = 1024  # smaller tensors (constants, norms) stay in the graph
NEG = -3.0e38


@dataclass
class OnnxReport:
    """What an export wrote: the directory, its bytes, the op each linear layer became."""

    path: Path
    bytes: int
    formats: dict[str, str] = field(default_factory=dict)  # module -> "MatMulNBits w4 g128", "MatMul" ...
    densified: list[str] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        return count_types(self.formats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "onnx",
            "path": str(self.path),
            "bytes": self.bytes,
            "unit": "linear layers",
            "types": self.type_counts(),
            "modules": self.formats,
            "densified": self.densified,
        }


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ExportError(f"onnx export needs the onnx package: {INSTALL_HINT}") from None
    return onnx


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class _Graph:
    """Nodes and initializers, with unique names."""

    def __init__(self, data: Any = None) -> None:
        self.onnx = _onnx()
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
            return self.init(hint, _np(t.float()))
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


# ---- layers ---------------------------------------------------------------------------------------


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
    return _np(B), _np(s), None if z is None else _np(z)


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


class _Builder:
    def __init__(self, model: Any, densify: bool, data: Any = None) -> None:
        self.g = _Graph(data)
        self.model: Any = model
        self.adapter = Adapter(model)
        self.head_norms = False  # Qwen3: an RMSNorm over each query and key head
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
            y = g.op("Add", [y, g.init(f"{name}.bias", _np(bias.float()))])
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
        wT = g.init(f"{name}.qweight_t", _np(m.qweight.view(torch.int8).T))
        acc = g.op("Cast", [g.op("MatMulInteger", [xq, wT])], to=self.g.onnx.TensorProto.FLOAT)
        s_w = g.init(f"{name}.scales", _np(m.scales.float().view(-1)))
        self.formats[name] = "MatMulInteger w8a8"
        return g.op("Mul", [g.op("Mul", [acc, s_x]), s_w])

    def rms_norm(self, x: str, norm: Any, name: str) -> str:
        g = self.g
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        var = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
        return g.op("Mul", [g.op("Mul", [x, inv]), g.init(f"{name}.weight", _np(norm.weight.float()))])

    def layer_norm(self, x: str, norm: Any, name: str) -> str:
        g = self.g
        w, b = g.init(f"{name}.weight", _np(norm.weight.float())), g.init(f"{name}.bias", _np(norm.bias.float()))
        return g.op("LayerNormalization", [x, w, b], axis=-1, epsilon=float(norm.eps))


# ---- the decoder ----------------------------------------------------------------------------------


@dataclass
class _Dims:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int


def _dims(model: Any) -> _Dims:
    c = model.config
    heads = c.num_attention_heads
    hidden = c.hidden_size
    return _Dims(
        c.num_hidden_layers,
        heads,
        getattr(c, "num_key_value_heads", None) or heads,
        getattr(c, "head_dim", None) or hidden // heads,
        hidden,
        int(model.get_input_embeddings().weight.shape[0]),
    )


def _attention(
    b: _Builder, q: str, k: str, v: str, i: int, d: _Dims, mask: str, rope: tuple[str, str] | None
) -> tuple[str, str, str]:
    """Heads, rotary, the cache and masked softmax attention. q, k, v: (B, S, heads*dim) -> (B, S, heads*dim)."""
    g = b.g

    def heads(t: str, n: int) -> str:  # (B, S, n*D) -> (B, n, S, D)
        return g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, n, d.head_dim])])], perm=[0, 2, 1, 3])

    qh, kh, vh = heads(q, d.heads), heads(k, d.kv_heads), heads(v, d.kv_heads)
    if b.head_norms:
        a = b.adapter
        qh = b.rms_norm(qh, a.role(i, "attn_q_norm"), a.role_name(i, "attn_q_norm"))
        kh = b.rms_norm(kh, a.role(i, "attn_k_norm"), a.role_name(i, "attn_k_norm"))
    if rope is not None:
        qh, kh = _rotate(g, qh, rope, d.head_dim), _rotate(g, kh, rope, d.head_dim)
    past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    present_k = g.op("Concat", [past_k, kh], axis=2)
    present_v = g.op("Concat", [past_v, vh], axis=2)
    # grouped-query attention without copying the cache: the query heads of one kv head side by side
    rep = d.heads // d.kv_heads
    qg = g.op("Reshape", [qh, g.const([0, d.kv_heads, -1, d.head_dim])])  # (B, KV, rep*S, D)
    kT = g.op("Transpose", [present_k], perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [qg, kT])  # (B, KV, rep*S, T)
    scores = g.op("Mul", [scores, g.const(1.0 / math.sqrt(d.head_dim), np.float32)])
    scores = g.op("Reshape", [scores, g.const([0, d.heads, -1, 0])])  # (B, H, S, T)
    probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
    probs = g.op("Reshape", [probs, g.const([0, d.kv_heads, -1, 0])]) if rep > 1 else probs
    out = g.op("MatMul", [probs, present_v])  # (B, KV, rep*S, D)
    out = g.op("Reshape", [out, g.const([0, d.heads, -1, d.head_dim])]) if rep > 1 else out
    out = g.op("Reshape", [g.op("Transpose", [out], perm=[0, 2, 1, 3]), g.const([0, 0, d.heads * d.head_dim])])
    return out, present_k, present_v


def _rotate(g: _Graph, x: str, rope: tuple[str, str], dim: int) -> str:
    """x * cos + rotate_half(x) * sin, as transformers' Llama."""
    cos, sin = rope
    x1, x2 = g.ops("Split", [x, g.const([dim // 2, dim // 2])], 2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def _mask(g: _Graph) -> str:
    """(B, 1, S, T) additive mask: causal over the cache and the new tokens, and attention_mask's padding."""
    T = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
    S = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)
    past = g.op("Sub", [T, S])
    keys = g.op("Range", [g.const(0), T, g.const(1)])  # (T,)
    queries = g.op("Unsqueeze", [g.op("Range", [past, T, g.const(1)]), g.const([1])])  # (S, 1)
    causal = g.op("LessOrEqual", [keys, queries])  # (S, T)
    keep = g.op("Cast", [g.op("Unsqueeze", ["attention_mask", g.const([1, 2])])], to=g.onnx.TensorProto.BOOL)
    allowed = g.op("And", [g.op("Unsqueeze", [causal, g.const([0, 1])]), keep])  # (B, 1, S, T)
    return g.op("Where", [allowed, g.const(0.0, np.float32), g.const(NEG, np.float32)])


def _rope_tables(model: Any, g: _Graph) -> tuple[str, str]:
    """cos and sin at ``position_ids``: (B, 1, S, D) each. Rope types whose frequencies do not
    depend on the length (default, linear, llama3, yarn) are computed in the graph as transformers
    does (positions x the model's own ``inv_freq``, times its ``attention_scaling``): no table
    grows with the context. Others (dynamic, longrope) gather from tables the model's rotary
    module computed over ``max_position_embeddings``."""
    rotary = model.get_submodule(Adapter(model).spec.rotary_emb)
    F = g.onnx.TensorProto.FLOAT
    if getattr(rotary, "rope_type", "default") in ("default", "linear", "llama3", "yarn"):
        pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=F), g.const([-1])])  # (B, S, 1)
        freqs = g.op("Mul", [pos, g.init("rope_inv_freq", _np(rotary.inv_freq.float()))])  # (B, S, D/2)
        emb = g.op("Concat", [freqs, freqs], axis=-1)
        out = []
        for fn in ("Cos", "Sin"):
            t = g.op(fn, [emb])
            scale = float(rotary.attention_scaling)
            t = t if scale == 1.0 else g.op("Mul", [t, g.const(scale, np.float32)])
            out.append(g.op("Unsqueeze", [t, g.const([1])]))
        return out[0], out[1]
    n = int(model.config.max_position_embeddings)
    probe = torch.zeros(1, 1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, torch.arange(n)[None])
    tables = []
    for hint, t in (("rope_cos", cos[0]), ("rope_sin", sin[0])):
        gathered = g.op("Gather", [g.init(hint, _np(t.float())), "position_ids"], axis=0)  # (B, S, D)
        tables.append(g.op("Unsqueeze", [gathered, g.const([1])]))
    return tables[0], tables[1]


def _llama(b: _Builder, d: _Dims) -> tuple[str, list[str]]:
    """RMSNorm pre-norm blocks, rotary attention, a SwiGLU MLP (Llama, Mistral, Qwen2/3)."""
    model, g, a = b.model, b.g, b.adapter
    embed_name, embed = next(iter(a.embeddings().items()))
    if not isinstance(embed, nn.Embedding):
        raise ExportError(
            f"{embed_name}: {type(embed).__name__} embeddings have no ONNX form here; keep the embeddings"
        )
    table = g.stored(f"{embed_name}.weight", embed.weight)
    x = g.to_float(g.op("Gather", [table, "input_ids"], axis=0), embed.weight)
    rope = _rope_tables(model, g)
    mask = _mask(g)
    presents = []
    for i in range(d.layers):
        h = b.rms_norm(x, a.role(i, "attn_norm"), a.role_name(i, "attn_norm"))
        q, k, v = (b.linear(h, a.role_name(i, r)) for r in ("attn_q", "attn_k", "attn_v"))
        attn, pk, pv = _attention(b, q, k, v, i, d, mask, rope)
        presents += [pk, pv]
        x = g.op("Add", [x, b.linear(attn, a.role_name(i, "attn_output"))])
        h = b.rms_norm(x, a.role(i, "ffn_norm"), a.role_name(i, "ffn_norm"))
        gate, up = b.linear(h, a.role_name(i, "ffn_gate")), b.linear(h, a.role_name(i, "ffn_up"))
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
        x = g.op("Add", [x, b.linear(g.op("Mul", [act, up]), a.role_name(i, "ffn_down"))])
    norm_name, norm = a.final_norm()
    x = b.rms_norm(x, norm, norm_name)
    head_name, head = a.head()
    tied = getattr(head, "weight", None) is embed.weight
    return (_tied_head(g, x, g.to_float(table, embed.weight), d) if tied else b.linear(x, head_name)), presents


def _tied_head(g: _Graph, x: str, table: str, d: _Dims) -> str:
    """logits against the embedding table itself (no second copy): Gemm with the table transposed."""
    flat = g.op("Reshape", [x, g.const([-1, d.hidden])])
    logits = g.op("Gemm", [flat, table], transB=1)
    lead = g.op("Slice", [g.op("Shape", [x]), g.const([0]), g.const([2])])
    return g.op("Reshape", [logits, g.op("Concat", [lead, g.const([d.vocab])], axis=0)])


def _gpt2(b: _Builder, d: _Dims) -> tuple[str, list[str]]:
    """LayerNorm pre-norm blocks, learned positions, fused [q | k | v], a tanh-GELU MLP (GPT-2)."""
    g, a = b.g, b.adapter
    (wte_name, wte), (wpe_name, wpe) = a.embeddings().items()
    if not isinstance(wte, nn.Embedding) or not isinstance(wpe, nn.Embedding):
        raise ExportError(f"{wte_name}: quantized embeddings have no ONNX form here; keep the embeddings")
    table = g.stored(f"{wte_name}.weight", wte.weight)
    x = g.to_float(g.op("Gather", [table, "input_ids"], axis=0), wte.weight)
    positions = g.to_float(g.op("Gather", [g.stored(f"{wpe_name}.weight", wpe.weight), "position_ids"]), wpe.weight)
    x = g.op("Add", [x, positions])
    mask = _mask(g)
    presents = []
    for i in range(d.layers):
        h = b.layer_norm(x, a.role(i, "attn_norm"), a.role_name(i, "attn_norm"))
        qkv = b.linear(h, a.role_name(i, "attn_qkv"))
        q, k, v = g.ops("Split", [qkv, g.const([d.hidden] * 3)], 3, axis=-1)
        attn, pk, pv = _attention(b, q, k, v, i, d, mask, None)
        presents += [pk, pv]
        x = g.op("Add", [x, b.linear(attn, a.role_name(i, "attn_output"))])
        h = b.linear(b.layer_norm(x, a.role(i, "ffn_norm"), a.role_name(i, "ffn_norm")), a.role_name(i, "ffn_up"))
        x = g.op("Add", [x, b.linear(_gelu_tanh(g, h), a.role_name(i, "ffn_down"))])
    norm_name, norm = a.final_norm()
    x = b.layer_norm(x, norm, norm_name)
    head_name, head = a.head()
    tied = getattr(head, "weight", None) is wte.weight
    return (_tied_head(g, x, g.to_float(table, wte.weight), d) if tied else b.linear(x, head_name)), presents


def _gelu_tanh(g: _Graph, x: str) -> str:
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [cube, g.const(0.044715, np.float32)])]),
                         g.const(math.sqrt(2.0 / math.pi), np.float32)])  # fmt: skip
    return g.op(
        "Mul",
        [g.op("Mul", [x, g.const(0.5, np.float32)]), g.op("Add", [g.op("Tanh", [inner]), g.const(1.0, np.float32)])],
    )


GRAPHS = {"llama": _llama, "gpt2": _gpt2}  # a spec's ``onnx`` -> the builder of its graph


def build_graph(model: nn.Module, densify: bool = False, data: Any = None) -> tuple[Any, _Builder]:
    """The decoder as an ONNX ModelProto, and the builder's record of each layer; the weights
    inside it, or written to ``data`` (an open file named DATA_FILE) as they are met."""
    onnx = _onnx()
    model_type = getattr(model.config, "model_type", None)
    spec = spec_for(model_type) if is_supported(model_type) else None
    if spec is None or spec.onnx is None:
        raise ExportError(
            f"{model_type} models are not exported to onnx yet; lmpress exports {', '.join(supporting('onnx'))}"
        )
    refusal = spec.onnx_refuse(model.config)
    if refusal is not None:
        raise ExportError(refusal)
    d = _dims(model)
    b = _Builder(model, densify, data)
    b.head_norms = b.adapter.has_role(0, "attn_q_norm")
    logits, presents = GRAPHS[spec.onnx](b, d)
    h = onnx.helper
    F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    inputs = [
        h.make_tensor_value_info("input_ids", I64, ["batch", "sequence"]),
        h.make_tensor_value_info("attention_mask", I64, ["batch", "total_sequence"]),
        h.make_tensor_value_info("position_ids", I64, ["batch", "sequence"]),
    ]
    outputs = [h.make_tensor_value_info("logits", F, ["batch", "sequence", d.vocab])]
    g = b.g
    for i in range(d.layers):
        for kind, present in (("key", presents[2 * i]), ("value", presents[2 * i + 1])):
            shape = ["batch", d.kv_heads, "past_sequence", d.head_dim]
            inputs.append(h.make_tensor_value_info(f"past_key_values.{i}.{kind}", F, shape))
            g.nodes.append(h.make_node("Identity", [present], [f"present.{i}.{kind}"]))
            total = ["batch", d.kv_heads, "total_sequence", d.head_dim]
            outputs.append(h.make_tensor_value_info(f"present.{i}.{kind}", F, total))
    g.nodes.append(h.make_node("Identity", [logits], ["logits"]))
    graph = h.make_graph(g.nodes, "lmpress_decoder", inputs, outputs, g.inits)
    proto = h.make_model(
        graph,
        opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid("com.microsoft", 1)],
        producer_name="lmpress",
        ir_version=9,
    )
    return proto, b


def export_onnx(
    model: nn.Module, tokenizer: Any, out: Path, *, densify: bool = False, overwrite: bool = False
) -> OnnxReport:
    """Write ``model`` as ``out/model.onnx`` (weights beside it in ``model.onnx.data`` when large),
    with its tokenizer and config (atomically)."""
    onnx = _onnx()
    params = count_parameters(model)
    external = 4 * params > EXTERNAL_DATA_BYTES  # float32 bounds every tensor written
    with atomic_dir(out, overwrite) as tmp:
        with torch.no_grad(), open(tmp / DATA_FILE, "wb") if external else contextlib.nullcontext() as data:
            proto, b = build_graph(model, densify, data)
        onnx.helper.set_model_props(proto, {PARAMETERS_KEY: str(params)})
        onnx.save_model(proto, str(tmp / GRAPH_FILE))
        save_companions(model, tokenizer, tmp)
        size = sum(p.stat().st_size for p in tmp.glob("model.onnx*"))
    return OnnxReport(out, size, b.formats, b.densified)
