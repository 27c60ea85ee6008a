"""Pruning on the built-in reference model: unstructured, N:M, structured and block removal.

    python -m benchmarks.prune [--threads 2] [--eval-windows 200] [--only unstructured,nm,...]

For each setting: held-out perplexity, KL and top-1 agreement against the original (the same
tokens), parameters, bytes on disk, prefill and decode speed against the original (same run),
time to prune. Peers (llm-compressor's SparseGPT and Wanda, from ``prune_peers.py`` on the same
windows) are merged in when ``results/prune_peers.json`` exists. Structured speed is also measured
on a random-weight Llama in real shapes, where widths rather than per-op overhead set the time.
Writes ``benchmarks/results/prune.json`` and the ``prune`` table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from benchmarks.common import RESULTS, machine, markdown_table, saved_bytes, split_windows, timed, write_results
from lmpress.evaluation import count_parameters, quality, speed
from lmpress.models.adapters import Adapter
from lmpress.models.loading import load_model
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe
from lmpress.registry import Context

GROUPS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "unstructured": [
        (m, "50% unstructured", {"method": m, "sparsity": 0.5}) for m in ("magnitude", "wanda", "sparsegpt")
    ]
    + [(m, "60% unstructured", {"method": m, "sparsity": 0.6}) for m in ("magnitude", "wanda", "sparsegpt")]
    + [
        ("wanda", "60% OWL", {"method": "wanda", "sparsity": 0.6, "allocation": "owl"}),
        ("sparsegpt", "60% OWL", {"method": "sparsegpt", "sparsity": 0.6, "allocation": "owl"}),
    ],
    "nm": [(m, p, {"method": m, "pattern": p}) for p in ("2:4", "4:8") for m in ("magnitude", "wanda", "sparsegpt")]
    + [("sparsegpt", "2:4 + 4-bit g128", {"method": "sparsegpt", "pattern": "2:4", "bits": 4})],
    "structured": [
        ("structured", "25% uniform", {"method": "structured", "target": 0.25}),
        ("structured", "25% per-block widths", {"method": "structured", "target": 0.25, "uniform": False}),
        ("structured", "25% uniform, magnitude", {"method": "structured", "target": 0.25, "importance": "magnitude"}),
    ],
    "blocks": [
        (
            "drop_blocks",
            f"{k} block{'s' if k > 1 else ''}, {score}",
            {"method": "drop_blocks", "blocks": k, "score": score},
        )
        for k in (1, 2, 3)
        for score in ("angular", "last", "random")
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--only", default=",".join(GROUPS))
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--export-data", type=Path, help="write the eval/calib windows for prune_peers.py and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("builtin")
    original, tok = loaded.model, loaded.tokenizer
    eval_data = split_windows(tok, "eval", args.eval_windows)
    calib = split_windows(tok, "calib", args.calib_windows)
    if args.export_data:
        args.export_data.parent.mkdir(parents=True, exist_ok=True)
        save_file({"eval": eval_data.windows.contiguous(), "calib": calib.windows.contiguous()}, args.export_data)
        return
    vocab = original.config.vocab_size
    non_emb = Adapter(original).non_embedding_parameters()

    def measure_speed(model: torch.nn.Module) -> dict[str, float]:
        return {} if args.no_speed else speed(model, vocab, prompt_len=128, decode_tokens=32, repeats=3)

    base_speed = measure_speed(original)
    base = quality(original, eval_data.windows, batch_size=16)
    rows: list[dict[str, Any]] = [
        {
            "method": "original",
            "setting": "bf16",
            **base,
            "parameters": count_parameters(original),
            "non_embedding": non_emb,
            "bytes": saved_bytes(original, tok),
            **base_speed,
        }
    ]
    for group in args.only.split(","):
        for method, setting, stage in GROUPS[group]:
            model = copy.deepcopy(original)
            ctx = Context(tokenizer=tok, device=torch.device("cpu"), calibration=lambda: calib)
            recipe = parse_recipe({"stages": [stage]})
            reports, seconds = timed(lambda m=model, r=recipe, c=ctx: run_stages(m, r, c))
            q = quality(model, eval_data.windows, reference=original, batch_size=16)
            sp = measure_speed(model)
            row = {
                "method": method,
                "setting": setting,
                **q,
                "parameters": count_parameters(model),
                "non_embedding": Adapter(model).non_embedding_parameters(),
                "bytes": saved_bytes(model, tok),
                "prune_seconds": seconds,
                "report": reports[0] if reports else None,
                **sp,
            }
            if sp:
                row["prefill_speedup"] = sp["prefill_tokens_per_s"] / base_speed["prefill_tokens_per_s"]
                row["decode_speedup"] = sp["decode_tokens_per_s"] / base_speed["decode_tokens_per_s"]
            rows.append(row)
            print(
                f"{method:11s} {setting:28s} ppl {q['perplexity']:.3f} kl {q['kl']:.4f} bytes {row['bytes']} "
                f"{seconds:.1f}s prefill x{row.get('prefill_speedup', 0):.2f} "
                f"decode x{row.get('decode_speedup', 0):.2f}",
                flush=True,
            )
    payload: dict[str, Any] = {
        "machine": machine(),
        "eval": eval_data.manifest.to_dict(),
        "calib": calib.manifest.to_dict(),
        "rows": rows,
    }
    if "structured" in args.only and not args.no_speed:
        payload["real_shape_speed"] = real_shape_speed()
    peers = RESULTS / "prune_peers.json"
    if peers.exists():
        payload["peers"] = json.loads(peers.read_text())
        rows += [r for r in payload["peers"]["rows"] if "error" not in r]
    write_results("prune", payload, _table(payload))


def real_shape_speed(layers: int = 8) -> list[dict[str, Any]]:
    """Structured pruning's speed where widths dominate: a random-weight Llama in Qwen2.5-0.5B-like
    shapes (hidden 896, MLP 4864, 14/2 heads), bf16, 25% of non-embedding parameters removed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=896,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ctx = Context(tokenizer=None, device=torch.device("cpu"))
    out = []
    base = speed(model, cfg.vocab_size, prompt_len=128, decode_tokens=32, repeats=3)
    out.append({"setting": "original", **base})
    for name, stage in (
        ("structured 25% (neurons)", {"method": "structured", "target": 0.25, "importance": "magnitude"}),
        ("drop_blocks 25%", {"method": "drop_blocks", "target": 0.25, "score": "last"}),
    ):
        m = copy.deepcopy(model)
        run_stages(m, parse_recipe({"stages": [stage]}), ctx)
        sp = speed(m, cfg.vocab_size, prompt_len=128, decode_tokens=32, repeats=3)
        removed = 1 - Adapter(m).non_embedding_parameters() / Adapter(model).non_embedding_parameters()
        out.append(
            {
                "setting": name,
                "removed_share": removed,
                **sp,
                "prefill_speedup": sp["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
                "decode_speedup": sp["decode_tokens_per_s"] / base["decode_tokens_per_s"],
            }
        )
        print(out[-1], flush=True)
    return out


def _table(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    base = rows[0]
    body = []
    for r in rows:
        body.append(
            [
                r["method"],
                r["setting"],
                f"{r['perplexity']:.3f}",
                f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%",
                f"{r.get('kl', 0):.4f}",
                f"{100 * r.get('top1_agreement', 1):.1f}%",
                f"{r['parameters']:,}" if "parameters" in r else "-",
                f"{r['bytes']:,}" if "bytes" in r else "-",
                f"{r['prefill_speedup']:.2f}x" if "prefill_speedup" in r else "-",
                f"{r['decode_speedup']:.2f}x" if "decode_speedup" in r else "-",
                f"{r.get('prune_seconds', 0):.1f}",
            ]
        )
    head = ["method", "setting", "perplexity", "vs original", "KL", "top-1 agree", "parameters", "bytes"]
    head += ["prefill vs original", "decode vs original", "seconds"]
    m = payload["machine"]
    text = [
        "## Pruning",
        "",
        f"Built-in model, `stdlib` eval split ({payload['eval']['windows']} windows x {payload['eval']['seq_len']} "
        f"tokens), {payload['calib']['windows']} calibration windows; parameters count kept weights; "
        f"{m['threads']} threads; speed is batch-1 prefill of 128 tokens and decode of 32, against the "
        "original in the same run. `python -m benchmarks.prune`.",
        "",
        markdown_table(head, body),
    ]
    real = payload.get("real_shape_speed")
    if real:
        text += [
            "",
            "Structured speed where widths dominate: random-weight Llama, 8 layers in Qwen2.5-0.5B-like shapes "
            "(hidden 896, MLP 4864, 14/2 heads), bf16:",
            "",
            markdown_table(
                ["setting", "removed", "prefill tok/s", "vs original", "decode tok/s", "vs original"],
                [
                    [
                        r["setting"],
                        f"{100 * r.get('removed_share', 0):.0f}%",
                        f"{r['prefill_tokens_per_s']:.0f}",
                        f"{r.get('prefill_speedup', 1):.2f}x",
                        f"{r['decode_tokens_per_s']:.1f}",
                        f"{r.get('decode_speedup', 1):.2f}x",
                    ]
                    for r in real
                ],
            ),
        ]
    return "\n".join(text)


if __name__ == "__main__":
    main()
