"""Low rank, vocabulary pruning, clustering and weight sharing on the built-in reference model.

    python -m benchmarks.lowrank_vocab_cluster [--threads 2] [--eval-windows 200] [--only lowrank]

Groups so far: ``lowrank`` — plain truncated SVD against activation-aware SVD (SVD-LLM whitening)
at 10%, 20% and 30% fewer parameters in the decoder blocks' linear layers. Every row: held-out
perplexity, KL and top-1 agreement against the original on the same tokens, parameters, bytes on
disk, prefill and decode speed against the original (same run), time to compress. Vocabulary
pruning, clustering and weight sharing join as they land (issue 5).
Writes ``benchmarks/results/lowrank_vocab_cluster.json`` and its table in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from benchmarks.common import (
    keep_other_groups,
    machine,
    markdown_table,
    saved_bytes,
    split_windows,
    timed,
    write_results,
)
from benchmarks.prune import paired_speed, with_outlier_channels
from lmpress.evaluation import count_parameters, quality
from lmpress.models.loading import load_model
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe
from lmpress.registry import Context

NAME = "lowrank_vocab_cluster"
GROUPS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "lowrank": [
        (
            f"{'activation-aware' if whiten else 'plain'} SVD, {share:.0%} fewer",
            {"method": "lowrank", "target": share, "whiten": whiten},
        )
        for share in (0.1, 0.2, 0.3)
        for whiten in (False, True)
    ],
    # the same model after a function-preserving rescale that gives it outlier input channels, as
    # large LLMs have (benchmarks/prune.py: with_outlier_channels): plain SVD is not invariant to it
    "lowrank-outliers": [
        (
            f"{'activation-aware' if whiten else 'plain'} SVD, 20% fewer, outlier channels",
            {"method": "lowrank", "target": 0.2, "whiten": whiten},
        )
        for whiten in (False, True)
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--only", default=",".join(GROUPS))
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("builtin")
    original, tok = loaded.model, loaded.tokenizer
    eval_data = split_windows(tok, "eval", args.eval_windows)
    calib = split_windows(tok, "calib", args.calib_windows)
    vocab = original.config.vocab_size
    base = quality(original, eval_data.windows, batch_size=16)
    rows: list[dict[str, Any]] = [
        {
            "group": "original",
            "setting": "bf16",
            **base,
            "parameters": count_parameters(original),
            "bytes": saved_bytes(original, tok),
        }
    ]
    only = args.only.split(",")
    outliers = with_outlier_channels(original)
    for group in only:
        for setting, stage in GROUPS[group]:
            model = copy.deepcopy(outliers if group == "lowrank-outliers" else original)
            ctx = Context(tokenizer=tok, device=torch.device("cpu"), calibration=lambda: calib)
            reports, seconds = timed(lambda m=model, s=stage, c=ctx: run_stages(m, parse_recipe({"stages": [s]}), c))
            q = quality(model, eval_data.windows, reference=original, batch_size=16)
            row = {
                "group": group,
                "setting": setting,
                **q,
                "parameters": count_parameters(model),
                "bytes": saved_bytes(model, tok),
                "compress_seconds": seconds,
                "report": reports[0],
                **({} if args.no_speed else paired_speed(original, model, vocab)),
            }
            rows.append(row)
            print(
                f"{setting:36s} ppl {row['perplexity']:.3f} kl {row['kl']:.4f} params {row['parameters']} "
                f"bytes {row['bytes']} {seconds:.1f}s prefill x{row.get('prefill_speedup', 0):.2f} "
                f"decode x{row.get('decode_speedup', 0):.2f}",
                flush=True,
            )
    payload: dict[str, Any] = {
        "machine": machine(),
        "eval": eval_data.manifest.to_dict(),
        "calib": calib.manifest.to_dict(),
        "rows": rows,
    }
    keep_other_groups(NAME, payload, only, ["original", *GROUPS])
    write_results(NAME, payload, _table(payload))


def _table(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    orig = rows[0]
    table = [
        [
            r["setting"],
            f"{r['perplexity']:.3f}",
            f"{r.get('kl', 0):.4f}",
            f"{r.get('top1_agreement', 1):.3f}",
            f"{r['parameters'] / orig['parameters']:.3f}",
            f"{r['bytes'] / 1e6:.2f}",
            f"{r.get('prefill_speedup', 1):.2f}",
            f"{r.get('decode_speedup', 1):.2f}",
            f"{r.get('compress_seconds', 0):.1f}",
        ]
        for r in rows
    ]
    out = [
        "Low rank (issue 5) on the built-in model, `python -m benchmarks.lowrank_vocab_cluster`: held-out "
        f"perplexity, KL and top-1 agreement against the original (same {payload['eval'].get('windows')} windows); "
        "speed against the original in the same run.",
        "",
        markdown_table(["setting", "ppl", "KL", "top-1", "params", "MB", "prefill x", "decode x", "s"], table),
        "",
    ]
    d0 = orig["perplexity"]
    for share in ("10%", "20%", "30%"):
        plain = next((r for r in rows if r["setting"] == f"plain SVD, {share} fewer"), None)
        aware = next((r for r in rows if r["setting"] == f"activation-aware SVD, {share} fewer"), None)
        if plain and aware:
            ratio = (aware["perplexity"] - d0) / (plain["perplexity"] - d0)
            out.append(
                f"- {share} fewer parameters: activation-aware +{aware['perplexity'] - d0:.3f} vs plain "
                f"+{plain['perplexity'] - d0:.3f} perplexity ({ratio:.3f} of plain's increase; "
                f"target at 20%: at most 0.1); KL {aware['kl']:.4f} vs {plain['kl']:.4f}."
            )
    plain = next((r for r in rows if r["setting"] == "plain SVD, 20% fewer, outlier channels"), None)
    aware = next((r for r in rows if r["setting"] == "activation-aware SVD, 20% fewer, outlier channels"), None)
    if plain and aware:
        ratio = (aware["perplexity"] - d0) / (plain["perplexity"] - d0)
        out.append(
            f"- 20% fewer, outlier channels (same function, LLM-like activations): activation-aware "
            f"+{aware['perplexity'] - d0:.3f} vs plain +{plain['perplexity'] - d0:.3f} "
            f"({ratio:.3f} of plain's increase); KL {aware['kl']:.4f} vs {plain['kl']:.4f}."
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
