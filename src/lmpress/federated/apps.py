"""The Flower ServerApp and ClientApp of a federated recovery stage (Flower's Message API).

Run configuration (the same for server and clients; `flwr run ... --run-config`):
``lmpress-config`` (the stage's `FederatedConfig`, JSON in url-safe base64), ``model-dir`` and ``teacher-dir`` (the
server's copies), ``out-dir`` (where the server keeps the global parameters after every round,
``global.safetensors``, and the rounds, ``rounds.json``; a restarted server resumes from them),
``round-timeout`` (seconds). Node configuration of each SuperNode (`flower-supernode
--node-config`): ``data-dir`` (its text, which never leaves it), ``model-dir`` and ``teacher-dir``
(its copies of the same models; checked against the server's by fingerprint), ``name``.

Per round the server sends the global trainable parameters to every connected client (at least
``min_clients``), each client measures them on its held-out text, trains ``local_steps`` and
replies with its parameters, its token count and its losses; the server aggregates and records
the round. Clients that fail or time out are logged and left out while ``min_clients`` replied.
"""

from __future__ import annotations

import base64
import json
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from lmpress.federated.core import (
    Aggregator,
    FederatedConfig,
    Student,
    client_data,
    fingerprint_model,
    nbytes,
    round_lr,
)

server = ServerApp()
client = ClientApp()


def load_student(model_dir: str, teacher_dir: str, config: FederatedConfig) -> tuple[Student, str, Any]:
    """The compressed model made trainable, its fingerprint (taken before) and its tokenizer."""
    import lmpress
    from lmpress.registry import Context as StageContext

    loaded = lmpress.load(model_dir, device="cpu")
    fp = fingerprint_model(loaded.model, loaded.tokenizer)
    teacher = lmpress.load(teacher_dir, device="cpu").model
    ctx = StageContext(tokenizer=loaded.tokenizer, device=torch.device("cpu"), teacher=teacher)
    return Student(loaded.model, config.train, ctx), fp, loaded.tokenizer


def encode_config(config: FederatedConfig) -> str:
    """The stage's config as one run-config value (Flower's run config has no quoting for JSON)."""
    return base64.urlsafe_b64encode(config.model_dump_json().encode()).decode()


def _config(context: Context) -> FederatedConfig:
    return FederatedConfig.model_validate_json(base64.urlsafe_b64decode(str(context.run_config["lmpress-config"])))


# ---- the server -----------------------------------------------------------------------------------


def _wait_for_clients(grid: Grid, n: int, timeout: float) -> list[int]:
    t0 = time.monotonic()
    while len(ids := list(grid.get_node_ids())) < n:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {len(ids)} of the {n} clients min_clients asks for connected in {timeout:.0f} s")
        time.sleep(0.5)
    return ids


def _save(out: Path, state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """The global parameters and the rounds so far, each replaced atomically."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in state.items()}, str(out / "global.safetensors.tmp"))
    (out / "global.safetensors.tmp").replace(out / "global.safetensors")
    (out / "rounds.json.tmp").write_text(json.dumps(record, indent=2))
    (out / "rounds.json.tmp").replace(out / "rounds.json")


def _resume(out: Path, fp: str, config: FederatedConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The last completed round of an earlier run of the same federation, if any."""
    from safetensors.torch import load_file

    if not (out / "rounds.json").is_file() or not (out / "global.safetensors").is_file():
        return None
    record = json.loads((out / "rounds.json").read_text())
    if record.get("fingerprint") != fp or record.get("config") != config.model_dump(mode="json"):
        return None
    return load_file(str(out / "global.safetensors")), record


def _name(reply: Message) -> str:
    info = reply.content.config_records.get("info")
    return str(info["name"]) if info is not None and info.get("name") else str(reply.metadata.src_node_id)


def _last_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "no reason given"


def _numbers(record: MetricRecord) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


@server.main()
def server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    config = _config(context)
    out = Path(str(rc["out-dir"]))
    timeout = float(rc.get("round-timeout", 600.0))
    student, fp, _ = load_student(str(rc["model-dir"]), str(rc["teacher-dir"]), config)
    state = student.state()
    record: dict[str, Any] = {"fingerprint": fp, "config": config.model_dump(mode="json"), "rounds": []}
    resumed = _resume(out, fp, config)
    if resumed is not None:
        state, record = resumed
        log(INFO, "resuming after round %d", len(record["rounds"]))
    aggregate = Aggregator(config.aggregation, config.server_lr)
    for rnd in range(len(record["rounds"]) + 1, config.rounds + 1):
        t0 = time.monotonic()
        nodes = _wait_for_clients(grid, config.min_clients, timeout)
        settings = ConfigRecord({"server-round": rnd, "lr": round_lr(config, rnd), "fingerprint": fp})
        down = nbytes(state)
        messages = [
            Message(RecordDict({"arrays": ArrayRecord(state), "config": settings}), dst_node_id=n, message_type="train")
            for n in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        good = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                log(WARNING, "round %d: client %s failed: %s", rnd, r.metadata.src_node_id, r.error.reason)
        if len(good) < config.min_clients:
            reasons = "; ".join(_last_line(r.error.reason) for r in replies if r.has_error())
            raise RuntimeError(
                f"round {rnd}: {len(good)} of {len(nodes)} clients replied, fewer than min_clients "
                f"{config.min_clients}" + (f" ({reasons})" if reasons else "")
            )
        states = [dict(r.content.array_records["arrays"].to_torch_state_dict()) for r in good]
        metrics = [_numbers(r.content.metric_records["metrics"]) for r in good]
        state = aggregate(state, states, [float(m["tokens"]) for m in metrics])
        clients = [
            {
                "name": _name(r),
                "tokens": int(m["tokens"]),
                "global_held_out_loss": float(m["held-out-before"]),  # the global model of the previous round
                "held_out_loss": float(m["held-out-after"]),  # after its local steps, on its own text
                "train_loss": float(m["train-loss"]),
                "bytes_down": down,
                "bytes_up": nbytes(states[i]),
            }
            for i, (r, m) in enumerate(zip(good, metrics, strict=True))
        ]
        clients.sort(key=lambda c: str(c["name"]))
        failed = len(nodes) - len(good)  # errors and clients that did not answer in time
        record["rounds"].append({"round": rnd, "clients": clients, "failed": failed, "seconds": time.monotonic() - t0})
        _save(out, state, record)
        log(INFO, "round %d: %d clients, held-out loss %s", rnd, len(good),
            " ".join(f"{c['name']} {c['held_out_loss']:.4f}" for c in clients))  # fmt: skip
    # the final global model on every client's held-out text
    nodes = _wait_for_clients(grid, config.min_clients, timeout)
    settings = ConfigRecord({"fingerprint": fp})
    messages = [
        Message(RecordDict({"arrays": ArrayRecord(state), "config": settings}), dst_node_id=n, message_type="evaluate")
        for n in nodes
    ]
    final = {
        _name(r): _numbers(r.content.metric_records["metrics"])["held-out-loss"]
        for r in grid.send_and_receive(messages, timeout=timeout)
        if not r.has_error()
    }
    record["final_held_out_loss"] = dict(sorted(final.items()))
    record["status"] = "completed"
    _save(out, state, record)


# ---- a client -------------------------------------------------------------------------------------


def _client_setup(msg: Message, context: Context) -> tuple[FederatedConfig, Student, Any]:
    torch.set_num_threads(int(context.node_config.get("threads", 1)))
    nc = context.node_config
    config = _config(context)
    student, fp, tokenizer = load_student(str(nc["model-dir"]), str(nc["teacher-dir"]), config)
    server_fp = str(msg.content.config_records["config"]["fingerprint"])
    if fp != server_fp:
        raise ValueError(
            f"client {nc.get('name', '')}: its model or tokenizer differs from the server's (fingerprint {fp}, "
            f"server {server_fp}); give every client the same compressed model"
        )
    student.load(msg.content.array_records["arrays"].to_torch_state_dict())
    return config, student, tokenizer


def _info(context: Context) -> ConfigRecord:
    return ConfigRecord({"name": str(context.node_config.get("name", ""))})


@client.train()
def client_train(msg: Message, context: Context) -> Message:
    config, student, tokenizer = _client_setup(msg, context)
    data = client_data(tokenizer, Path(str(context.node_config["data-dir"])), config.seq_len, config.eval_windows)
    settings = msg.content.config_records["config"]
    before = student.loss(data.held_out)
    mu = config.prox_mu if config.aggregation == "fedprox" else 0.0
    lr, server_round = float(settings["lr"]), int(settings["server-round"])  # type: ignore[arg-type]
    train_loss, tokens = student.fit(data.train, config.local_steps, lr, seed=server_round, prox_mu=mu)
    after = student.loss(data.held_out)
    metrics = MetricRecord(
        {"tokens": tokens, "held-out-before": before, "held-out-after": after, "train-loss": train_loss}
    )
    content = RecordDict({"arrays": ArrayRecord(student.state()), "metrics": metrics, "info": _info(context)})
    return Message(content, reply_to=msg)


@client.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    config, student, tokenizer = _client_setup(msg, context)
    data = client_data(tokenizer, Path(str(context.node_config["data-dir"])), config.seq_len, config.eval_windows)
    metrics = MetricRecord({"held-out-loss": student.loss(data.held_out), "tokens": int(data.held_out.numel())})
    return Message(RecordDict({"metrics": metrics, "info": _info(context)}), reply_to=msg)
