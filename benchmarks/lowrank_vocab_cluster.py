"""Low rank, vocabulary pruning, clustering and weight sharing on the built-in reference model.

    python -m benchmarks.lowrank_vocab_cluster [--threads 2] [--eval-windows 200] [--only lowrank,cluster,...]

Groups:

- ``lowrank`` (and ``lowrank-outliers``): plain truncated SVD against activation-aware SVD
  (SVD-LLM whitening) at 10%, 20% and 30% fewer parameters in the decoder blocks' linear layers;
- ``cluster``: k-means clustering with 16 and 256 centroids per layer against round-to-nearest at
  the same bits (4 and 8), plain k-means and the sensitivity-weighted, error-fed version;
- ``share``: cross-layer weight sharing at 8% and 25% of the blocks' linear weights, against
  dropping a block (the same parameters), each also after a short recovery distillation;
- ``vocab``: vocabulary pruning to a domain (the standard library's ``email``, ``json`` and ``http``
  packages), evaluated on the domain's held-out files; on the built-in model and on a tiny
  GPT-2-shaped model with the same byte-level BPE.

Every row: held-out perplexity, KL and top-1 agreement against the original on the same tokens,
parameters, bytes on disk, prefill and decode speed against the original (same run), time to compress.
Writes ``benchmarks/results/lowrank_vocab_cluster.json`` and its table in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sysconfig
import tempfile
from pathlib import Path
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
from lmpress.arch import Adapter
from lmpress.data import TokenData, split_of
from lmpress.data_options import DataOptions
from lmpress.evaluation import count_parameters, quality
from lmpress.io.load import load_model
from lmpress.method import Context
from lmpress.pipeline import compress, run_stages
from lmpress.recipe import parse_recipe
from lmpress.sources import load_documents
from lmpress.vocab import encode_all, same_pieces

NAME = "lowrank_vocab_cluster"
Stage = dict[str, Any]
GROUPS: dict[str, list[tuple[str, list[Stage]]]] = {
    "lowrank": [
        (
            f"{'activation-aware' if whiten else 'plain'} SVD, {share:.0%} fewer",
            [{"method": "lowrank", "target": share, "whiten": whiten}],
        )
        for share in (0.1, 0.2, 0.3)
        for whiten in (False, True)
    ],
    # the same model after a function-preserving rescale that gives it outlier input channels, as
    # large LLMs have (benchmarks/prune.py: with_outlier_channels): plain SVD is not invariant to it
    "lowrank-outliers": [
        (
            f"{'activation-aware' if whiten else 'plain'} SVD, 20% fewer, outlier channels",
            [{"method": "lowrank", "target": 0.2, "whiten": whiten}],
        )
        for whiten in (False, True)
    ],
    "cluster": [
        ("RTN 4-bit per channel", [{"method": "rtn", "bits": 4, "group_size": None}]),
        ("RTN 4-bit g128", [{"method": "rtn", "bits": 4, "group_size": 128}]),
        (
            "k-means 16/layer, plain",
            [{"method": "cluster", "centroids": 16, "weighting": "none", "error_feedback": False}],
        ),
        ("k-means 16/layer", [{"method": "cluster", "centroids": 16}]),
        ("k-means 16/channel", [{"method": "cluster", "centroids": 16, "per_channel": True}]),
        ("RTN 8-bit per channel", [{"method": "rtn", "bits": 8, "group_size": None}]),
        ("RTN 8-bit g128", [{"method": "rtn", "bits": 8, "group_size": 128}]),
        (
            "k-means 256/layer, plain",
            [{"method": "cluster", "centroids": 256, "weighting": "none", "error_feedback": False}],
        ),
        ("k-means 256/layer", [{"method": "cluster", "centroids": 256}]),
    ],
    "share": [
        ("share 8%", [{"method": "share", "target": 0.08}]),
        ("share 25%", [{"method": "share", "target": 0.25}]),
        ("share 25%, mean merge", [{"method": "share", "target": 0.25, "merge": "mean"}]),
        ("drop 1 of 4 blocks (25%)", [{"method": "drop_blocks", "blocks": 1}]),
    ],
}
RECOVER = {"method": "distill", "batch_size": 16, "eval_every": 50, "eval_windows": 16, "lr": 1e-4}
RECOVERED = ("share 25%", "drop 1 of 4 blocks (25%)")
DOMAIN = ("email", "json", "http")
ORDER = ["original", "lowrank", "lowrank-outliers", "cluster", "share", "vocab"]


def linear_bits(model: torch.nn.Module) -> float:
    """Stored bits per weight of the decoder blocks' linear layers (codes, codebooks, scales, biases)."""
    stored = weights = 0
    for m in Adapter(model).linears().values():
        tensors = {id(t): t for t in [*m.parameters(), *m.buffers()]}.values()
        stored += sum(t.numel() * t.element_size() for t in tensors)
        fmt = getattr(m, "lmpress_format", None)
        shape = (fmt()["out_features"], fmt()["in_features"]) if callable(fmt) else m.weight.shape
        weights += shape[0] * shape[1]
    return 8 * stored / weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--recovery-steps", type=int, default=100)
    ap.add_argument("--only", default=",".join([*GROUPS, "vocab"]))
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("builtin")
    original, tok = loaded.model, loaded.tokenizer
    eval_data = split_windows(tok, "eval", args.eval_windows)
    calib = split_windows(tok, "calib", args.calib_windows)
    train: list[TokenData] = []
    vocab = int(original.config.vocab_size)
    base = quality(original, eval_data.windows, batch_size=16)
    rows: list[dict[str, Any]] = [
        {
            "group": "original",
            "setting": "bf16",
            **base,
            "parameters": count_parameters(original),
            "bytes": saved_bytes(original, tok),
            "linear_bits": linear_bits(original),
        }
    ]
    only = args.only.split(",")
    outliers = with_outlier_channels(original)

    def ctx() -> Context:
        if not train:
            train.append(split_windows(tok, "train", None))  # type: ignore[arg-type]
        return Context(
            tokenizer=tok,
            device=torch.device("cpu"),
            calibration=lambda: calib,
            training=lambda: train[0],
            teacher=original,
        )

    def run(group: str, setting: str, stages: list[Stage], start: torch.nn.Module) -> torch.nn.Module:
        model = copy.deepcopy(start)
        reports, seconds = timed(lambda: run_stages(model, parse_recipe({"stages": stages}), ctx()))
        q = quality(model, eval_data.windows, reference=original, batch_size=16)
        row = {
            "group": group,
            "setting": setting,
            **q,
            "parameters": count_parameters(model),
            "bytes": saved_bytes(model, tok),
            "linear_bits": linear_bits(model),
            "compress_seconds": seconds,
            "report": reports,
            **({} if args.no_speed else paired_speed(original, model, vocab)),
        }
        rows.append(row)
        print(
            f"{setting:40s} ppl {row['perplexity']:.3f} kl {row['kl']:.4f} params {row['parameters']} "
            f"bytes {row['bytes']} bits {row['linear_bits']:.2f} {seconds:.1f}s "
            f"prefill x{row.get('prefill_speedup', 0):.2f} decode x{row.get('decode_speedup', 0):.2f}",
            flush=True,
        )
        return model

    for group in only:
        if group == "vocab":
            rows.extend(vocab_rows(original, tok, args.no_speed))
            continue
        for setting, stages in GROUPS[group]:
            model = run(group, setting, stages, outliers if group == "lowrank-outliers" else original)
            if group == "share" and setting in RECOVERED:
                recover = {**RECOVER, "steps": args.recovery_steps}
                run(group, f"{setting} + distill {args.recovery_steps} steps", [recover], model)
    payload: dict[str, Any] = {
        "machine": machine(),
        "eval": eval_data.manifest.to_dict(),
        "calib": calib.manifest.to_dict(),
        "rows": rows,
    }
    keep_other_groups(NAME, payload, only, ORDER)
    write_results(NAME, payload, _table(payload))


# ---- vocabulary pruning -------------------------------------------------------------------------


def domain_dirs(root: Path) -> tuple[Path, Path, list[str]]:
    """The domain packages copied with their standard-library paths (so their splits are the
    reference model's), and a copy of only their training-split files; plus the held-out texts."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    full, train_only = root / "domain", root / "domain-train"
    held_out = []
    for pkg in DOMAIN:
        shutil.copytree(stdlib / pkg, full / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for doc in load_documents(full, pattern="**/*.py"):
        if split_of(doc.path) == "train":
            (train_only / doc.path).parent.mkdir(parents=True, exist_ok=True)
            (train_only / doc.path).write_text(doc.text, encoding="utf-8")
        elif split_of(doc.path) == "eval":
            held_out.append(doc.text)
    return full, train_only, held_out


def tiny_gpt2(tok: Any, out: Path) -> Path:
    """A random GPT-2-shaped model (256 wide, 4 blocks, tied head) with the built-in byte-level BPE
    (its 3839 merges) as a GPT-2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # type: ignore[attr-defined]

    torch.manual_seed(0)
    eos = tok.eos_token
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=256, n_layer=4, n_head=4, n_positions=1024, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(cfg).save_pretrained(out)
    GPT2TokenizerFast(
        tokenizer_object=tok.backend_tokenizer, bos_token=eos, eos_token=eos, unk_token=eos
    ).save_pretrained(out)
    return out


def vocab_rows(original: torch.nn.Module, tok: Any, no_speed: bool) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        full, train_only, held_out = domain_dirs(Path(d))
        data = DataOptions(source=full, pattern="**/*.py", eval_windows=None)
        gpt2 = tiny_gpt2(tok, Path(d) / "gpt2")
        cases: list[tuple[str, str | Path, Stage]] = [
            ("built-in, vocabulary of the whole domain", "builtin", {"method": "vocab"}),
            (
                "built-in, vocabulary of the domain's training files",
                "builtin",
                {"method": "vocab", "data": str(train_only), "pattern": "**/*.py"},
            ),
            ("tiny GPT-2 (random), vocabulary of the whole domain", gpt2, {"method": "vocab"}),
        ]
        for setting, source, stage in cases:
            old = load_model(source)
            result, seconds = timed(
                lambda s=source, st=stage: compress(s, {"stages": [st]}, data, measure_speed=False)  # type: ignore[misc]
            )
            new_tok = result.tokenizer
            mapping = torch.tensor(
                [
                    new_tok.convert_tokens_to_ids(t) if t in new_tok.get_vocab() else -1
                    for t in old.tokenizer.convert_ids_to_tokens(list(range(len(old.tokenizer))))
                ]
            )
            held_same, held_tokens = same_pieces(
                encode_all(old.tokenizer, held_out), encode_all(new_tok, held_out), mapping
            )
            o, c = result.metrics["original"], result.metrics["compressed"]
            report = result.stages[0]
            row = {
                "group": "vocab",
                "setting": setting,
                **c,
                "original_perplexity": o["perplexity"],
                "original_parameters": o["parameters"],
                "original_bytes": o["bytes"],
                "bytes": saved_bytes(result.model, new_tok),
                "linear_bits": 16.0,
                "removed_share": 1 - c["parameters"] / o["parameters"],
                "held_out_identical_tokenization": held_same,
                "held_out_tokens": held_tokens,
                "eval_windows": result.data.windows if result.data else None,
                "compress_seconds": seconds,
                "report": [report],
                **({} if no_speed else paired_speed(old.model, result.model, len(new_tok))),
            }
            rows.append(row)
            print(
                f"{setting:52s} kept {report['tokens_kept']}/{report['tokens_before']} "
                f"removed {row['removed_share']:.3f} "
                f"ppl {o['perplexity']:.3f} -> {c['perplexity']:.3f} kl {c['kl']:.2e} "
                f"top1(full) {c['top1_agreement_full_vocab']:.4f} held-out same pieces {held_same:.4f}",
                flush=True,
            )
    return rows


# ---- the table ----------------------------------------------------------------------------------


def _fmt_row(r: dict[str, Any], orig: dict[str, Any]) -> list[str]:
    return [
        r["setting"],
        f"{r['perplexity']:.3f}",
        f"{r.get('kl', 0):.4f}",
        f"{r.get('top1_agreement', 1):.3f}",
        f"{r['parameters'] / orig['parameters']:.3f}",
        f"{r.get('linear_bits', 16):.2f}",
        f"{r['bytes'] / 1e6:.2f}",
        f"{r.get('prefill_speedup', 1):.2f}",
        f"{r.get('decode_speedup', 1):.2f}",
        f"{r.get('compress_seconds', 0):.1f}",
    ]


HEADER = ["setting", "ppl", "KL", "top-1", "params", "bits/w", "MB", "prefill x", "decode x", "s"]


def _table(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    orig = rows[0]
    d0 = orig["perplexity"]
    out = [
        "Low rank, clustering, weight sharing and vocabulary pruning (issue 5) on the built-in model, "
        "`python -m benchmarks.lowrank_vocab_cluster`: held-out perplexity, KL and top-1 agreement against the "
        f"original (same {payload['eval'].get('windows')} windows); params relative to the original; bits/w: "
        "stored bits per weight of the blocks' linear layers; speed against the original in the same run.",
        "",
    ]
    sections = [
        ("Low rank", ("lowrank", "lowrank-outliers")),
        ("Clustering (non-uniform quantization) against round-to-nearest", ("cluster",)),
        ("Cross-layer weight sharing", ("share",)),
    ]
    for title, groups in sections:
        mine = [r for r in rows if r["group"] in groups]
        if mine:
            out += [f"**{title}**", "", markdown_table(HEADER, [_fmt_row(r, orig) for r in [orig, *mine]]), ""]
    for share in ("10%", "20%", "30%"):
        plain = _find(rows, f"plain SVD, {share} fewer")
        aware = _find(rows, f"activation-aware SVD, {share} fewer")
        if plain and aware:
            ratio = (aware["perplexity"] - d0) / (plain["perplexity"] - d0)
            out.append(
                f"- Low rank, {share} fewer parameters: activation-aware +{aware['perplexity'] - d0:.3f} vs plain "
                f"+{plain['perplexity'] - d0:.3f} perplexity ({ratio:.3f} of plain's increase; "
                f"target at 20%: at most 0.1); KL {aware['kl']:.4f} vs {plain['kl']:.4f}."
            )
    plain = _find(rows, "plain SVD, 20% fewer, outlier channels")
    aware = _find(rows, "activation-aware SVD, 20% fewer, outlier channels")
    if plain and aware:
        ratio = (aware["perplexity"] - d0) / (plain["perplexity"] - d0)
        out.append(
            f"- Low rank, 20% fewer, outlier channels (same function, LLM-like activations): activation-aware "
            f"+{aware['perplexity'] - d0:.3f} vs plain +{plain['perplexity'] - d0:.3f} "
            f"({ratio:.3f} of plain's increase); KL {aware['kl']:.4f} vs {plain['kl']:.4f}."
        )
    for bits, k in ((4, 16), (8, 256)):
        km = _find(rows, f"k-means {k}/layer")
        rtn = [r for r in rows if r["setting"].startswith(f"RTN {bits}-bit")]
        if km and rtn:
            best = min(rtn, key=lambda r: r["perplexity"])
            verdict = "at or below" if km["perplexity"] <= best["perplexity"] else "ABOVE"
            out.append(
                f"- Clustering, {k} centroids per layer ({km['linear_bits']:.2f} bits/w): perplexity "
                f"{km['perplexity']:.3f} is {verdict} the best {bits}-bit round-to-nearest ({best['setting']}, "
                f"{best['linear_bits']:.2f} bits/w): "
                f"{best['perplexity']:.3f}; KL {km['kl']:.4f} vs {best['kl']:.4f}; {km['bytes'] / 1e6:.2f} vs "
                f"{best['bytes'] / 1e6:.2f} MB."
            )
    vocab = [r for r in rows if r["group"] == "vocab"]
    if vocab:
        table = [
            [
                r["setting"],
                f"{r['report'][0]['tokens_kept']}/{r['report'][0]['tokens_before']}",
                f"{r['removed_share']:.3f}",
                f"{r['original_bytes'] / 1e6:.2f} → {r['bytes'] / 1e6:.2f}",
                f"{r['original_perplexity']:.3f} → {r['perplexity']:.3f}",
                f"{r['kl']:.1e}",
                f"{r['top1_agreement_full_vocab']:.4f}",
                f"{r['dropped_token_mass']:.4f}",
                f"{r['report'][0]['identical_tokenization']:.4f}",
                f"{r['held_out_identical_tokenization']:.4f}",
                f"{r.get('decode_speedup', 1):.2f}",
            ]
            for r in vocab
        ]
        out += [
            "",
            "**Vocabulary pruning** to the `email`, `json` and `http` packages, evaluated on the domain's held-out "
            "files (never trained on); perplexity on that text before → after; KL on the kept tokens; top-1: the "
            "original's choice over its whole vocabulary is the pruned model's; dropped mass: the original's "
            "probability on removed tokens; same pieces: share of tokens split identically on the vocabulary's "
            "corpus and on the held-out files.",
            "",
            markdown_table(
                [
                    "setting", "tokens kept", "params removed", "MB", "ppl", "KL", "top-1 (full vocab)",
                    "dropped mass", "same pieces (corpus)", "same pieces (held out)", "decode x",
                ],
                table,
            ),
        ]  # fmt: skip
    return "\n".join(out)


def _find(rows: list[dict[str, Any]], setting: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["setting"] == setting), None)


if __name__ == "__main__":
    main()
