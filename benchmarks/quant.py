"""Quantization quality on the built-in reference model: every method at every width.

    python benchmarks/quant.py [--threads 2] [--eval-windows 200] [--methods rtn,gptq,hqq]

For each method and setting: held-out perplexity, KL and top-1 agreement against the original (the
same tokens), bytes on disk, bits per weight, time to quantize. Writes
``benchmarks/results/quant.json`` and the ``quant`` table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    MODELS,
    RESULTS,
    bench_model,
    export_windows,
    machine,
    markdown_table,
    results_name,
    saved_bytes,
    split_windows,
    timed,
    write_results,
)
from lmpress.evaluation import count_parameters, quality
from lmpress.method import Context
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe
from lmpress.speed import PeakRSS

SETTINGS: dict[str, dict[str, Any]] = {
    "W8 per-channel": {"bits": 8, "group_size": None, "symmetric": True},
    "W4 g128": {"bits": 4, "group_size": 128},
    "W4 per-channel": {"bits": 4, "group_size": None},
    "W3 g128": {"bits": 3, "group_size": 128},
    "W2 g64": {"bits": 2, "group_size": 64},
}
DROP = {"hqq": ("symmetric",)}  # hqq is asymmetric by construction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--methods", default="rtn,gptq,awq,hqq")
    ap.add_argument("--model", default="builtin", choices=sorted(MODELS))
    ap.add_argument("--export-data", type=Path, help="write the eval/calib windows for quant_peers.py and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = bench_model(args.model)
    original, tok = loaded.model, loaded.tokenizer
    eval_data = split_windows(tok, "eval", args.eval_windows)
    calib = split_windows(tok, "calib", args.calib_windows)
    if args.export_data:
        export_windows(args.export_data, eval_data, calib)
        return
    base = quality(original, eval_data.windows, batch_size=16)
    base_bytes = saved_bytes(original, tok)
    rows: list[dict[str, Any]] = [
        {
            "method": "original",
            "setting": "bf16",
            **base,
            "bytes": base_bytes,
            "bits_per_weight": 8 * base_bytes / count_parameters(original),
        }
    ]

    def run(method: str, setting: str, stage: dict[str, Any]) -> None:
        recipe = parse_recipe({"stages": [{"method": method, **stage}]})
        model = copy.deepcopy(original)
        ctx = Context(tokenizer=tok, device=torch.device("cpu"), calibration=lambda: calib)
        with PeakRSS() as mem:
            _, seconds = timed(lambda: run_stages(model, recipe, ctx))
        q = quality(model, eval_data.windows, reference=original, batch_size=16)
        nbytes = saved_bytes(model, tok)
        rows.append(
            {
                "method": method,
                "setting": setting,
                **q,
                "bytes": nbytes,
                "bits_per_weight": 8 * nbytes / count_parameters(model),
                "quantize_seconds": seconds,
                "peak_rss_mb": mem.peak / 2**20,
            }
        )
        print(
            f"{method:6s} {setting:34s} ppl {q['perplexity']:.3f} kl {q['kl']:.4f} "
            f"agree {q['top1_agreement']:.3f} bytes {nbytes} {seconds:.1f}s",
            flush=True,
        )

    for method in args.methods.split(","):
        for setting, params in SETTINGS.items():
            run(method, setting, {k: v for k, v in params.items() if k not in DROP.get(method, ())})
    run("w8a8", "W8A8 (SmoothQuant 0.5)", {})
    run("gptq", "W4 g128 + embeddings 8-bit", {"bits": 4, "group_size": 128, "embedding_bits": 8})
    run("gptq", "W4 g128 + embeddings & head 4-bit", {"bits": 4, "group_size": 128, "ignore": [], "embedding_bits": 4})
    payload = {
        "machine": machine(),
        "model": args.model,
        "eval": eval_data.manifest.to_dict(),
        "calib": calib.manifest.to_dict(),
        "rows": rows,
    }
    peers = RESULTS / f"{results_name('quant_peers', args.model)}.json"
    if peers.exists():  # measured by quant_peers.py on the same windows, in the peer environment
        payload["peers"] = json.loads(peers.read_text())
        rows += [r for r in payload["peers"]["rows"] if "error" not in r]
    write_results(results_name("quant", args.model), payload, _table(rows, eval_data.manifest.to_dict(), args.model))


def _table(rows: list[dict[str, Any]], manifest: dict[str, Any], model: str) -> str:
    base = rows[0]["perplexity"]
    body = [
        [
            r["method"],
            r["setting"],
            f"{r['perplexity']:.3f}",
            f"{100 * (r['perplexity'] / base - 1):+.1f}%",
            f"{r.get('kl', 0):.4f}",
            f"{100 * r.get('top1_agreement', 1):.1f}%",
            f"{r['bytes']:,}" if "bytes" in r else "-",  # peers: not saved in their own formats here
            f"{r['bits_per_weight']:.2f}" if "bits_per_weight" in r else "-",
            f"{r.get('quantize_seconds', 0):.1f}",
            f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-",
        ]
        for r in rows
    ]
    head = [
        "method",
        "setting",
        "perplexity",
        "vs original",
        "KL",
        "top-1 agree",
        "bytes",
        "bits/weight",
        "seconds",
        "peak RSS MiB",
    ]
    note = (
        f"{MODELS[model]}, `stdlib` eval split ({manifest['windows']} windows x {manifest['seq_len']} tokens, "
        f"sha256 {manifest['sha256'][:12]}); embeddings and head unquantized unless the setting says so; peers "
        "(from `quant_peers.py`, same windows and calibration tokens) have no lmpress byte count. "
        f"`python -m benchmarks.quant --model {model}`."
    )
    title = "Quantization quality" + ("" if model == "builtin" else ": " + MODELS[model].split(" (")[0])
    return f"## {title}\n\n" + note + "\n\n" + markdown_table(head, body)


if __name__ == "__main__":
    main()
