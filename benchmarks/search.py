"""Recipe search against the hand-written presets on the built-in model, at three size budgets.

    python -m benchmarks.search [--threads 2] [--eval-windows 200] [--trials 30] [--recovery-steps 100]

For budgets of 40%, 25% and 15% of the original's bytes: the searched recipe's held-out perplexity
(evaluation split, never seen by the search, which selects on calibration-split windows) against
the best preset that fits the budget, and against the smallest preset when none fits; trials and
wall time. Each search ends by distilling its two best candidates (recovery, QAT); the table shows
the best post-training recipe and the best after recovery separately, and the preset ``edge`` given
the same recovery, so recovery is compared with recovery. Then the same 25% search with trial
pruning and the sensitivity seeds turned off (no recovery): the trial-seconds each needs to reach
its best. Writes ``benchmarks/results/search.json`` and its table in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, machine, markdown_table, saved_bytes, split_windows, timed, write_results
from lmpress.evaluation import quality, tensor_bytes
from lmpress.io.load import load_model
from lmpress.method import Context
from lmpress.pipeline import run_stages
from lmpress.recipe import load_recipe, parse_recipe
from lmpress.recipe_search import Recovery, SearchConfig, run_search

NAME = "search"
PRESETS = ("w8", "w4", "edge", "sparse50", "w4-sparse")
BUDGETS = (0.40, 0.25, 0.15)
SPACE = {
    "methods": ["gptq"],
    "bits": [2, 3, 4, 8],
    "group_sizes": [64, 128],
    "block_groups": 2,
    "head_bits": [None, 8, 4, 3],
    "embedding_bits": [None, 8, 4, 3, 2],
    "drop_blocks": [0, 1],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--recovery-steps", type=int, default=100)
    ap.add_argument("--select-windows", type=int, default=64)
    ap.add_argument("--table-only", action="store_true", help="re-render the table from the committed results")
    args = ap.parse_args()
    if args.table_only:
        payload = json.loads((RESULTS / f"{NAME}.json").read_text())
        write_results(NAME, payload, _table(payload))
        return
    torch.set_num_threads(args.threads)
    loaded = load_model("builtin")
    original, tok = loaded.model, loaded.tokenizer
    eval_data = split_windows(tok, "eval", args.eval_windows)
    calib_all = split_windows(tok, "calib", 64 + args.select_windows)
    calib = dataclasses.replace(calib_all, windows=calib_all.windows[:64])
    train = split_windows(tok, "train", 16 * max(args.recovery_steps, 1))
    base = quality(original, eval_data.windows, batch_size=16)
    orig_bytes = saved_bytes(original, tok)
    orig_tensor = tensor_bytes(original)
    rows: list[dict[str, Any]] = [
        {"kind": "original", "name": "bf16", "perplexity": base["perplexity"], "bytes": orig_bytes}
    ]

    def measure(recipe: dict[str, Any]) -> dict[str, Any]:
        model = copy.deepcopy(original)
        ctx = Context(
            tokenizer=tok,
            device=torch.device("cpu"),
            calibration=lambda: calib,
            training=lambda: train,
            teacher=original,
        )
        _, seconds = timed(lambda: run_stages(model, parse_recipe(recipe), ctx))
        q = quality(model, eval_data.windows, reference=original, batch_size=16)
        return {**q, "bytes": saved_bytes(model, tok), "compress_seconds": seconds}

    for name in PRESETS:
        row = {"kind": "preset", "name": name, **measure(load_recipe(name).to_dict())}
        rows.append(row)
        print(f"preset {name:10s} {row['bytes'] / 1e6:6.2f} MB ppl {row['perplexity']:.3f}", flush=True)
    recovery = {"steps": args.recovery_steps, "top_k": 2} if args.recovery_steps else {"steps": 0}
    if args.recovery_steps:  # the hand-written recipe given the same recovery the search gives its candidates
        edge = load_recipe("edge").to_dict()
        edge["stages"].append(Recovery.model_validate(recovery).stage())
        row = {"kind": "preset+recovery", "name": "edge + recovery", **measure(edge)}
        rows.append(row)
        print(f"edge + recovery {row['bytes'] / 1e6:6.2f} MB ppl {row['perplexity']:.3f}", flush=True)

    def search(budget_share: float, prune: bool, seeds: bool, study: Path, rec: dict[str, int]) -> tuple[Any, float]:
        config = SearchConfig.model_validate(
            {
                "space": SPACE,
                "budget": {"max_bytes": int(budget_share * orig_tensor)},
                "trials": args.trials,
                "calib_windows": 64,
                "select_windows": args.select_windows,
                "prune": prune,
                "seeds": seeds,
                "recovery": rec,
            }
        )
        return timed(lambda: run_search(original, tok, calib_all, config, study, train=train))

    with tempfile.TemporaryDirectory() as d:
        for share in BUDGETS:
            result, seconds = search(share, True, True, Path(d) / f"s{share}", recovery)
            if result.best is None:
                rows.append(
                    {"kind": "search", "name": f"{share:.0%}", "budget_bytes": share * orig_tensor, "found": False}
                )
                continue
            post = _best_post_training(result.trials)
            if post is not None and "refines" in result.best:
                rows.append(
                    {
                        "kind": "search-post-training",
                        "name": f"{share:.0%}",
                        "budget_bytes": share * orig_tensor,
                        **measure(post["recipe"]),
                        "recipe": post["recipe"],
                        "selection_perplexity": post["perplexity"],
                    }
                )
            row = {
                "kind": "search",
                "name": f"{share:.0%}",
                "budget_bytes": share * orig_tensor,
                **measure(result.best["recipe"]),
                "selection_perplexity": result.best["perplexity"],
                "recovered": "refines" in result.best,
                "recipe": result.best["recipe"],
                "trials": len(result.trials),
                "measured": sum(t["state"] == "COMPLETE" and "repeat_of" not in t for t in result.trials),
                "pruned": sum(t["state"] == "PRUNED" for t in result.trials),
                "search_seconds": seconds,
                "trial_seconds": _trial_seconds(result.trials),
                "recovery_seconds": sum(t.get("seconds") or 0.0 for t in result.trials if "refines" in t),
            }
            rows.append(row)
            print(f"search {share:.0%}: {row['bytes'] / 1e6:.2f} MB ppl {row['perplexity']:.3f} "
                  f"({row['trials']} trials, {row['pruned']} pruned, {seconds:.0f} s)", flush=True)  # fmt: skip
        ablation = []
        for prune, seeds in ((True, True), (False, False)):
            result, seconds = search(0.25, prune, seeds, Path(d) / f"ab{prune}", {"steps": 0})
            ablation.append(
                {
                    "prune_and_seeds": prune,
                    "seconds": seconds,
                    "trial_seconds": _trial_seconds(result.trials),
                    "best_selection_perplexity": result.best["perplexity"] if result.best else None,
                    "seconds_to_best": _seconds_to_best(result.trials),
                    "measured": sum(t["state"] == "COMPLETE" and "repeat_of" not in t for t in result.trials),
                }
            )
            print("ablation", ablation[-1], flush=True)
    payload = {
        "machine": machine(),
        "eval": eval_data.manifest.to_dict(),
        "space": SPACE,
        "trials": args.trials,
        "select_windows": args.select_windows,
        "recovery_steps": args.recovery_steps,
        "rows": rows,
        "ablation": ablation,
    }
    write_results(NAME, payload, _table(payload))


TIE = 1e-3  # perplexities within 0.1% of each other: a tie (different recipes differ by about this in noise)


def _verdict(ours: float, theirs: float) -> str:
    if ours < theirs * (1 - TIE):
        return "**win**"
    return "tie" if ours <= theirs * (1 + TIE) else "loses"


def _describe(recipe: dict[str, Any]) -> str:
    """A recipe in a few words: drop 1 block, gptq 2-bit g128 (head 4-bit, embeddings 2-bit), distill 100."""
    parts = []
    for st in recipe["stages"]:
        m = st["method"]
        if m == "drop_blocks":
            parts.append(f"drop {st['blocks']} block(s)")
        elif m == "sparsegpt":
            parts.append(f"sparsegpt {st['sparsity']:.0%} at {st.get('bits')}-bit")
        elif m == "distill":
            parts.append(f"distill {st['steps']} steps ({'QAT' if st.get('codes') == 'train' else 'scales'})")
        else:
            extra = [f"head {o['bits']}-bit" for o in st.get("overrides", []) if o["targets"] == ["lm_head"]]
            extra += [f"embeddings {st['embedding_bits']}-bit"] if st.get("embedding_bits") else []
            groups = [o["bits"] for o in st.get("overrides", []) if o["targets"] != ["lm_head"]]
            extra += [f"a block group at {b}-bit" for b in groups]
            parts.append(f"{m} {st['bits']}-bit g{st['group_size']}" + (f" ({', '.join(extra)})" if extra else ""))
    return ", ".join(parts)


def _best_post_training(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [
        t
        for t in trials
        if t["state"] == "COMPLETE" and "refines" not in t and all(c <= 0 for c in t.get("constraints", [0]))
    ]
    return min(done, key=lambda t: t["perplexity"]) if done else None


def _trial_seconds(trials: list[dict[str, Any]]) -> float:
    return float(sum(t.get("duration") or 0.0 for t in trials))


def _seconds_to_best(trials: list[dict[str, Any]]) -> float | None:
    """Trial-seconds spent until the best selection perplexity was first reached."""
    done = [t for t in trials if t["state"] == "COMPLETE" and all(c <= 0 for c in t.get("constraints", [0]))]
    if not done:
        return None
    best = min(t["perplexity"] for t in done)
    spent = 0.0
    for t in sorted(trials, key=lambda t: t["number"]):
        spent += t.get("duration") or 0.0
        if t in done and t["perplexity"] <= best * (1 + 1e-9):
            return spent
    return spent


def _table(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    orig = rows[0]
    presets = [r for r in rows if r["kind"] == "preset"]
    recovered_edge = next((r for r in rows if r["kind"] == "preset+recovery"), None)
    post = {r["name"]: r for r in rows if r["kind"] == "search-post-training"}
    out_rows: list[list[str]] = []
    notes: list[str] = []
    for r in (r for r in rows if r["kind"] == "search"):
        if not r.get("perplexity"):
            out_rows.append([r["name"], f"{r['budget_bytes'] / 1e6:.2f}", "none found", "", "", "", "", "", ""])
            continue
        fits = [p for p in presets if p["bytes"] <= r["budget_bytes"] * 1.01]
        rival = min(fits, key=lambda p: p["perplexity"]) if fits else min(presets, key=lambda p: p["bytes"])
        verdict = _verdict(r["perplexity"], rival["perplexity"])
        if recovered_edge and r.get("recovered") and recovered_edge["bytes"] <= r["budget_bytes"] * 1.01:
            same = recovered_edge["perplexity"]
            verdict += f"; vs edge + recovery {same:.3f}: {_verdict(r['perplexity'], same)}"
        if not fits:
            notes.append(
                f"- {r['name']}: no preset is this small (the smallest, {rival['name']}, is "
                f"{rival['bytes'] / r['budget_bytes']:.1f}x the budget); the search's recipe: {_describe(r['recipe'])}."
            )
        p = post.get(r["name"])
        out_rows.append(
            [
                r["name"],
                f"{r['budget_bytes'] / 1e6:.2f}",
                f"{r['bytes'] / 1e6:.2f}",
                f"{p['perplexity']:.3f}" if p else (f"{r['perplexity']:.3f}" if not r.get("recovered") else ""),
                f"{r['perplexity']:.3f}" if r.get("recovered") else "(no gain)",
                f"{rival['name']} ({rival['bytes'] / 1e6:.2f} MB{'' if fits else ', larger'}): "
                f"{rival['perplexity']:.3f}",
                verdict,
                f"{r['trials']} ({r['pruned']} pruned)",
                f"{r['search_seconds']:.0f} ({r.get('recovery_seconds', 0):.0f} recovery)",
            ]
        )
    table = markdown_table(
        ["budget", "budget MB", "found MB", "ppl post-training", "ppl with recovery",
         "best preset that fits (else smallest)", "search", "trials", "s"],
        out_rows,
    )  # fmt: skip
    preset_rows = [[p["name"], f"{p['bytes'] / 1e6:.2f}", f"{p['perplexity']:.3f}", f"{p['kl']:.4f}"] for p in presets]
    if recovered_edge:
        preset_rows.append(
            [
                recovered_edge["name"],
                f"{recovered_edge['bytes'] / 1e6:.2f}",
                f"{recovered_edge['perplexity']:.3f}",
                f"{recovered_edge['kl']:.4f}",
            ]
        )
    lines = [
        "Recipe search (issue 8) on the built-in model, `python -m benchmarks.search`: budgets as a share of the "
        f"original's {orig['bytes'] / 1e6:.2f} MB; perplexity on the evaluation split "
        f"({payload['eval'].get('windows')} windows; original {orig['perplexity']:.3f}); the search selects on "
        f"{payload.get('select_windows', 32)} calibration-split windows; {payload.get('trials', '?')} trials per "
        f"search, then {payload.get('recovery_steps', 0)} distillation steps (QAT) for each of its two best "
        "candidates. *ppl post-training*: the best recipe before recovery, measured alone.",
        "",
        table,
        "",
        markdown_table(["preset", "MB", "ppl", "KL"], preset_rows),
        "",
    ]
    lines += notes
    for a in payload["ablation"]:
        lines.append(
            f"- 25% budget, {'with' if a['prune_and_seeds'] else 'without'} size/sensitivity pruning and seeds: "
            f"{a['measured']} trials measured, {a['trial_seconds']:.0f} trial-seconds in all, best selection "
            f"perplexity {a['best_selection_perplexity']:.3f} reached after {a['seconds_to_best'] or 0:.0f} "
            "trial-seconds."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
