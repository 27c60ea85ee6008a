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
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import FitIns, FitRes, Parameters
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from lmpress.federated.core import (
    Aggregator,
    FederatedConfig,
    Student,
    client_data,
    fingerprint_model,
    round_lr,
    weighted_mean,
)

server = ServerApp()


def load_student(model_dir: str, teacher_dir: str, config: FederatedConfig) -> tuple[Student, str, Any]:
    """The compressed model made trainable, its fingerprint (taken before) and its tokenizer."""
    from lmpress.io import load_model
    from lmpress.method import Context as StageContext

    loaded = load_model(model_dir, device="cpu")
    fp = fingerprint_model(loaded.model, loaded.tokenizer)
    teacher = load_model(teacher_dir, device="cpu").model
    ctx = StageContext(tokenizer=loaded.tokenizer, device=torch.device("cpu"), teacher=teacher)
    return Student(loaded.model, config.train, ctx, config.freeze_lora_a), fp, loaded.tokenizer


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
    import numpy as np
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

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
        record["rounds"].append(
            {
                "round": rnd,
                "clients": clients,
                "failed": len(nodes) - len(result.replies),  # errors and clients that did not answer in time
                "bytes_down": sum(metered.down.values()),  # all clients together, every stage of the round
                "bytes_up": sum(metered.up.values()),
                "seconds": time.monotonic() - t0,
            }
        )
        _save(out, state, record)
        log(INFO, "round %d: %d clients, held-out loss %s", rnd, len(clients),
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


LEGACY_PARAMS, LEGACY_CONFIG = "fitins.parameters", "fitins.config"  # SecAgg+'s (legacy) message layout


def _client_setup(msg: Message, context: Context) -> tuple[FederatedConfig, Student, Any, ConfigRecord]:
    torch.set_num_threads(int(context.node_config.get("threads", 1)))
    nc = context.node_config
    config = _config(context)
    student, fp, tokenizer = load_student(str(nc["model-dir"]), str(nc["teacher-dir"]), config)
    legacy = LEGACY_PARAMS in msg.content.array_records
    settings = msg.content.config_records[LEGACY_CONFIG if legacy else "config"]
    server_fp = str(settings["fingerprint"])
    if fp != server_fp:
        raise ValueError(
            f"client {nc.get('name', '')}: its model or tokenizer differs from the server's (fingerprint {fp}, "
            f"server {server_fp}); give every client the same compressed model"
        )
    if legacy:  # unnamed arrays in the order of the trainable parameters (the same model on both sides)
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        record = msg.content.array_records[LEGACY_PARAMS]
        arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
        if len(arrays) != len(student.named):
            raise ValueError(f"the server sent {len(arrays)} arrays for {len(student.named)} trainable parameters")
        names = list(student.named)
        student.load(
            {n: torch.from_numpy(a.copy()).reshape(student.wire_shape(n)) for n, a in zip(names, arrays, strict=True)}
        )
    else:
        student.load(msg.content.array_records["arrays"].to_torch_state_dict())
    return config, student, tokenizer, settings


def _info(context: Context) -> ConfigRecord:
    return ConfigRecord({"name": str(context.node_config.get("name", ""))})


def client_train(msg: Message, context: Context) -> Message:
    config, student, tokenizer, settings = _client_setup(msg, context)
    data = client_data(tokenizer, Path(str(context.node_config["data-dir"])), config.seq_len, config.eval_windows)
    start = student.state()
    before = student.loss(data.held_out)
    mu = config.prox_mu if config.aggregation == "fedprox" else 0.0
    lr, server_round = float(settings["lr"]), int(settings["server-round"])  # type: ignore[arg-type]
    train_loss, tokens = student.fit(data.train, config.local_steps, lr, seed=server_round, prox_mu=mu)
    after = student.loss(data.held_out)
    state = student.state()
    metrics: dict[str, Any] = {
        "tokens": tokens, "held-out-before": before, "held-out-after": after, "train-loss": train_loss
    }  # fmt: skip
    if config.dp is None:  # the clear update norm would escape the noise
        metrics["update-norm"] = float(sum(((state[n] - start[n]) ** 2).sum() for n in state)) ** 0.5
    if LEGACY_PARAMS in msg.content.array_records:  # SecAgg+ masks the parameters of a FitRes
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat

        name = str(context.node_config.get("name", ""))
        params = ndarrays_to_parameters([t.numpy() for t in state.values()])
        res = FitRes(Status(Code.OK, ""), params, tokens, {**metrics, "name": name})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(dict(metrics)), "info": _info(context)})
    return Message(content, reply_to=msg)


def client_evaluate(msg: Message, context: Context) -> Message:
    config, student, tokenizer, _ = _client_setup(msg, context)
    data = client_data(tokenizer, Path(str(context.node_config["data-dir"])), config.seq_len, config.eval_windows)
    metrics = MetricRecord({"held-out-loss": student.loss(data.held_out), "tokens": int(data.held_out.numel())})
    return Message(RecordDict({"metrics": metrics, "info": _info(context)}), reply_to=msg)


def _secure_aggregation_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ client side, for the messages of a secure round."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)  # type: ignore[no-any-return]
    return call_next(msg, context)  # type: ignore[no-any-return]


def _dp_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's LocalDpMod on every training reply when the stage asks for differential privacy."""
    from flwr.app import MessageType
    from flwr.clientapp.mod import LocalDpMod

    dp = _config(context).dp
    if dp is None or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)  # type: ignore[no-any-return]
    return LocalDpMod(dp.clip, 2 * dp.clip, dp.epsilon, dp.delta)(msg, context, call_next)


client = ClientApp(mods=[_secure_aggregation_mod, _dp_mod])  # SecAgg+ outside: it masks the noised update
client.train()(client_train)
client.evaluate()(client_evaluate)
