"""Training-time stand-ins for compressed layers, and the way back to packed storage.

A compressed layer holds packed codes or kept values in buffers, which an optimizer cannot move.
Before training, `make_trainable` swaps each one for a `TrainableLinear` that computes the same
function from float tensors; after training, `restore_compressed` packs it again in its original
format, so the trained model is exactly as small as before:

- a sparse layer trains its kept weights; its mask is fixed, so pruned weights stay zero;
- a quantized layer, with ``codes="frozen"``, keeps every integer code and learns its per-group
  scales (the end-to-end step of EfficientQAT, Chen et al. 2024, arXiv:2407.11062); with
  ``codes="train"`` it is quantization-aware training: a float latent weight is rounded onto the
  grid in the forward pass, gradients pass the rounding straight through, and the scales learn by
  LSQ (Esser et al. 2019, arXiv:1902.08153), so the codes may change;
- with ``lora_rank`` every layer keeps its base frozen and learns a low-rank update B·A
  (Hu et al. 2021, arXiv:2106.09685) instead; it is merged back exactly into dense layers and into
  the kept weights of sparse ones (the update restricted to the mask, which stays). A quantized
  layer keeps its codes and stores the update beside them (`LoRALinear`), or, with
  ``merge_quantized``, has base + update re-rounded onto its grid (no extra numbers, new codes).

A clustered layer (`CodebookLinear`) keeps its indices and learns its codebook and row scales
(`TrainableCodebook`; with LoRA it stays frozen). Dense ``nn.Linear`` layers without LoRA are
trained as they are.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lmpress.arch import is_conv1d
from lmpress.formats.grid import Quantized, expand_groups, quantize_with
from lmpress.formats.packing import decode_zeros
from lmpress.nn import CodebookLinear, LoRALinear, QuantLinear, SparseLinear
from lmpress.nn.lora_linear import tensor_device
from lmpress.quant.base import replace_module

Codes = Literal["frozen", "train"]


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (x.round() - x).detach()


def fake_quant(w: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int | None) -> Tensor:
    """(clamp(round(w/s) + z, 0, 2^bits - 1) - z) · s per group, differentiable in ``w`` (STE) and ``s`` (LSQ).

    w: (out, in) float; scales, zeros: (out, groups).
    """
    s = expand_groups(scales, w.shape[1], group_size)  # (out, in)
    z = expand_groups(zeros, w.shape[1], group_size)
    q = (round_ste(w / s) + z).clamp(0, 2**bits - 1)
    return (q - z) * s


class TrainableLinear(nn.Module):
    """A linear layer in float tensors that knows the packed format it came from and returns to."""

    weight: Tensor | None  # latent float weight (None over frozen codes)
    bias: Tensor | None
    scales: Tensor | None  # (out, groups) of a quantized layer
    zeros: Tensor | None
    codes: Tensor | None  # (out, in) uint8 when the codes are frozen
    mask: Tensor | None  # (out, in) bool keep-mask of a sparse layer
    lora_a: nn.Parameter | None
    lora_b: nn.Parameter | None

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        mask: Tensor | None = None,
        quant: Quantized | None = None,
        codes: Codes = "frozen",
        lora_rank: int = 0,
        origin: nn.Module | None = None,
    ) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        self.in_features, self.out_features = in_f, out_f
        self.origin = [origin]  # a list hides it from the module tree: formats only, never trained
        self.quant_bits = quant.bits if quant is not None else None
        self.group_size = quant.group_size if quant is not None else None
        self.codes_mode: Codes = codes
        self.register_buffer("mask", mask.to(torch.bool) if mask is not None else None)
        frozen_codes = quant is not None and codes == "frozen"
        # what the optimizer may move is a Parameter; what stays fixed is a buffer
        self._keep("weight", None if frozen_codes else weight.detach().float().clone(), trainable=not lora_rank)
        self._keep("bias", bias.detach().float().clone() if bias is not None else None, trainable=True)
        self._keep("scales", quant.scales.float().clone() if quant is not None else None, trainable=not lora_rank)
        self._keep("zeros", quant.zeros.float().clone() if quant is not None else None, trainable=False)
        self._keep("codes", quant.codes.clone() if frozen_codes and quant is not None else None, trainable=False)
        self.lora_a = self.lora_b = None
        if lora_rank:
            self.lora_a = nn.Parameter(torch.randn(lora_rank, in_f) / in_f**0.5)  # (r, in)
            self.lora_b = nn.Parameter(torch.zeros(out_f, lora_rank))  # (out, r): starts as no change

    def _keep(self, name: str, t: Tensor | None, trainable: bool) -> None:
        if trainable and t is not None:
            self.register_parameter(name, nn.Parameter(t))
        else:
            self.register_buffer(name, t)

    def base_weight(self) -> Tensor:
        """The weight without the LoRA update.  (out, in)"""
        if self.scales is None:
            w = self.weight
            assert w is not None
        elif self.codes is not None:  # frozen codes: (code - zero) * scale, learnable scale
            assert self.zeros is not None
            s = expand_groups(self.scales, self.in_features, self.group_size)
            z = expand_groups(self.zeros, self.in_features, self.group_size)
            w = (self.codes.float() - z) * s
        else:
            w = fake_quant(self.weight, self.scales, self.zeros, self.quant_bits, self.group_size)  # type: ignore[arg-type]
        return w * self.mask if self.mask is not None else w

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(
            x, self.base_weight().to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None
        )
        if self.lora_a is not None and self.lora_b is not None:
            y = y + (x @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype)
        return y

    def merged_weight(self) -> Tensor:
        """The weight to pack: LoRA folded in, restricted to the kept weights.  (out, in)"""
        with torch.no_grad():
            if self.weight is not None and self.scales is not None and self.lora_a is None:
                w = self.weight.clone()  # the latent weight: it rounds to exactly the forward's codes
            else:
                w = self.base_weight()
            if self.lora_a is not None and self.lora_b is not None:
                w = w + self.lora_b @ self.lora_a
            return (w * self.mask if self.mask is not None else w).detach()

    def to_compressed(self, merge_quantized: bool = False) -> nn.Module:
        """Pack the trained layer in the format it came from.

        A LoRA update on a quantized layer stays beside it (`LoRALinear`, the codes unchanged)
        unless ``merge_quantized``, which re-rounds base + update onto the layer's grid."""
        origin = self.origin[0]
        if isinstance(origin, QuantLinear) and self.lora_a is not None and not merge_quantized:
            assert self.lora_b is not None
            kept = LoRALinear(
                origin, self.lora_a.shape[0], origin.bias.dtype if origin.bias is not None else torch.float32
            )
            if self.bias is not None and origin.bias is not None:
                origin.bias.data.copy_(self.bias.detach())
            kept.lora_a.copy_(self.lora_a.detach())
            kept.lora_b.copy_(self.lora_b.detach())
            return kept
        bias = self.bias.detach() if self.bias is not None else None
        with torch.no_grad():
            w = self.merged_weight()
            q: Quantized | None = None
            if self.scales is not None:
                scales = self.scales.detach().abs().clamp(min=1e-10)
                if self.codes is not None and self.lora_a is None:
                    codes = self.codes
                else:
                    codes = quantize_with(w, scales, self.zeros, self.quant_bits, self.group_size)  # type: ignore[arg-type]
                q = Quantized(codes, scales, self.zeros, self.quant_bits, self.group_size)  # type: ignore[arg-type]
        if isinstance(origin, SparseLinear):
            assert self.mask is not None
            dtype = origin.values.dtype if origin.values is not None else torch.float32
            b = bias.to(origin.bias.dtype) if bias is not None and origin.bias is not None else bias
            scale_dtype = origin.scales.dtype if origin.scales is not None else torch.float16
            return SparseLinear.from_dense(w.to(dtype), self.mask, b, origin.pattern, q, origin.symmetric, scale_dtype)
        if isinstance(origin, QuantLinear):
            assert q is not None
            b = bias.to(origin.bias.dtype) if bias is not None and origin.bias is not None else bias
            return QuantLinear.from_quantized(
                q, b, origin.symmetric, origin.scales.dtype, origin.fzeros is not None, origin.act_bits
            )
        assert isinstance(origin, nn.Linear)
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        dense.to(origin.weight.dtype)
        dense.weight.data.copy_(w)
        if bias is not None:
            dense.bias.data.copy_(bias)
        return dense


class TrainableCodebook(nn.Module):
    """A clustered layer whose indices stay and whose centroids (and row scales) learn."""

    indices: Tensor

    def __init__(self, origin: CodebookLinear) -> None:
        super().__init__()
        self.origin = [origin]
        self.register_buffer("indices", origin.indices())
        self.codebook = nn.Parameter(origin.codebook.float().clone())
        self.scales = nn.Parameter(origin.scales.float().clone()) if origin.scales is not None else None
        self.bias = nn.Parameter(origin.bias.detach().float().clone()) if origin.bias is not None else None

    def weight(self) -> Tensor:
        w = self.codebook[0][self.indices] if self.codebook.shape[0] == 1 else self.codebook.gather(1, self.indices)
        return w * self.scales[:, None] if self.scales is not None else w

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.weight().to(x.dtype), bias)

    def to_compressed(self, merge_quantized: bool = False) -> nn.Module:
        origin = self.origin[0]
        book = self.codebook.detach().sort(dim=1)  # keep the codebook sorted; indices follow
        rank = book.indices.argsort(dim=1)
        idx = rank[0][self.indices] if rank.shape[0] == 1 else rank.gather(1, self.indices)
        bias = self.bias.detach().to(origin.bias.dtype) if self.bias is not None and origin.bias is not None else None
        scales = self.scales.detach() if self.scales is not None else None
        return CodebookLinear.from_indices(
            idx.to(torch.uint8), book.values, origin.bits, bias, origin.codebook.dtype, scales
        )


Trainable = TrainableLinear | TrainableCodebook


def _quantized_of(layer: QuantLinear) -> Quantized:
    return Quantized(layer.codes(), layer.scales.float(), layer.zeros(), layer.bits, layer.group_size)


def to_trainable(module: nn.Module, codes: Codes = "frozen", lora_rank: int = 0) -> Trainable | None:
    """The trainable stand-in of a compressed (or, with LoRA, dense) linear layer; None: train as is."""
    if isinstance(module, CodebookLinear):
        return None if lora_rank else TrainableCodebook(module)
    if isinstance(module, QuantLinear):
        q = _quantized_of(module)
        w = q.dequantize()
        return TrainableLinear(w, module.bias, quant=q, codes=codes, lora_rank=lora_rank, origin=module)
    if isinstance(module, SparseLinear):
        dense, sq = module.dense_weight(), None
        if module.qvalues is not None:  # kept weights stored as codes: recover them on the same grid
            assert module.scales is not None and module.bits is not None
            shape = tuple(module.scales.shape)
            zeros = decode_zeros(module.qzeros, None, module.bits, shape, module.mask.device)  # type: ignore[arg-type]
            s = module.scales.float()
            sq = Quantized(
                quantize_with(dense, s, zeros, module.bits, module.group_size), s, zeros, module.bits, module.group_size
            )
        return TrainableLinear(
            dense, module.bias, mask=module.keep_mask(), quant=sq, codes=codes, lora_rank=lora_rank, origin=module
        )
    if lora_rank and isinstance(module, nn.Linear):
        return TrainableLinear(module.weight, module.bias, lora_rank=lora_rank, origin=module)
    return None


def make_trainable(model: nn.Module, codes: Codes = "frozen", lora_rank: int = 0) -> dict[str, Trainable]:
    """Swap every compressed linear layer (every linear layer, with LoRA) for a `TrainableLinear`."""
    swapped: dict[str, Trainable] = {}
    for name, module in list(model.named_modules()):
        if is_conv1d(module) and lora_rank:
            continue  # GPT-2's Conv1D is dense: it trains as it is
        t = to_trainable(module, codes, lora_rank)
        if t is not None:
            t.to(tensor_device(module))
            replace_module(model, name, t)
            swapped[name] = t
    return swapped


def restore_compressed(model: nn.Module, swapped: dict[str, Trainable], merge_quantized: bool = False) -> None:
    """Pack every `TrainableLinear` back into its original format, in place."""
    for name, t in swapped.items():
        replace_module(model, name, t.to_compressed(merge_quantized))
