"""The ``federated`` recipe stage: a distillation stage run as Flower rounds over client data.

``lmpress compress MODEL -r recipe.yaml --clients a/ b/ c/`` runs the stages before it as usual,
then saves the compressed model and the teacher to the work directory, starts a loopback
federation (`lmpress.federated.local`: a SuperLink and one SuperNode per client directory) and
runs the ServerApp of `lmpress.federated.server_app` and the ClientApps of `client_app` through
it. The global parameters it ends with are loaded into the model, whose compressed layers kept
their format throughout; the rounds (each client's held-out loss, the global model's, bytes each
way) are the stage's report.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from lmpress.distill.train import TrainError, _tensorboard
from lmpress.federated.core import FederatedConfig, Student, check_clients, encode_config
from lmpress.federated.local import Certificates, Federation, LocalFederation, ServedFederation, serverapp_error
from lmpress.io import save
from lmpress.method import Context, Method, StageReport

log = logging.getLogger(__name__)


def privacy(config: FederatedConfig) -> dict[str, Any]:
    """What the server can see and the differential privacy each client's data has (stated, not measured)."""
    out: dict[str, Any] = {"secure_aggregation": config.secure_aggregation}
    if config.dp is not None:
        out["dp"] = {
            "clip": config.dp.clip,
            "noise_std": config.dp.noise_std(),
            "epsilon_per_round": config.dp.epsilon,
            "delta_per_round": config.dp.delta,
            # basic composition over the rounds each client takes part in (an upper bound)
            "epsilon": config.dp.epsilon * config.rounds,
            "delta": config.dp.delta * config.rounds,
        }
    return out


@dataclass(frozen=True)
class Serve:
    """Serve the federation to SuperNodes on other machines (``lmpress federated serve``) instead of
    starting one per ``--clients`` directory on this one."""

    host: str = "0.0.0.0"
    port: int = 9092
    certificates: Path | None = None  # a directory with ca.crt, server.pem, server.key; None: insecure
    wait: float = 600.0  # seconds to wait for min_clients to join


def apply(model: nn.Module, config: FederatedConfig, ctx: Context) -> StageReport:
    served: Serve | None = ctx.federation
    clients = list(ctx.clients or [])
    if served is None:
        if not clients:
            raise TrainError("the federated stage needs client data: pass --clients DIR [DIR ...] (one per client)")
        check_clients(clients, config)
    certs = Certificates.from_dir(served.certificates, server=True) if served and served.certificates else None
    if ctx.teacher is None:
        raise TrainError("the federated stage needs the original model as its teacher")
    own = ctx.work_dir is None
    # absolute: Flower's processes run in other working directories
    work = (Path(tempfile.mkdtemp(prefix="lmpress-federated-")) if own else ctx.work_dir / "federated").resolve()  # type: ignore[operator]
    shutil.rmtree(work / "student", ignore_errors=True)
    shutil.rmtree(work / "teacher", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        save(model, ctx.tokenizer, work / "student")
        save(ctx.teacher, ctx.tokenizer, work / "teacher")
        run_config: dict[str, Any] = {
            "lmpress-config": encode_config(config),
            "model-dir": str((work / "student").resolve()),
            "teacher-dir": str((work / "teacher").resolve()),
            "out-dir": str((work / "server").resolve()),
            "round-timeout": 600.0,
            "join-timeout": served.wait if served else 600.0,
        }
        t0 = time.perf_counter()
        fed: Federation
        if served is None:
            fed = LocalFederation(work, clients=clients, model_dir=work / "student", teacher_dir=work / "teacher")
        else:
            fed = ServedFederation(work, host=served.host, port=served.port, certificates=certs)
        with fed:
            if served is not None:  # what the operator must do next, whatever the log level
                print(join_instructions(work, served, config), file=sys.stderr, flush=True)
            status = fed.run(run_config, timeout=config.rounds * 900.0 + run_config["join-timeout"], echo=bool(served))
        seconds = time.perf_counter() - t0
        rounds_file = work / "server" / "rounds.json"
        record = json.loads(rounds_file.read_text()) if rounds_file.is_file() else {}
        if status != "finished:completed" or record.get("status") != "completed":
            raise TrainError(f"the federation did not complete ({status}): {serverapp_error(work)}")
        student = Student(
            model, config.train, ctx, config.freeze_lora_a
        )  # the same trainable layers the clients trained
        student.load(load_file(str(work / "server" / "global.safetensors")))
        student.finish()
        if not own:
            write_curves(work / "tensorboard", record)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "student", ignore_errors=True)
            shutil.rmtree(work / "teacher", ignore_errors=True)
    names = sorted({c["name"] for r in record["rounds"] for c in r["clients"]})
    return {
        "clients": [c.name for c in clients] if clients else names,
        "rounds": record["rounds"],
        "final_held_out_loss": record["final_held_out_loss"],
        "bytes_per_round": {"down": record["rounds"][-1]["bytes_down"], "up": record["rounds"][-1]["bytes_up"]},
        "privacy": privacy(config),
        "seconds": seconds,
    }


def join_instructions(work: Path, served: Serve, config: FederatedConfig) -> str:
    host = socket.gethostname() if served.host in ("0.0.0.0", "::") else served.host
    tls = "--certificates DIR_WITH_CA_CRT" if served.certificates else "--insecure"
    return (
        f"federation server listening on {served.host}:{served.port}; waiting up to {served.wait:.0f} s for "
        f"{config.min_clients} clients. Copy {work / 'student'} and {work / 'teacher'} to each client, then run "
        f"there: lmpress federated join {host}:{served.port} --data DIR --model student --teacher teacher {tls}"
    )


def write_curves(path: Path, record: dict[str, Any]) -> None:
    """The rounds as TensorBoard curves: every client's held-out loss of the global model, bytes, seconds."""
    writer = _tensorboard(path.parent)  # writes to <work>/tensorboard
    if writer is None:
        return
    for r in record["rounds"]:
        for c in r["clients"]:
            writer.add_scalar(f"federated/global_held_out_loss/{c['name']}", c["global_held_out_loss"], r["round"] - 1)
            writer.add_scalar(f"federated/local_held_out_loss/{c['name']}", c["held_out_loss"], r["round"])
        for key in ("bytes_up", "bytes_down", "seconds"):
            writer.add_scalar(f"federated/{key}", r[key], r["round"])
    last = len(record["rounds"])
    for name, loss in record.get("final_held_out_loss", {}).items():
        writer.add_scalar(f"federated/global_held_out_loss/{name}", loss, last)
    writer.close()


METHOD = Method(
    "federated",
    FederatedConfig,
    apply,
    "recovery training on data that stays with its owners: distill rounds over Flower clients (--clients)",
    needs_teacher=True,
)
