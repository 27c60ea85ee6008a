"""What the export tests share: held-out windows, a compressed built-in model, lmpress's exact
float32 forward, and the KL between two sets of logits."""

from __future__ import annotations

from pathlib import Path

import torch

import lmpress
from lmpress.data import select_split, tokenize_documents
from lmpress.io.load import LoadedModel
from lmpress.nn.quant_linear import QuantLinear
from lmpress.sources import load_documents


def held_out_windows() -> torch.Tensor:
    """Two 128-token windows of evaluation-split text.  (2, 128)"""
    tok = lmpress.load("builtin", device="cpu").tokenizer
    docs = select_split(load_documents("stdlib"), "eval")[:3]
    return tokenize_documents(docs, tok)[1000:1256].view(2, 128)


def compress(stages: list[dict[str, object]], model: str | Path = "builtin") -> LoadedModel:
    r = lmpress.compress(model, {"stages": stages}, lmpress.DataOptions(calib_windows=8, seq_len=128), run_eval=False)
    return LoadedModel(r.model, r.tokenizer, str(model), Path("."))


def kl(a: torch.Tensor, b: torch.Tensor) -> float:
    """KL(a || b) per token, from logits."""
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    return float((la.exp() * (la - lb)).sum(-1).mean())


def exact_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """lmpress's forward in float32 through its dequantizing path (the CPU int4/int8 kernels compute
    in bfloat16): what the layers' codes, scales and zeros mean, with no rounding of the runtime's."""
    model = model.float()
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.act_bits is None:
            m._kernel = ("dequant", None)
    return model
