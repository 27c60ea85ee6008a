"""A federation on this machine: one SuperLink and one SuperNode per client directory, real
processes talking to each other over loopback, driven by ``flwr run`` (Flower's Deployment Engine,
exactly as on separate machines, with every address 127.0.0.1).

Flower's state (its CLI configuration, the installed app) lives in a private ``FLWR_HOME`` under
the run's work directory, never in ``~/.flwr``; telemetry and runtime dependency installation are
off. Every process is started in its own session and stopped (SIGTERM, then SIGKILL) on the way
out, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpress.distill.train import TrainError

APP_DIR = Path(__file__).parent / "flower_app"
CONNECTION = "lmpress-local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise TrainError(f"a Flower process exited at start-up (see {log}): {_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TrainError(f"a Flower process did not listen on port {port} within {timeout:.0f} s (see {log})")


def _tail(log: Path, n: int = 3) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    return " | ".join(lines[-n:]) or "no output"


def _bin(name: str) -> str:
    """A Flower command from the environment lmpress runs in."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise TrainError(f"federated runs need Flower's {name}: pip install 'lmpress[federated]'")
    return found


@dataclass
class LocalFederation:
    """The processes of a loopback federation; a context manager that always stops them."""

    work: Path
    clients: list[Path]
    model_dir: Path
    teacher_dir: Path
    threads: int = 1
    client_models: list[Path] | None = None  # each client's own copy of the model (default: model_dir)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __enter__(self) -> LocalFederation:
        home = self.work / "flwr-home"
        logs = self.work / "logs"
        home.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        link = _free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{link}"\ninsecure = true\n'
        )
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # SuperExec is started by name
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
        }
        try:
            self._start(
                [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                 "--disable-runtime-dependency-installation"], logs / "superlink.log", link,
            )  # fmt: skip
            for i, data in enumerate(self.clients):
                port = _free_port()
                model = self.client_models[i] if self.client_models else self.model_dir
                node = (
                    f'data-dir="{data.resolve()}" model-dir="{model.resolve()}" '
                    f'teacher-dir="{self.teacher_dir.resolve()}" name="{data.name or i}" threads={self.threads}'
                )
                self._start(
                    [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--host",
                     "127.0.0.1", "--port", str(port), "--node-config", node], logs / f"supernode-{i}.log", port,
                )  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self, cmd: list[str], log: Path, port: int) -> None:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        _wait_port(port, proc, log)

    def run(self, run_config: dict[str, Any], timeout: float) -> str:
        """Submit the app with ``run_config``, wait until it ends; returns Flower's final status."""
        flwr = _bin("flwr")
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        submitted = subprocess.run(
            [flwr, "run", str(APP_DIR), CONNECTION, "--format", "json", "--run-config", overrides],
            env=self.env, capture_output=True, text=True, cwd=self.work, timeout=120,
        )  # fmt: skip
        try:
            run_id = str(json.loads(submitted.stdout)["run-id"])
        except (ValueError, KeyError):
            raise TrainError(f"flwr run failed: {(submitted.stdout + submitted.stderr).strip()[-300:]}") from None
        with open(self.work / "logs" / "serverapp.log", "wb") as out:
            subprocess.run(
                [flwr, "log", run_id, CONNECTION, "--stream"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.work, timeout=timeout,
            )  # fmt: skip
        listed = subprocess.run(
            [flwr, "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
            env=self.env, capture_output=True, text=True, cwd=self.work, timeout=60,
        )  # fmt: skip
        try:
            return str(json.loads(listed.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):  # the SuperNodes, then the SuperLink
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):  # the app processes each started in the group
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()


def serverapp_error(work: Path) -> str:
    """The ServerApp's own last error line, from its streamed log."""
    log = work / "logs" / "serverapp.log"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no log"])[-1].strip()
