"""Speed of quantized layers on a real-shaped model: decode and prefill, against bf16 and fp32.

    python -m benchmarks.quant_speed [--threads 2] [--layers 22] [--shape tinyllama-1.1b]

Builds a Llama with random weights in the shapes of a ~1B model (no download), quantizes it with
lmpress (int8 weight-only, int4 g128 weight-only, W8A8), and measures decode tokens/s at batch 1
with the KV cache, prefill tokens/s, and how far decode is from the memory-bandwidth limit
(bandwidth measured by a large copy, divided by the weight bytes read per token). Writes
``benchmarks/results/quant_speed.json`` and the ``quant_speed`` table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import machine, markdown_table, write_results
from lmpress.evaluation import speed, tensor_bytes
from lmpress.method import Context
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe

SHAPES = {
    # hidden, MLP, heads, kv heads, vocab (TinyLlama-1.1B / Qwen2.5-0.5B-like)
    "tinyllama-1.1b": (2048, 5632, 32, 4, 32000),
    "qwen-0.5b": (896, 4864, 14, 2, 32000),
}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "bf16": None,
    "int8 weight-only": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
    "int4 g128 weight-only": {"method": "rtn", "bits": 4, "group_size": 128},
    "W8A8": {"method": "w8a8", "smooth_alpha": None},
}


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted once each)."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_time(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * nbytes / best


def _time(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hidden, mlp, heads, kv, vocab = SHAPES[args.shape]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    bandwidth = copy_bandwidth()
    rows = []
    for name, stage in VARIANTS.items():
        model = copy.deepcopy(base) if name == "fp32" else copy.deepcopy(base).to(torch.bfloat16)
        if stage is not None:
            ctx = Context(tokenizer=None, device=torch.device("cpu"))
            run_stages(model, parse_recipe({"stages": [stage]}), ctx)
        emb = model.get_input_embeddings().weight  # a lookup reads one row, not the table
        nbytes = tensor_bytes(model) - emb.numel() * emb.element_size()
        s = speed(model, vocab, prompt_len=args.prompt, decode_tokens=args.decode, batch=4, repeats=2)
        bound = bandwidth / nbytes
        rows.append(
            {
                "variant": name,
                **s,
                "weight_bytes_per_token": nbytes,
                "bandwidth_bound_tokens_per_s": bound,
                "decode_vs_bound": s["decode_tokens_per_s"] / bound,
            }
        )
        print(name, {k: round(v, 2) for k, v in s.items()}, f"bound {bound:.1f}", flush=True)
        del model
    ref = {r["variant"]: r for r in rows}["bf16"]
    table = markdown_table(
        [
            "variant",
            "decode tok/s",
            "vs bf16",
            "prefill tok/s",
            "vs bf16",
            "batched prefill tok/s",
            "vs bf16",
            "weight MB read/token",
            "decode / bandwidth bound",
        ],
        [
            [
                r["variant"],
                f"{r['decode_tokens_per_s']:.2f}",
                f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x",
                f"{r['prefill_tokens_per_s']:.1f}",
                f"{r['prefill_tokens_per_s'] / ref['prefill_tokens_per_s']:.2f}x",
                f"{r['batched_prefill_tokens_per_s']:.1f}",
                f"{r['batched_prefill_tokens_per_s'] / ref['batched_prefill_tokens_per_s']:.2f}x",
                f"{r['weight_bytes_per_token'] / 1e6:.0f}",
                f"{100 * r['decode_vs_bound']:.0f}%",
            ]
            for r in rows
        ],
    )
    note = (
        f"Random-weight Llama in {args.shape} shapes ({args.layers} layers, hidden {hidden}, MLP {mlp}, "
        f"{heads}/{kv} heads, vocab {vocab}); batch 1 decode of {args.decode} tokens after a {args.prompt}-token "
        f"prompt; prefill of {args.prompt} tokens; {args.threads} threads; copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s. `python -m benchmarks.quant_speed`."
    )
    write_results(
        "quant_speed",
        {
            "machine": machine(),
            "shape": args.shape,
            "layers": args.layers,
            "bandwidth_bytes_per_s": bandwidth,
            "rows": rows,
        },
        "## Quantized speed\n\n" + note + "\n\n" + table,
    )


if __name__ == "__main__":
    main()
