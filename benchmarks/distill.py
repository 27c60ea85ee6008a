"""Distillation, recovery and QAT on the built-in reference model.

    python -m benchmarks.distill [--threads 2] [--eval-windows 200] [--only student,narrow,recovery,qat,...]

Groups (every row: held-out perplexity, KL and top-1 agreement against the teacher on the same
tokens, parameters, bytes, training tokens and time):

- student: half the teacher's non-embedding parameters (structured, uniform widths), initialised
  from the teacher and distilled, against the same student without training, fine-tuned with plain
  cross-entropy on the same tokens, and trained from scratch on the same tokens;
- narrow: the other half-size student, half the hidden channels removed (`hidden`), distilled the same way;
- recovery (and lowrank): GPTQ 3-bit, SparseGPT 50%, structured 25% and low rank 20%, before and
  after a short distillation (quantized layers keep their codes and learn their scales; sparse ones
  keep their masks; low-rank factors train as they are);
- qat: quantization-aware training at 3 bits against post-training GPTQ at 3 bits;
- precision: the same recovery run in bf16 autocast and in fp32 (tokens/s and final quality);
- resume: a training process killed with SIGKILL at a random step, restarted, against the run that
  was never interrupted (final loss and perplexity).

Writes ``benchmarks/results/distill.json`` and the ``distill`` table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
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
from lmpress.arch import Adapter
from lmpress.distill.train import TrainConfig, train
from lmpress.evaluation import count_parameters, quality
from lmpress.io.load import load_model
from lmpress.method import Context
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe

HALF = {"method": "structured", "target": 0.5}
KD = {"method": "distill", "batch_size": 16, "eval_every": 50, "eval_windows": 16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--recovery-steps", type=int, default=100)
    ap.add_argument("--student-lr", type=float, default=1e-3)
    ap.add_argument("--recovery-lr", type=float, default=1e-4)
    ap.add_argument("--only", default="student,narrow,recovery,lowrank,qat,precision,resume")
    ap.add_argument("--resume-worker", nargs=2, metavar=("RUN_DIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("builtin")
    teacher, tok = loaded.model, loaded.tokenizer
    teacher.eval()
    eval_data = split_windows(tok, "eval", args.eval_windows)
    calib = split_windows(tok, "calib", args.calib_windows)
    train_data = split_windows(tok, "train", None)  # type: ignore[arg-type]
    if args.resume_worker:
        resume_worker(teacher, tok, calib, train_data, Path(args.resume_worker[0]), Path(args.resume_worker[1]))
        return

    def ctx() -> Context:
        return Context(
            tokenizer=tok,
            device=torch.device("cpu"),
            calibration=lambda: calib,
            training=lambda: train_data,
            teacher=teacher,
        )

    def measure(model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        q = quality(model, eval_data.windows, reference=teacher, batch_size=16)
        row = {**extra, **q, "parameters": count_parameters(model), "bytes": saved_bytes(model, tok)}
        row["non_embedding"] = Adapter(model).non_embedding_parameters()
        print(
            f"{row['group']:9s} {row['setting']:44s} ppl {row['perplexity']:8.3f} kl {row['kl']:.4f} "
            f"params {row['parameters']} {row.get('train_seconds', 0):.0f}s",
            flush=True,
        )
        return row

    def compress(stages: list[dict[str, Any]], model: torch.nn.Module | None = None) -> tuple[Any, list[Any], float]:
        model = copy.deepcopy(teacher) if model is None else model
        reports, seconds = timed(lambda: run_stages(model, parse_recipe({"stages": stages}), ctx()))
        return model, reports, seconds

    def training_of(reports: list[Any]) -> dict[str, Any]:
        t = next((r["training"] for r in reports if "training" in r), None)
        return {"train_tokens": t["tokens"], "train_seconds": t["train_seconds"], "training": t} if t else {}

    rows: list[dict[str, Any]] = [measure(teacher, group="teacher", setting="reference model (bf16)")]
    only = set(args.only.split(","))
    lr = args.recovery_lr
    if "student" in only:
        rows += student_rows(compress, measure, training_of, train_data.windows, args.student_steps, args.student_lr)
    if "narrow" in only:  # the other half-size student: a narrower residual stream (Minitron's embedding axis)
        narrow, _, s = compress([{"method": "hidden", "share": 0.5}])
        rows.append(
            measure(narrow, group="narrow", setting="half hidden: teacher init, no training", compress_seconds=s)
        )
        kd = {**KD, "steps": args.student_steps, "lr": args.student_lr}
        narrow, reports, _ = compress([kd], narrow)
        rows.append(
            measure(narrow, group="narrow", setting="half hidden: teacher init + distill (KL)", **training_of(reports))
        )
    if (
        "recovery" in only or "lowrank" in only or "qat" in only
    ):  # QAT at 3 bits is compared with the GPTQ w3 recovery rows
        recover = {**KD, "steps": args.recovery_steps, "lr": lr}
        settings = [
            ("GPTQ w3 g128", {"method": "gptq", "bits": 3, "group_size": 128}),
            ("SparseGPT 50%", {"method": "sparsegpt", "sparsity": 0.5}),
            ("structured 25% (uniform)", {"method": "structured", "target": 0.25}),
        ]
        lowrank = [("low rank 20% (activation-aware SVD)", {"method": "lowrank", "target": 0.2})]
        chosen = (settings if "recovery" in only else []) + (lowrank if "lowrank" in only else [])
        for name, stage in chosen:
            model, _, s = compress([stage])
            rows.append(measure(model, group="recovery", setting=f"{name}", compress_seconds=s))
            model, reports, s = compress([recover], model)
            rows.append(measure(model, group="recovery", setting=f"{name} + distill", **training_of(reports)))
        if "qat" in only:
            for init in ("rtn", "gptq"):
                qat = {**KD, "steps": args.recovery_steps, "method": "qat", "bits": 3, "group_size": 128, "init": init}
                model, reports, _ = compress([qat])
                rows.append(measure(model, group="qat", setting=f"QAT w3 g128 (init {init})", **training_of(reports)))
    if "precision" in only:
        base, _, _ = compress([{"method": "sparsegpt", "sparsity": 0.5}])
        for precision in ("bf16", "fp32"):
            model, reports, _ = compress([{**KD, "steps": 60, "lr": lr, "precision": precision}], copy.deepcopy(base))
            rows.append(
                measure(
                    model, group="precision", setting=f"SparseGPT 50% + distill, {precision}", **training_of(reports)
                )
            )
    payload: dict[str, Any] = {"machine": machine(), "eval": eval_data.manifest.to_dict(), "rows": rows}
    if "resume" in only:
        payload["resume"] = resume_benchmark(args.threads)
    previous = keep_other_groups("distill", payload, list(only), GROUP_ORDER)
    if "resume" not in only and "resume" in previous:
        payload["resume"] = previous["resume"]
    write_results("distill", payload, _table(payload))


GROUP_ORDER = ["teacher", "student", "narrow", "recovery", "qat", "precision"]


def student_rows(
    compress: Any, measure: Any, training_of: Any, windows: torch.Tensor, steps: int, lr: float
) -> list[dict[str, Any]]:
    """The half-size student: untrained, cross-entropy fine-tuned, from scratch, distilled."""
    rows = []
    pruned, _, s = compress([HALF])
    rows.append(measure(pruned, group="student", setting="half: teacher init, no training", compress_seconds=s))
    distilled, reports, _ = compress([{**KD, "steps": steps, "lr": lr}], copy.deepcopy(pruned))
    rows.append(
        measure(distilled, group="student", setting="half: teacher init + distill (KL)", **training_of(reports))
    )
    for name, model, peak in (
        ("half: teacher init + cross-entropy", copy.deepcopy(pruned), lr),
        ("half: from scratch, cross-entropy", scratch_copy(pruned), 2e-3),
    ):
        cfg = TrainConfig(steps=steps, batch_size=16, lr=peak, eval_every=10**6, weight_decay=0.0)
        model.float().train()

        def ce(ids: torch.Tensor, m: torch.nn.Module = model) -> tuple[torch.Tensor, dict[str, float]]:
            return m(input_ids=ids, labels=ids, use_cache=False).loss, {}

        r = train(dict(model.named_parameters()), ce, windows, cfg)
        model.eval().to(torch.bfloat16)
        for p in model.parameters():
            p.requires_grad_(False)
        rows.append(
            measure(model, group="student", setting=f"{name}", train_tokens=r.tokens, train_seconds=r.seconds, lr=peak)
        )
    return rows


def scratch_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture with fresh random weights (the model's own initialisation)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model.config).to(torch.bfloat16)


# ---- resume --------------------------------------------------------------------------------------

RESUME = {**KD, "method": "distill", "steps": 40, "eval_every": 10, "lr": 1e-3}


def resume_worker(teacher: Any, tok: Any, calib: Any, train_data: Any, run_dir: Path, out: Path) -> None:
    """One training process: distill a SparseGPT-50% copy with checkpoints in ``run_dir``."""
    model = copy.deepcopy(teacher)
    ctx = Context(
        tokenizer=tok,
        device=torch.device("cpu"),
        calibration=lambda: calib,
        training=lambda: train_data,
        teacher=teacher,
    )
    ctx.work_dir = run_dir
    stages = [{"method": "sparsegpt", "sparsity": 0.5}, {**RESUME, "checkpoint_every": 5}]
    reports = run_stages(model, parse_recipe({"stages": stages}), ctx)
    ev = quality(model, split_windows(tok, "eval", 64).windows, reference=teacher, batch_size=16)
    out.write_text(json.dumps({"training": reports[1]["training"], "history": reports[1]["history"], **ev}))


def resume_benchmark(threads: int) -> dict[str, Any]:
    """Kill a training process with SIGKILL at a random step, resume it, compare with an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "benchmarks.distill", "--threads", str(threads), "--resume-worker"]
    with tempfile.TemporaryDirectory() as d:
        straight, broken = Path(d) / "straight", Path(d) / "broken"
        subprocess.run([*cmd, str(straight), f"{d}/straight.json"], check=True, env=env)
        proc = subprocess.Popen([*cmd, str(broken), f"{d}/broken.json"], env=env)
        kill_step = random.Random(int(time.time())).randint(8, 35)
        ckpt = broken / "distill" / "checkpoint" / "trainer.json"
        while proc.poll() is None:
            if ckpt.exists() and json.loads(ckpt.read_text())["step"] >= kill_step - kill_step % 5:
                break
            time.sleep(0.2)
        time.sleep(random.Random(kill_step).uniform(0, 3))  # die somewhere inside the next steps
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at = json.loads(ckpt.read_text())["step"]
        subprocess.run([*cmd, str(broken), f"{d}/broken.json"], check=True, env=env)
        a, b = json.loads(Path(f"{d}/straight.json").read_text()), json.loads(Path(f"{d}/broken.json").read_text())
    result = {
        "killed_after_checkpoint_step": at,
        "resumed_from": b["training"]["resumed_from"],
        "final_loss": {"uninterrupted": a["training"]["final_loss"], "resumed": b["training"]["final_loss"]},
        "perplexity": {"uninterrupted": a["perplexity"], "resumed": b["perplexity"]},
        "kl": {"uninterrupted": a["kl"], "resumed": b["kl"]},
    }
    print("resume:", result, flush=True)
    return result


def _row(rows: list[dict[str, Any]], setting: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["setting"] == setting), None)


def _closed(before: dict[str, Any] | None, after: dict[str, Any] | None, teacher: dict[str, Any]) -> str:
    if before is None or after is None:
        return "not run"
    share = (before["perplexity"] - after["perplexity"]) / (before["perplexity"] - teacher["perplexity"])
    return f"{before['perplexity']:.3f} -> {after['perplexity']:.3f}, closes {share:.0%} of the loss"


def summary(payload: dict[str, Any]) -> list[str]:
    """The issue's targets, computed from the rows."""
    rows = payload["rows"]
    t = rows[0]
    untrained = _row(rows, "half: teacher init, no training")
    out = ["", "Targets:", ""]
    kd, ce, scratch = (
        _row(rows, f"half: {s}")
        for s in ("teacher init + distill (KL)", "teacher init + cross-entropy", "from scratch, cross-entropy")
    )
    if untrained and kd and ce and scratch:
        ppl0, ppl_t = untrained["perplexity"], t["perplexity"]
        out.append(
            f"- Half-size student (50% of non-embedding parameters, {untrained['parameters'] / t['parameters']:.0%} "
            f"of all): distilled {kd['perplexity']:.3f} beats cross-entropy fine-tuning {ce['perplexity']:.3f} and "
            f"training from scratch {scratch['perplexity']:.3f} on the same {kd['train_tokens'] / 1e6:.2f}M tokens; "
            f"distillation closes {(ppl0 - kd['perplexity']) / (ppl0 - ppl_t):.1%} of the teacher-to-student gap "
            f"({ppl0:.3f} -> {kd['perplexity']:.3f}, teacher {ppl_t:.3f}); cross-entropy closes "
            f"{(ppl0 - ce['perplexity']) / (ppl0 - ppl_t):.1%}."
        )
    for name in ("GPTQ w3 g128", "SparseGPT 50%", "structured 25% (uniform)", "low rank 20% (activation-aware SVD)"):
        out.append(
            f"- Recovery after {name}: {_closed(_row(rows, name), _row(rows, name + ' + distill'), t)} (target: half)."
        )
    gptq, qat = _row(rows, "GPTQ w3 g128"), _row(rows, "QAT w3 g128 (init gptq)")
    if gptq and qat:
        out.append(
            f"- QAT at 3 bits (GPTQ start): {qat['perplexity']:.3f} vs post-training GPTQ {gptq['perplexity']:.3f} "
            f"(same packed format, {qat['bytes'] / 1e6:.2f} MB)."
        )
    bf16, fp32 = _row(rows, "SparseGPT 50% + distill, bf16"), _row(rows, "SparseGPT 50% + distill, fp32")
    if bf16 and fp32:
        ratio = (bf16["train_tokens"] / bf16["train_seconds"]) / (fp32["train_tokens"] / fp32["train_seconds"])
        out.append(
            f"- Mixed precision: bf16 autocast trains at {ratio:.2f}x "
            f"fp32's tokens/s on this CPU, final perplexity {bf16['perplexity']:.3f} vs {fp32['perplexity']:.3f}."
        )
    return out


def _table(payload: dict[str, Any]) -> str:
    rows = payload["rows"]
    teacher = rows[0]
    out = [
        "Distillation on the built-in model: held-out perplexity, KL and top-1 agreement against the teacher "
        f"(same {payload['eval'].get('windows')} windows), `python -m benchmarks.distill`. params: logical "
        "weights (kept weights of sparse layers) against the teacher's; tok/s includes the teacher's forward "
        "and the evaluations during training.",
        "",
    ]
    table = []
    for r in rows:
        table.append(
            [
                r["group"],
                r["setting"],
                f"{r['perplexity']:.3f}",
                f"{r.get('kl', 0):.4f}",
                f"{r.get('top1_agreement', 1):.3f}",
                f"{r['parameters'] / teacher['parameters']:.2f}",
                f"{r['bytes'] / 1e6:.2f}",
                f"{r.get('train_tokens', 0) / 1e6:.2f}",
                f"{r.get('train_seconds', 0):.0f}",
                f"{r['train_tokens'] / r['train_seconds']:.0f}" if r.get("train_seconds") else "",
            ]
        )
    out.append(
        markdown_table(
            ["group", "setting", "ppl", "KL", "top-1", "params", "MB", "train Mtok", "train s", "tok/s"], table
        )
    )
    if "resume" in payload:
        r = payload["resume"]
        out += [
            "",
            f"Resume: killed (SIGKILL) after the checkpoint of step {r['killed_after_checkpoint_step']}, resumed from "
            f"step {r['resumed_from']}: final loss {r['final_loss']['resumed']:.5f} vs "
            f"{r['final_loss']['uninterrupted']:.5f} uninterrupted; perplexity {r['perplexity']['resumed']:.4f} "
            f"vs {r['perplexity']['uninterrupted']:.4f}.",
        ]
    return "\n".join(out + summary(payload))


if __name__ == "__main__":
    main()
