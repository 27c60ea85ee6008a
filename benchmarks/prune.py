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
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RESULTS,
    export_windows,
    machine,
    markdown_table,
    saved_bytes,
    split_windows,
    timed,
    write_results,
)
from lmpress.arch import Adapter
from lmpress.evaluation import count_parameters, quality, speed
from lmpress.io.load import load_model
from lmpress.method import Context
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe

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
    # the same model after a function-preserving rescale that gives it outlier input channels, as
    # large LLMs have (see with_outlier_channels): the setting Wanda and SparseGPT were made for
    "outliers": [
        (m, "50% unstructured, outlier channels", {"method": m, "sparsity": 0.5})
        for m in ("magnitude", "wanda", "sparsegpt")
    ]
    + [(m, "2:4, outlier channels", {"method": m, "pattern": "2:4"}) for m in ("magnitude", "wanda", "sparsegpt")],
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
        export_windows(args.export_data, eval_data, calib)
        return
    vocab = original.config.vocab_size
    non_emb = Adapter(original).non_embedding_parameters()

    base = quality(original, eval_data.windows, batch_size=16)
    rows: list[dict[str, Any]] = [
        {
            "method": "original",
            "setting": "bf16",
            **base,
            "parameters": count_parameters(original),
            "non_embedding": non_emb,
            "bytes": saved_bytes(original, tok),
        }
    ]

    outlier_model = with_outlier_channels(original)
    outlier_ppl = quality(outlier_model, eval_data.windows[:16], batch_size=16)["perplexity"]
    print(f"outlier-channel model: perplexity {outlier_ppl:.4f} on 16 windows (original: same function)", flush=True)

    def run(method: str, setting: str, stage: dict[str, Any], group: str = "") -> dict[str, Any]:
        model = copy.deepcopy(outlier_model if group == "outliers" else original)
        ctx = Context(tokenizer=tok, device=torch.device("cpu"), calibration=lambda: calib)
        recipe = parse_recipe({"stages": [stage]})
        reports, seconds = timed(lambda: run_stages(model, recipe, ctx))
        q = quality(model, eval_data.windows, reference=original, batch_size=16)
        return {
            "method": method,
            "setting": setting,
            **q,
            "parameters": count_parameters(model),
            "non_embedding": Adapter(model).non_embedding_parameters(),
            "bytes": saved_bytes(model, tok),
            "prune_seconds": seconds,
            "report": reports[0] if reports else None,
            **({} if args.no_speed else paired_speed(original, model, vocab)),
        }

    for group in args.only.split(","):
        for method, setting, stage in GROUPS[group]:
            if stage.get("score") == "random":  # a baseline: the mean over several draws
                runs = [run(method, setting, {**stage, "seed": seed}, group) for seed in range(RANDOM_SEEDS)]
                row = {
                    k: (sum(r[k] for r in runs) / len(runs) if isinstance(v, float) else v) for k, v in runs[0].items()
                }
                row["setting"] = f"{setting} (mean of {RANDOM_SEEDS} seeds)"
                row["per_seed_perplexity"] = [r["perplexity"] for r in runs]
                row["report"] = [r["report"] for r in runs]
            else:
                row = run(method, setting, stage, group)
            row["group"] = group
            rows.append(row)
            print(
                f"{method:11s} {row['setting']:28s} ppl {row['perplexity']:.3f} kl {row['kl']:.4f} "
                f"bytes {row['bytes']} {row['prune_seconds']:.1f}s prefill x{row.get('prefill_speedup', 0):.2f} "
                f"decode x{row.get('decode_speedup', 0):.2f}",
                flush=True,
            )
    payload: dict[str, Any] = {
        "machine": machine(),
        "eval": eval_data.manifest.to_dict(),
        "calib": calib.manifest.to_dict(),
        "rows": rows,
        "outlier_model_perplexity_16_windows": outlier_ppl,
    }
    previous = json.loads((RESULTS / "prune.json").read_text()) if (RESULTS / "prune.json").exists() else {}
    if "structured" in args.only.split(",") and not args.no_speed:
        payload["real_shape_speed"] = real_shape_speed()
    elif "real_shape_speed" in previous:
        payload["real_shape_speed"] = previous["real_shape_speed"]
    rerun = set(args.only.split(","))
    if previous.get("eval") == payload["eval"]:  # same windows: keep the groups not run this time
        kept = [r for r in previous.get("rows", [])[1:] if "error" not in r and "llmcompressor" not in r["method"]]
        for r in kept:
            r.setdefault("group", _group_of(r))
        kept = [r for r in kept if r["group"] not in rerun]
        order = list(GROUPS)
        rows[1:] = sorted(rows[1:] + kept, key=lambda r: order.index(r["group"]))
    peers = RESULTS / "prune_peers.json"
    if peers.exists():
        payload["peers"] = json.loads(peers.read_text())
        rows += [r for r in payload["peers"]["rows"] if "error" not in r]
    write_results("prune", payload, _table(payload))


RANDOM_SEEDS = 5


def with_outlier_channels(model: torch.nn.Module, share: float = 0.02, scale: float = 32.0) -> torch.nn.Module:
    """A copy computing exactly the same function, whose linear layers after each norm see a few
    input channels ``scale`` times larger: those the norms weight most, the norm's weight on them
    times ``scale``, the linears' columns divided by it (a power of two is exact in bf16). Large LLMs have such outlier
    features (Dettmers et al. 2022); the built-in model's inputs do not (largest/median channel RMS
    1.4-3.2). Magnitude pruning is not invariant to this rescale; Wanda's |W|·‖x‖ is."""
    out = copy.deepcopy(model)
    adapter = Adapter(out)
    hidden = out.config.hidden_size
    # the channels the norms already weight most (in LLMs the outliers are the important channels)
    norm_w = torch.stack(
        [n.weight.detach().float().abs() for i in range(adapter.num_blocks) for n in adapter.block_norms(i).values()]
    )
    channels = torch.topk(norm_w.mean(0), max(1, round(share * hidden))).indices
    with torch.no_grad():
        for i in range(adapter.num_blocks):
            for prev_name, prev, linears in adapter.scale_groups(i):
                if prev_name.rsplit(".", 1)[-1] not in adapter.spec.norm_paths:
                    continue
                prev.weight[channels] *= scale
                for lin in linears.values():
                    lin.weight[:, channels] /= scale
    return out


def _group_of(row: dict[str, Any]) -> str:
    """The group of a result row written before rows carried it."""
    if row["method"] in ("structured", "drop_blocks"):
        return "structured" if row["method"] == "structured" else "blocks"
    return "nm" if ":" in row["setting"] else "unstructured"


def paired_speed(base: torch.nn.Module, model: torch.nn.Module, vocab: int, rounds: int = 5) -> dict[str, float]:
    """Speed of ``model`` against ``base`` measured alternately (base, model, base, model, ...), so a
    noisy machine slows both alike; the median of the per-round ratios, and the model's median speeds."""
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
    own: dict[str, list[float]] = {"prefill": [], "decode": []}
    for _ in range(rounds):
        b = speed(base, vocab, prompt_len=256, decode_tokens=64, repeats=3)
        m = speed(model, vocab, prompt_len=256, decode_tokens=64, repeats=3)
        for k in ratios:
            ratios[k].append(m[f"{k}_tokens_per_s"] / b[f"{k}_tokens_per_s"])
            own[k].append(m[f"{k}_tokens_per_s"])
    return {
        "prefill_tokens_per_s": statistics.median(own["prefill"]),
        "decode_tokens_per_s": statistics.median(own["decode"]),
        "prefill_speedup": statistics.median(ratios["prefill"]),
        "decode_speedup": statistics.median(ratios["decode"]),
    }


def real_shape_speed(layers: int = 24) -> list[dict[str, Any]]:
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
    out: list[dict[str, Any]] = []
    for name, stage in (
        ("structured 25% (neurons)", {"method": "structured", "target": 0.25, "importance": "magnitude"}),
        ("drop_blocks 25%", {"method": "drop_blocks", "target": 0.25, "score": "last"}),
    ):
        m = copy.deepcopy(model)
        run_stages(m, parse_recipe({"stages": [stage]}), ctx)
        removed = 1 - Adapter(m).non_embedding_parameters() / Adapter(model).non_embedding_parameters()
        out.append({"setting": name, "removed_share": removed, **paired_speed(model, m, cfg.vocab_size, rounds=3)})
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
            "Structured speed where widths dominate: random-weight Llama in Qwen2.5-0.5B shapes (24 layers, "
            "hidden 896, MLP 4864, 14/2 heads, vocabulary 32000), bf16, paired runs:",
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
