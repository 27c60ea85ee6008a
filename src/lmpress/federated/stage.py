"""The ``federated`` recipe stage: a distillation stage run as Flower rounds over client data.

``lmpress compress MODEL -r recipe.yaml --clients a/ b/ c/`` runs the stages before it as usual,
then saves the compressed model and the teacher to the work directory, starts a loopback
federation (`lmpress.federated.local`: a SuperLink and one SuperNode per client directory) and
runs the ServerApp and ClientApps of `lmpress.federated.apps` through it. The global parameters it
ends with are loaded into the model, whose compressed layers kept their format throughout; the
rounds (each client's held-out loss, the global model's, bytes each way) are the stage's report.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

from lmpress.distill.train import TrainError
from lmpress.federated.core import FederatedConfig, Student
from lmpress.registry import Context, Method, StageReport


def check_clients(clients: list[Path], config: FederatedConfig) -> None:
    """Before any work: enough client directories, each with text."""
    if len(clients) < config.min_clients:
        raise TrainError(
            f"the federated stage has {len(clients)} client directories, fewer than min_clients "
            f"{config.min_clients}; pass more with --clients or lower min_clients"
        )
    for c in clients:
        if not c.is_dir():
            raise TrainError(f"client data {c} is not a directory; give each client a directory of text files")
        if not any(p.is_file() and p.stat().st_size for p in c.rglob("*")):
            raise TrainError(f"client data {c} has no text; give each client a directory of text files")


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


def apply(model: nn.Module, config: FederatedConfig, ctx: Context) -> StageReport:
    from safetensors.torch import load_file

    from lmpress.federated.apps import encode_config
    from lmpress.federated.local import LocalFederation, serverapp_error
    from lmpress.io import save

    clients = list(ctx.clients or [])
    if not clients:
        raise TrainError("the federated stage needs client data: pass --clients DIR [DIR ...] (one per client)")
    check_clients(clients, config)
    if ctx.teacher is None:
        raise TrainError("the federated stage needs the original model as its teacher")
    own = ctx.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="lmpress-federated-")) if own else ctx.work_dir / "federated"  # type: ignore[operator]
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
        }
        t0 = time.perf_counter()
        with LocalFederation(work, clients=clients, model_dir=work / "student", teacher_dir=work / "teacher") as fed:
            status = fed.run(run_config, timeout=config.rounds * 900.0)
        seconds = time.perf_counter() - t0
        rounds_file = work / "server" / "rounds.json"
        import json

        record = json.loads(rounds_file.read_text()) if rounds_file.is_file() else {}
        if status != "finished:completed" or record.get("status") != "completed":
            raise TrainError(f"the federation did not complete ({status}): {serverapp_error(work)}")
        student = Student(model, config.train, ctx)  # the same trainable layers the clients trained
        student.load(load_file(str(work / "server" / "global.safetensors")))
        student.finish()
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "student", ignore_errors=True)
            shutil.rmtree(work / "teacher", ignore_errors=True)
    return {
        "clients": [c.name for c in clients],
        "rounds": record["rounds"],
        "final_held_out_loss": record["final_held_out_loss"],
        "bytes_per_round": {"down": record["rounds"][-1]["bytes_down"], "up": record["rounds"][-1]["bytes_up"]},
        "privacy": privacy(config),
        "seconds": seconds,
    }


METHOD = Method(
    "federated",
    FederatedConfig,
    apply,
    "recovery training on data that stays with its owners: distill rounds over Flower clients (--clients)",
    needs_teacher=True,
)
