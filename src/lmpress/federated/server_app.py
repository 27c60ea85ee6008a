"""The Flower ServerApp of a federated recovery stage (Flower's Message API); its clients run
`lmpress.federated.client_app`.

Run configuration (the same for server and clients; `flwr run ... --run-config`):
``lmpress-config`` (the stage's `FederatedConfig`, `lmpress.federated.core.encode_config`), ``model-dir`` and
``teacher-dir`` (the server's copies), ``out-dir`` (where the server keeps the global parameters after
every round, ``global.safetensors``, and the rounds, ``rounds.json``; a restarted server resumes from
them), ``round-timeout`` and ``join-timeout`` (seconds).

Per round the server sends the global trainable parameters to every connected client (at least
``min_clients``), each client measures them on its held-out text, trains ``local_steps`` and
replies with its parameters, its token count and its losses; the server aggregates and records
the round. Clients that fail or time out are logged and left out while ``min_clients`` replied.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from safetensors.torch import load_file, save_file

from lmpress.federated.core import Aggregator, FederatedConfig, decode_config, load_student, round_lr, weighted_mean

app = ServerApp()


def _wait_for_clients(grid: Grid, n: int, timeout: float) -> list[int]:
    t0 = time.monotonic()
    while len(ids := list(grid.get_node_ids())) < n:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {len(ids)} of the {n} clients min_clients asks for connected in {timeout:.0f} s")
        time.sleep(0.5)
    return ids


def _save(out: Path, state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """The global parameters and the rounds so far, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in state.items()}, str(out / "global.safetensors.tmp"))
    (out / "global.safetensors.tmp").replace(out / "global.safetensors")
    (out / "rounds.json.tmp").write_text(json.dumps(record, indent=2))
    (out / "rounds.json.tmp").replace(out / "rounds.json")


def _resume(out: Path, fp: str, config: FederatedConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The last completed round of an earlier run of the same federation, if any."""
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


@dataclass
class _Round:
    """What the server learned from one round: the clients' token-weighted mean, their metrics, failures."""

    mean: dict[str, torch.Tensor] | None
    replies: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # (client, its metrics)
    errors: list[str] = field(default_factory=list)


class _Metered:
    """The grid, counting the payload bytes sent to and received from every node."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.down: Counter[int] = Counter()
        self.up: Counter[int] = Counter()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for m in messages:
            self.down[m.metadata.dst_node_id] += _payload(m.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if not r.has_error():
                self.up[r.metadata.src_node_id] += _payload(r.content)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _payload(content: RecordDict) -> int:
    """Bytes of a message's records: arrays as serialized, 8 per number, strings and bytes by length."""
    n = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    records: list[Any] = [*content.config_records.values(), *content.metric_records.values()]
    for rec in records:
        for v in rec.values():
            n += sum(len(x) if isinstance(x, bytes | str) else 8 for x in (v if isinstance(v, list) else [v]))
    return n


def _plain_round(grid: _Metered, nodes: list[int], state: dict[str, torch.Tensor], settings: ConfigRecord,
                 timeout: float) -> _Round:  # fmt: skip
    """Every client's parameters reach the server, which averages them."""
    messages = [
        Message(RecordDict({"arrays": ArrayRecord(state), "config": settings}), dst_node_id=n, message_type="train")
        for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=timeout)
    good = [r for r in replies if not r.has_error()]
    out = _Round(None, errors=[_last_line(r.error.reason) for r in replies if r.has_error()])
    if good:
        states = [dict(r.content.array_records["arrays"].to_torch_state_dict()) for r in good]
        out.replies = [(_name(r), _numbers(r.content.metric_records["metrics"])) for r in good]
        out.mean = weighted_mean(states, [m["tokens"] for _, m in out.replies])
    return out


class _Node:  # what Flower's legacy workflows need of a client proxy
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _OneRound(Strategy):
    """The legacy strategy SecAgg+'s workflow drives: it offers the round's instructions to the
    given nodes and keeps the aggregate (the only parameters the server ever sees)."""

    def __init__(self, nodes: list[int], fitins: FitIns) -> None:
        self.nodes, self.fitins = nodes, fitins
        self.parameters: Parameters | None = None
        self.results: list[tuple[Any, FitRes]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return [(_Node(n), self.fitins) for n in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        self.results, self.failures = results, failures
        self.parameters = results[0][1].parameters if results else None  # every result carries the aggregate
        return self.parameters, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def _secure_round(grid: _Metered, context: Context, config: FederatedConfig, rnd: int, nodes: list[int],
                  state: dict[str, torch.Tensor], settings: ConfigRecord, timeout: float) -> _Round:  # fmt: skip
    """Flower's SecAgg+ (Bell et al. 2020): the clients' parameters arrive masked, and only their
    token-weighted mean can be unmasked, from the shares of at least ``secagg_threshold`` of them."""
    names = list(state)
    parameters = ndarrays_to_parameters([state[n].numpy() for n in names])
    strategy = _OneRound(nodes, FitIns(parameters, dict(settings)))  # type: ignore[arg-type]
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=config.rounds), strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd, Key.START_TIME: 0.0})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, keep_input=True)
    # every value a client sends must lie in the clipping range; noise widens it
    bound = max(float(t.abs().max()) for t in state.values()) * 4 + 1.0
    if config.dp is not None:
        bound += 6 * config.dp.noise_std()
    tokens = config.local_steps * config.train.batch_size * config.seq_len  # at most, per client and round
    workflow = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=config.secagg_threshold, max_weight=float(tokens),
        clipping_range=max(8.0, bound), timeout=timeout,
    )  # fmt: skip
    workflow(grid, legacy)  # type: ignore[arg-type]
    errors = [_last_line(getattr(e.args[0], "reason", str(e)) if e.args else str(e)) for e in strategy.failures
              if isinstance(e, BaseException)]  # fmt: skip
    out = _Round(None, errors=errors)
    for _, res in strategy.results:
        metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, int | float)}
        out.replies.append((str(res.metrics.get("name", "")), {**metrics, "tokens": float(res.num_examples)}))
    if strategy.parameters is None:
        out.replies = []
        out.errors.append("SecAgg+ stopped: fewer than secagg_threshold of the clients completed its four stages")
    else:
        arrays = parameters_to_ndarrays(strategy.parameters)
        out.mean = {n: torch.from_numpy(np.asarray(a, dtype=np.float32)).reshape(state[n].shape)
                    for n, a in zip(names, arrays, strict=True)}  # fmt: skip
    return out


@app.main()
def server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    config = decode_config(str(rc["lmpress-config"]))
    out = Path(str(rc["out-dir"]))
    timeout = float(rc.get("round-timeout", 600.0))
    student, fp, _ = load_student(str(rc["model-dir"]), str(rc["teacher-dir"]), config)
    state = student.state()
    record: dict[str, Any] = {"fingerprint": fp, "config": config.model_dump(mode="json"), "rounds": []}
    resumed = _resume(out, fp, config)
    if resumed is not None:
        state, record = resumed
        log(INFO, "resuming after round %d", len(record["rounds"]))
    aggregate = Aggregator(config.aggregation, config.server_lr, step=config.server_step)
    _wait_for_clients(grid, config.min_clients, float(rc.get("join-timeout", timeout)))
    for rnd in range(len(record["rounds"]) + 1, config.rounds + 1):
        t0 = time.monotonic()
        nodes = _wait_for_clients(grid, config.min_clients, timeout)
        settings = ConfigRecord({"server-round": rnd, "lr": round_lr(config, rnd), "fingerprint": fp})
        metered = _Metered(grid)
        if config.secure_aggregation:
            result = _secure_round(metered, context, config, rnd, nodes, state, settings, timeout)
        else:
            result = _plain_round(metered, nodes, state, settings, timeout)
        for reason in result.errors:
            log(WARNING, "round %d: a client failed: %s", rnd, reason)
        if result.mean is None or len(result.replies) < config.min_clients:
            reasons = "; ".join(result.errors)
            raise RuntimeError(
                f"round {rnd}: {len(result.replies)} of {len(nodes)} clients replied, fewer than min_clients "
                f"{config.min_clients}" + (f" ({reasons})" if reasons else "")
            )
        state = aggregate(state, result.mean)
        record["rounds"].append(_round_record(rnd, len(nodes), result, metered, time.monotonic() - t0))
        _save(out, state, record)
        clients = record["rounds"][-1]["clients"]
        log(INFO, "round %d: %d clients, held-out loss %s", rnd, len(clients),
            " ".join(f"{c['name']} {c['held_out_loss']:.4f}" for c in clients))  # fmt: skip
    record["final_held_out_loss"] = _final_losses(grid, config, state, fp, timeout)
    record["status"] = "completed"
    _save(out, state, record)


def _round_record(rnd: int, n_nodes: int, result: _Round, metered: _Metered, seconds: float) -> dict[str, Any]:
    """One round as ``rounds.json`` keeps it: every client that replied, failures, bytes, time."""
    clients = [
        {
            "name": name,
            "tokens": int(m["tokens"]),
            "global_held_out_loss": float(m["held-out-before"]),  # the global model of the previous round
            "held_out_loss": float(m["held-out-after"]),  # after its local steps, on its own text
            "train_loss": float(m["train-loss"]),
            "update_norm": float(m.get("update-norm", "nan")),  # not sent under DP
        }
        for name, m in result.replies
    ]
    clients.sort(key=lambda c: str(c["name"]))
    return {
        "round": rnd,
        "clients": clients,
        "failed": n_nodes - len(result.replies),  # errors and clients that did not answer in time
        "bytes_down": sum(metered.down.values()),  # all clients together, every stage of the round
        "bytes_up": sum(metered.up.values()),
        "seconds": seconds,
    }


def _final_losses(
    grid: Grid, config: FederatedConfig, state: dict[str, torch.Tensor], fp: str, timeout: float
) -> dict[str, float]:
    """The final global model on every client's held-out text, by client."""
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
    return dict(sorted(final.items()))
