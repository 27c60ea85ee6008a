"""The Flower ClientApp of a federated recovery stage (Flower's Message API): what a SuperNode does
with the messages of `lmpress.federated.server_app`.

Node configuration of each SuperNode (`flower-supernode --node-config`): ``data-dir`` (its text,
which never leaves it), ``model-dir`` and ``teacher-dir`` (its copies of the same models; checked
against the server's by fingerprint), ``name``, ``threads``. A ``train`` message carries the global
trainable parameters; the client measures them on its held-out text, trains ``local_steps`` and
replies with its parameters, its token count and its losses. In a secure round the message comes in
the legacy layout Flower's SecAgg+ workflow uses, and SecAgg+ masks the reply; with local
differential privacy, Flower's LocalDpMod clips and noises the update first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from lmpress.federated.core import FederatedConfig, Student, client_data, decode_config, load_student

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
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)  # type: ignore[no-any-return]
    return call_next(msg, context)  # type: ignore[no-any-return]


def _dp_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's LocalDpMod on every training reply when the stage asks for differential privacy."""
    dp = _config(context).dp
    if dp is None or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)  # type: ignore[no-any-return]
    return LocalDpMod(dp.clip, 2 * dp.clip, dp.epsilon, dp.delta)(msg, context, call_next)


def _config(context: Context) -> FederatedConfig:
    return decode_config(str(context.run_config["lmpress-config"]))


app = ClientApp(mods=[_secure_aggregation_mod, _dp_mod])  # SecAgg+ outside: it masks the noised update
app.train()(client_train)
app.evaluate()(client_evaluate)
