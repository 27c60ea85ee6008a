"""Federated recovery on Flower against centralized recovery and against each client alone.

    python -m benchmarks.federated [--threads 2] [--rounds 5] [--local-steps 10] [--eval-windows 64]
                                   [--dp-clip 1.0] [--dp-epsilon 10000] [--table-only]

The built-in model quantized to 4 bits (RTN, groups of 128) is the student, its bf16 original the
teacher. The stdlib *training* text is split into three clients by top-level package (``web``:
asyncio, email, http, ..., ``tools``: idlelib, tkinter, unittest, ..., ``runtime``: importlib, re,
collections, encodings, ...): non-identical data, as federated data is. Each client holds out
its own documents (its split of its directory); the stdlib *evaluation* split (mostly top-level
modules, which no client holds) measures what the recovery does to everything else.

Rows, all LoRA rank 8 on the frozen 4-bit codes at the same peak learning rate, each evaluated by
KL to the teacher and perplexity on every client's held-out text and on the stdlib evaluation split:

- no recovery;
- centralized: ``distill`` on the pooled training text of the three clients, as many optimizer
  steps (of the same batch size) as the three clients take together in the federation;
- federated (FedAvg over a real loopback Flower federation: SuperLink, three SuperNodes, one
  process per client message), ``rounds`` x ``local_steps``; and the same with a server step of 3
  (the global model moves 3x the clients' mean change: server SGD, Reddi et al. 2021);
- local only: each client distilling alone on its own text, as many steps as it takes in the federation;
- federated with SecAgg+, and with local DP (one noise level): their cost in quality and time;
- bytes per round: LoRA adapters against every float parameter trainable (``lora_rank: 0``: the
  quantization scales, norms and embeddings), measured on the wire by the server.

Closed share = (KL without recovery - KL) / (KL without recovery - KL centralized), on the stdlib
evaluation split and on the clients' held-out text (mean over clients).

Writes ``benchmarks/results/federated.json`` and the ``federated`` table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, machine, markdown_table, split_windows, write_results
from lmpress.data import Manifest, TokenData, select_split
from lmpress.evaluation import quality
from lmpress.federated.core import client_data
from lmpress.io.load import load_model
from lmpress.method import Context
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe
from lmpress.sources import load_documents

CLIENTS = {
    "web": ["asyncio", "email", "http", "urllib", "xmlrpc", "html", "wsgiref", "xml", "json", "concurrent",
            "multiprocessing"],
    "tools": ["idlelib", "tkinter", "turtledemo", "curses", "unittest", "lib2to3", "distutils", "logging"],
    "runtime": ["importlib", "re", "collections", "ctypes", "tomllib", "dbm", "sqlite3", "zoneinfo", "ensurepip",
                "encodings"],
}  # fmt: skip
BASE = {"method": "rtn", "bits": 4, "group_size": 128}
LORA = {"lora_rank": 8, "lr": 1e-3, "batch_size": 8}
SEQ_LEN = 256


def write_clients(root: Path) -> list[Path]:
    """Each client's directory: the stdlib training documents of its packages (paths flattened, so
    each client's own document split chooses its held-out files)."""
    docs = select_split(load_documents("stdlib"), "train")
    out = []
    for name, packages in CLIENTS.items():
        d = root / name
        d.mkdir(parents=True)
        for doc in docs:
            if doc.path.split("/")[0] in packages and "/" in doc.path:
                (d / doc.path.replace("/", "_")).write_text(doc.text)
        out.append(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--eval-windows", type=int, default=64)  # stdlib evaluation split
    ap.add_argument("--client-eval-windows", type=int, default=32)
    ap.add_argument("--dp-clip", type=float, default=1.0)
    ap.add_argument("--dp-epsilon", type=float, default=1e4)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="only FedAvg's variants at equal steps: federated_sweep")
    ap.add_argument("--schedules", default="5x10,10x5", help="--sweep: ROUNDSxLOCAL_STEPS, comma-separated")
    ap.add_argument("--client-lrs", default="", help="--sweep: also these client learning rates (first schedule)")
    ap.add_argument("--only-lrs", action="store_true", help="--sweep: only the --client-lrs rows (and the baseline "
                    "rows): federated_lr")  # fmt: skip
    args = ap.parse_args()
    if args.table_only:
        payload = json.loads((RESULTS / "federated.json").read_text())
        write_results("federated", payload, _table(payload))
        for name in ("federated_sweep", "federated_lr"):
            if (RESULTS / f"{name}.json").exists():
                sweep = json.loads((RESULTS / f"{name}.json").read_text())
                write_results(name, sweep, _sweep_table(sweep))
        return
    torch.set_num_threads(args.threads)
    loaded = load_model("builtin")
    teacher, tok = loaded.model, loaded.tokenizer
    teacher.eval()
    work = Path(tempfile.mkdtemp(prefix="lmpress-bench-federated-"))
    try:
        if args.sweep:
            sweep = run_sweep(args, teacher, tok, work)
            name = "federated_lr" if args.only_lrs else "federated_sweep"
            write_results(name, sweep, _sweep_table(sweep))
            return
        payload = run(args, teacher, tok, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "federated.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")  # before the table
    write_results("federated", payload, _table(payload))


def run(args: argparse.Namespace, teacher: torch.nn.Module, tok: Any, work: Path) -> dict[str, Any]:
    clients = write_clients(work / "clients")
    data = {c.name: client_data(tok, c, SEQ_LEN, args.client_eval_windows) for c in clients}
    stdlib_eval = split_windows(tok, "eval", args.eval_windows)
    pooled = torch.cat([d.train for d in data.values()])
    steps = args.rounds * args.local_steps  # per client
    calib = split_windows(tok, "calib", 16)  # distill's validation windows (unused: no evaluation in between)

    def ctx(train: torch.Tensor | None = None, name: str = "") -> Context:
        manifest = Manifest("clients", name or "pooled", 0, 0, "", int(train.numel()) if train is not None else None)
        return Context(
            tokenizer=tok, device=torch.device("cpu"), teacher=teacher, clients=clients, work_dir=work / "runs",
            training=(lambda: TokenData(train, manifest)) if train is not None else None, calibration=lambda: calib,
        )  # fmt: skip

    base = copy.deepcopy(teacher)
    run_stages(base, parse_recipe({"stages": [BASE]}), ctx())

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        out = {"stdlib_eval": quality(model, stdlib_eval.windows, reference=teacher, batch_size=16)}
        for name, d in data.items():
            out[name] = quality(model, d.held_out, reference=teacher, batch_size=16)
        return out

    def row(setting: str, model: torch.nn.Module, seconds: float = 0.0, **extra: Any) -> dict[str, Any]:
        r = {"setting": setting, "seconds": round(seconds, 1), "eval": evaluate(model), **extra}
        kls = " ".join(f"{k} {v['kl']:.4f}" for k, v in r["eval"].items())
        print(f"{setting:40s} {kls} {seconds:.0f}s", flush=True)
        return r

    def federated(stage: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any], float]:
        model = copy.deepcopy(base)
        shutil.rmtree(work / "runs", ignore_errors=True)
        t0 = time.perf_counter()
        (report,) = run_stages(model, parse_recipe({"stages": [stage]}), ctx())
        return model, report, time.perf_counter() - t0

    def distill(train: torch.Tensor, n: int, name: str) -> tuple[torch.nn.Module, float]:
        model = copy.deepcopy(base)
        stage = {"method": "distill", **LORA, "steps": n, "eval_every": n + 1, "keep_best": False}
        t0 = time.perf_counter()
        run_stages(model, parse_recipe({"stages": [stage]}), ctx(train, name))
        return model, time.perf_counter() - t0

    fed_stage = {"method": "federated", "train": LORA, "rounds": args.rounds, "local_steps": args.local_steps,
                 "min_clients": 3, "seq_len": SEQ_LEN, "eval_windows": 16}  # fmt: skip
    rows = [row("no recovery (RTN W4 g128)", base)]
    model, seconds = distill(pooled, 3 * steps, "pooled")
    rows.append(row("centralized distill, pooled text", model, seconds, steps=3 * steps))
    model, report, seconds = federated(fed_stage)
    rounds = report["rounds"]
    rows.append(row("federated FedAvg", model, seconds, steps=3 * steps, bytes_per_round=report["bytes_per_round"]))
    model, report, seconds = federated({**fed_stage, "server_step": 3.0})
    rows.append(row("federated FedAvg, server step 3", model, seconds, steps=3 * steps,
                    bytes_per_round=report["bytes_per_round"]))  # fmt: skip
    rounds_step3 = report["rounds"]
    for name in data:
        model, seconds = distill(data[name].train, steps, name)
        rows.append(row(f"local only: {name}", model, seconds, steps=steps, client=name))
    model, report, seconds = federated({**fed_stage, "secure_aggregation": True})
    rows.append(row("federated FedAvg + SecAgg+", model, seconds, steps=3 * steps,
                    bytes_per_round=report["bytes_per_round"]))  # fmt: skip
    dp = {"clip": args.dp_clip, "epsilon": args.dp_epsilon}
    model, report, seconds = federated({**fed_stage, "dp": dp})
    rows.append(row("federated FedAvg + local DP", model, seconds, steps=3 * steps,
                    bytes_per_round=report["bytes_per_round"], privacy=report["privacy"]))  # fmt: skip
    # every float parameter trainable: one round of one step, for its bytes
    _, full, _ = federated({**fed_stage, "train": {**LORA, "lora_rank": 0}, "rounds": 1, "local_steps": 1})
    config = {"rounds": args.rounds, "local_steps": args.local_steps, "base": BASE, "lora": LORA,
              "clients": CLIENTS, "seq_len": SEQ_LEN}  # fmt: skip
    held = {n: {"train_windows": int(d.train.shape[0]), "held_out_windows": int(d.held_out.shape[0]),
                "sha256": d.sha256} for n, d in data.items()}  # fmt: skip
    return {
        "machine": machine(),
        "config": config,
        "eval": stdlib_eval.manifest.to_dict(),
        "clients": held,
        "rows": rows,
        "fedavg_rounds": rounds,
        "server_step3_rounds": rounds_step3,
        "full_trainable_bytes_per_round": full["bytes_per_round"],
        "lora_bytes_per_round": rows[2]["bytes_per_round"],
    }


def run_sweep(args: argparse.Namespace, teacher: torch.nn.Module, tok: Any, work: Path) -> dict[str, Any]:
    """FedAvg at the same total optimizer steps in other shapes: more rounds of fewer local steps
    (less client drift, more transport), and LoRA with A frozen (exact aggregation of B A)."""
    clients = write_clients(work / "clients")
    data = {c.name: client_data(tok, c, SEQ_LEN, args.client_eval_windows) for c in clients}
    stdlib_eval = split_windows(tok, "eval", args.eval_windows)
    pooled = torch.cat([d.train for d in data.values()])
    schedules = [tuple(int(x) for x in s.split("x")) for s in args.schedules.split(",")]
    steps = schedules[0][0] * schedules[0][1]
    if any(r * s != steps for r, s in schedules):
        raise SystemExit(f"--schedules must all take {steps} local steps per client")
    calib = split_windows(tok, "calib", 16)

    def ctx(train: torch.Tensor | None = None) -> Context:
        manifest = Manifest("clients", "pooled", 0, 0, "", int(train.numel()) if train is not None else None)
        return Context(
            tokenizer=tok, device=torch.device("cpu"), teacher=teacher, clients=clients, work_dir=work / "runs",
            training=(lambda: TokenData(train, manifest)) if train is not None else None, calibration=lambda: calib,
        )  # fmt: skip

    base = copy.deepcopy(teacher)
    run_stages(base, parse_recipe({"stages": [BASE]}), ctx())
    rows = []

    def row(setting: str, stage: dict[str, Any] | None, train: torch.Tensor | None = None, **extra: Any) -> None:
        model = copy.deepcopy(base)
        shutil.rmtree(work / "runs", ignore_errors=True)
        t0 = time.perf_counter()
        report = run_stages(model, parse_recipe({"stages": [stage]}), ctx(train))[0] if stage else {}
        seconds = time.perf_counter() - t0
        ev = {"stdlib_eval": quality(model, stdlib_eval.windows, reference=teacher, batch_size=16)}
        for name, d in data.items():
            ev[name] = quality(model, d.held_out, reference=teacher, batch_size=16)
        r = {"setting": setting, "seconds": round(seconds, 1), "eval": ev, **extra}
        if "bytes_per_round" in report:
            r["bytes_per_round"] = report["bytes_per_round"]
        rows.append(r)
        print(
            f"{setting:44s} " + " ".join(f"{k} {v['kl']:.4f}" for k, v in ev.items()) + f" {seconds:.0f}s", flush=True
        )

    row("no recovery (RTN W4 g128)", None)
    distill = {"method": "distill", **LORA, "steps": 3 * steps, "eval_every": 3 * steps + 1, "keep_best": False}
    row("centralized distill, pooled text", distill, pooled, steps=3 * steps)
    fed = {"method": "federated", "train": LORA, "min_clients": 3, "seq_len": SEQ_LEN, "eval_windows": 16}
    rounds, local = schedules[0]
    for lr in [float(x) for x in args.client_lrs.split(",") if x]:
        row(f"centralized distill, lr {lr:g}", {**distill, "lr": lr}, pooled, steps=3 * steps, lr=lr, central=True)
        row(f"FedAvg {rounds} x {local}, client lr {lr:g}", {**fed, "rounds": rounds, "local_steps": local,
            "train": {**LORA, "lr": lr}}, steps=3 * steps, rounds=rounds, local_steps=local, lr=lr)  # fmt: skip
    if args.only_lrs:  # a table of its own, on this run's baseline rows
        return {"machine": machine(), "config": {"base": BASE, "lora": LORA, "clients": CLIENTS, "seq_len": SEQ_LEN,
                "steps_per_client": steps}, "eval": stdlib_eval.manifest.to_dict(), "rows": rows}  # fmt: skip
    for rounds, local in schedules:
        row(f"FedAvg {rounds} rounds x {local} steps", {**fed, "rounds": rounds, "local_steps": local},
            steps=3 * steps, rounds=rounds, local_steps=local)  # fmt: skip
    rounds, local = schedules[0]
    row(f"FedAvg {rounds} x {local}, LoRA A frozen", {**fed, "rounds": rounds, "local_steps": local,
        "freeze_lora_a": True}, steps=3 * steps, rounds=rounds, local_steps=local)  # fmt: skip
    rounds, local = schedules[-1]
    if (rounds, local) != schedules[0]:
        row(f"FedAvg {rounds} x {local}, LoRA A frozen", {**fed, "rounds": rounds, "local_steps": local,
            "freeze_lora_a": True}, steps=3 * steps, rounds=rounds, local_steps=local)  # fmt: skip
    return {"machine": machine(), "config": {"base": BASE, "lora": LORA, "clients": CLIENTS, "seq_len": SEQ_LEN,
            "steps_per_client": steps}, "eval": stdlib_eval.manifest.to_dict(), "rows": rows}  # fmt: skip


def _sweep_table(p: dict[str, Any]) -> str:
    rows = p["rows"]
    names = [k for k in rows[0]["eval"] if k != "stdlib_eval"]
    header = ["setting", "KL stdlib eval", *[f"KL {n}" for n in names], "closed (stdlib)", "closed (clients)",
              "MB up per round", "seconds"]  # fmt: skip
    centrals = {r["lr"]: r for r in rows if r.get("central")}

    def closed(r: dict[str, Any], keys: list[str]) -> str:
        text = f"{_closed(rows, r, keys):.0%}"
        same = centrals.get(r.get("lr")) if not r.get("central") else None
        return text + (f" ({_closed([rows[0], same], r, keys):.0%} of its lr's)" if same else "")

    body = [
        [r["setting"], f"{r['eval']['stdlib_eval']['kl']:.4f}", *[f"{r['eval'][n]['kl']:.4f}" for n in names],
         closed(r, ["stdlib_eval"]), closed(r, names),
         f"{r['bytes_per_round']['up'] / 1e6:.2f}" if "bytes_per_round" in r else "-", f"{r['seconds']:.0f}"]
        for r in rows
    ]  # fmt: skip
    steps = p["config"]["steps_per_client"]
    return "\n".join([
        f"FedAvg at {steps} local optimizer steps per client in other shapes (one run: its own no-recovery and "
        "centralized rows): more rounds of fewer steps, and LoRA with A frozen at its seeded start (FFA-LoRA: the "
        "mean of the clients' B A is the mean B times A, and only B travels), or a larger client learning rate. "
        "`python -m benchmarks.federated --sweep` (`--only-lrs --client-lrs 2e-3,3e-3`: the learning-rate table).",
        "",
        markdown_table(header, body),
        "",
    ])  # fmt: skip


def _closed(rows: list[dict[str, Any]], r: dict[str, Any], keys: list[str]) -> float:
    none, central = rows[0], rows[1]

    def kl(x: dict[str, Any]) -> float:
        return sum(x["eval"][k]["kl"] for k in keys) / len(keys)

    return (kl(none) - kl(r)) / (kl(none) - kl(central))


def _table(p: dict[str, Any]) -> str:
    rows = p["rows"]
    names = list(p["clients"])
    header = ["setting", "KL stdlib eval", "ppl stdlib eval", *[f"KL {n}" for n in names],
              "closed (stdlib)", "closed (clients)", "seconds"]  # fmt: skip
    body = []
    for r in rows:
        e = r["eval"]
        body.append(
            [r["setting"], f"{e['stdlib_eval']['kl']:.4f}", f"{e['stdlib_eval']['perplexity']:.3f}",
             *[f"{e[n]['kl']:.4f}" for n in names],
             f"{_closed(rows, r, ['stdlib_eval']):.0%}", f"{_closed(rows, r, names):.0%}", f"{r['seconds']:.0f}"]
        )  # fmt: skip
    c = p["config"]
    lines = [
        f"4-bit built-in model (RTN g128) recovered with LoRA rank 8; {c['rounds']} rounds x {c['local_steps']} "
        "local steps per client, 3 clients split by top-level package; centralized and federated take the same "
        "number of optimizer steps in all. KL to the bf16 teacher; *closed* is the share of the KL that "
        "centralized recovery removes which this row removes.",
        "",
        markdown_table(header, body),
        "",
    ]
    local = [r for r in rows if r.get("client")]
    feds = [r for r in rows if r["setting"].startswith("federated FedAvg") and "+" not in r["setting"]]
    others = [["model", *[f"KL {n}" for n in names]]]
    lines.append("Each client's own model against the federated one, on the clients' held-out text (the other "
                 "clients' text is what local training never sees):")  # fmt: skip
    lines.append("")
    lines.append(
        markdown_table(
            others[0],
            [[r["setting"], *[f"{r['eval'][n]['kl']:.4f}" + (" (own)" if n == r.get("client") else "") for n in names]]
             for r in [*local, *feds]],
        )
    )  # fmt: skip
    lora, full = p["lora_bytes_per_round"], p["full_trainable_bytes_per_round"]
    sec = next(r for r in rows if "SecAgg" in r["setting"])
    dp = next(r for r in rows if "DP" in r["setting"])
    priv = dp["privacy"]["dp"]
    lines += [
        "",
        markdown_table(
            ["bytes per round (3 clients)", "down", "up"],
            [
                ["LoRA rank 8 adapters", f"{lora['down']:,}", f"{lora['up']:,}"],
                ["every float parameter (lora_rank 0)", f"{full['down']:,}", f"{full['up']:,}"],
                ["LoRA + SecAgg+ (masked vectors, keys, shares)", f"{sec['bytes_per_round']['down']:,}",
                 f"{sec['bytes_per_round']['up']:,}"],
            ],
        ),
        "",
        f"Local DP: clip {priv['clip']}, noise std {priv['noise_std']:.2e} per parameter, "
        f"(epsilon, delta) = ({priv['epsilon_per_round']:g}, {priv['delta_per_round']:g}) per round, "
        f"({priv['epsilon']:g}, {priv['delta']:g}) over the rounds by basic composition. At three clients "
        "and a few hundred thousand adapter parameters a meaningful epsilon (under 10) adds noise far larger "
        "than the update; this row shows the mechanism's cost, not a privacy level to rely on.",
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
