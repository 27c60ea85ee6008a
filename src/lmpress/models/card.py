"""The reference model's card: what it is, how it was trained, and what compression costs it.

Measures held-out perplexity on the whole evaluation split of the stdlib corpus, the cost of
round-to-nearest weight quantization of every block projection (4, 3 and 2 bits, group 128), and
writes ``README.md`` beside the checkpoint, with generated samples.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from lmpress.arch import Adapter, linear_weight
from lmpress.data import load_windows
from lmpress.evaluation import quality
from lmpress.io import load_model
from lmpress.quant.grid import fake_quantize

PROMPTS = ("import os\n", "def ", "class Parser:\n    def ")


@torch.no_grad()
def rtn_costs(
    model: torch.nn.Module, windows: torch.Tensor, bits: tuple[int, ...] = (4, 3, 2), group_size: int = 128
) -> dict[int, dict[str, float]]:
    """Perplexity and KL vs the unquantized model with every block projection RTN-quantized."""
    linears = Adapter(model).linears()
    saved = {n: linear_weight(m).detach().clone() for n, m in linears.items()}
    reference = _frozen_copy(model)
    out = {}
    for b in bits:
        for n, m in linears.items():
            linear_weight(m).copy_(fake_quantize(saved[n], b, group_size))
        out[b] = quality(model, windows, reference=reference, batch_size=16)
    for n, m in linears.items():
        linear_weight(m).copy_(saved[n])
    return out


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).eval()


def samples(model: torch.nn.Module, tokenizer: Any, n_tokens: int = 96, seed: int = 0) -> list[str]:
    torch.manual_seed(seed)
    out = []
    for p in PROMPTS:
        ids = tokenizer(p, return_tensors="pt").input_ids
        gen = model.generate(  # type: ignore[operator]
            ids, max_new_tokens=n_tokens, do_sample=True, temperature=0.7, top_k=40, pad_token_id=tokenizer.eos_token_id
        )
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def write_card(out: Path, info: dict[str, Any], max_windows: int | None = None) -> dict[str, Any]:
    """Evaluate the checkpoint in ``out`` and write its README.md; returns the measured numbers."""
    loaded = load_model(out)
    model, tok = loaded.model, loaded.tokenizer
    spec = info["spec"]
    t0 = time.perf_counter()
    data = load_windows(tok, "stdlib", "eval", spec["seq_len"], max_windows)
    base = quality(model, data.windows, batch_size=16)
    rtn = rtn_costs(model, data.windows)
    eval_minutes = (time.perf_counter() - t0) / 60
    texts = samples(model, tok)
    adapter = Adapter(model)
    measured = {
        "eval": base,
        "eval_manifest": data.manifest.to_dict(),
        "rtn_g128": {str(b): m for b, m in rtn.items()},
        "non_embedding_parameters": adapter.non_embedding_parameters(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "eval_minutes": eval_minutes,
    }
    info = {**info, "card": measured}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(_render(info, texts))
    return measured


def _render(info: dict[str, Any], texts: list[str]) -> str:
    spec, card = info["spec"], info["card"]
    base, ev = card["eval"], card["eval_manifest"]
    rtn_rows = "\n".join(
        f"| {b}-bit | {m['perplexity']:.3f} | {100 * (m['perplexity'] / base['perplexity'] - 1):+.1f}% "
        f"| {m['kl']:.4f} | {100 * m['top1_agreement']:.1f}% |"
        for b, m in card["rtn_g128"].items()
    )
    sample_blocks = "\n\n".join(f"```python\n{t}\n```" for t in texts)
    tm = info["train_manifest"]
    return f"""# lmpress built-in reference model

A small Llama (`LlamaForCausalLM`) trained by lmpress itself on the Python standard library's
source, so that every machine can build and test compression without downloads. It is the test bed
every lmpress method is judged on. Load it with `lmpress.load("builtin")`.

## Architecture

| | |
|---|---|
| parameters | {info["parameters"]:,} ({card["non_embedding_parameters"]:,} outside embeddings and head) |
| layers | {spec["num_layers"]} |
| hidden size | {spec["hidden_size"]} |
| MLP width | {spec["intermediate_size"]} (SwiGLU) |
| attention | {spec["num_heads"]} query heads, {spec["num_kv_heads"]} key/value heads (grouped-query) |
| vocabulary | {spec["vocab_size"]} (byte-level BPE, trained on the train split) |
| output head | untied |
| context | trained on windows of {spec["seq_len"]} tokens |
| stored as | safetensors, {card["dtype"]} |

## Training

- Corpus: `stdlib` train split — {tm["documents"]} files, {tm["chars"]:,} characters, sha256 `{tm["sha256"]}`;
  {info["train_unique_tokens"]:,} tokens.
- {info["train_tokens"]:,} training tokens ({info["epochs"]:.1f} epochs, {info["train_tokens"] / info["parameters"]:.1f}
  tokens per parameter), {info["steps"]} steps of {spec["batch_size"]} x {spec["seq_len"]} tokens.
- AdamW (β = 0.9, 0.95, weight decay {spec["weight_decay"]}), peak learning rate {spec["peak_lr"]},
  linear warm-up over {100 * spec["warmup_fraction"]:.0f}% of steps then cosine decay to
  {100 * spec["min_lr_ratio"]:.0f}%, gradient clipping {spec["grad_clip"]}, bf16 autocast, seed {spec["seed"]}.
- Training time: **{info["train_minutes"]:.1f} minutes** on {info["device"]} with {info["threads"]} thread(s).

## Held-out quality

On the whole `stdlib` evaluation split ({ev["documents"]} files, sha256 `{ev["sha256"][:16]}…`,
{ev["windows"]} non-overlapping windows of {ev["seq_len"]} tokens, {int(base["eval_tokens"]):,} predicted tokens),
weights as stored:

- perplexity **{base["perplexity"]:.3f}**, next-token accuracy {100 * base["accuracy"]:.1f}%

What round-to-nearest weight quantization of every block projection costs it (asymmetric, group 128;
embeddings and head kept):

| weights | perplexity | change | KL vs original | top-1 agreement |
|---|---|---|---|---|
{rtn_rows}

Reproduce: `lmpress eval builtin --max-windows 100000` (evaluation) and
`lmpress train-reference --output runs/reference` (training; the token count follows the time budget).

## Samples (temperature 0.7, top-k 40, seed 0)

{sample_blocks}
"""
