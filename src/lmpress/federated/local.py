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
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpress.distill.train import TrainError
from lmpress.federated.core import FederatedConfig, check_clients, fingerprint_model
from lmpress.io import load_model

APP_DIR = Path(__file__).parent / "flower_app"
CONNECTION = "lmpress-local"
logger = logging.getLogger(__name__)


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


def flower_env(home: Path, threads: int) -> dict[str, str]:
    """The environment of every Flower process: a private FLWR_HOME, no telemetry, no installs."""
    return {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),  # SuperExec by name
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Certificates:
    """TLS for a federation across machines: the CA every side trusts, and the server's own pair."""

    ca: Path  # ca.crt
    cert: Path | None = None  # server.pem (the server only)
    key: Path | None = None  # server.key (the server only)

    @classmethod
    def from_dir(cls, d: Path, server: bool) -> Certificates:
        names = ("ca.crt", "server.pem", "server.key") if server else ("ca.crt",)
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise TrainError(f"certificate directory {d} lacks {', '.join(missing)}; it needs {', '.join(names)}")
        return cls(d / "ca.crt", d / "server.pem", d / "server.key") if server else cls(d / "ca.crt")


def tls_args(certs: Certificates | None, server: bool) -> list[str]:
    if certs is None:
        return ["--insecure"]
    if server:
        return ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key)]
    return ["--root-certificates", str(certs.ca)]


@dataclass
class Federation:
    """A SuperLink this process started (and SuperNodes, for a local run), driven by ``flwr run``;
    a context manager that always stops its processes."""

    work: Path
    threads: int = 1
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def _link(self, host: str, port: int, certs: Certificates | None) -> None:
        """Start the SuperLink on ``host:port``, with the CLI configured to reach it from here."""
        home, logs = self.work / "flwr-home", self.work / "logs"
        home.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        tls = f'root-certificates = "{certs.ca.resolve()}"\n' if certs else "insecure = true\n"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n{tls}'
        )
        self.env = flower_env(home, self.threads)
        cmd = [_bin("flower-superlink"), *tls_args(certs, server=True), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]  # fmt: skip
        self._start(cmd, logs / "superlink.log", port)

    def _start(self, cmd: list[str], log: Path, port: int) -> None:
        with open(log, "ab") as out:  # a restarted process goes on with its log
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        _wait_port(port, proc, log)

    def run(self, run_config: dict[str, Any], timeout: float, echo: bool = False) -> str:
        """Submit the app with ``run_config``, wait until it ends; returns Flower's final status.
        ``echo``: also print the ServerApp's log as it comes."""
        flwr = _bin("flwr")
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        submitted = subprocess.run(
            [flwr, "run", str(APP_DIR), CONNECTION, "--format", "json", "--run-config", overrides],
            env=self.env, capture_output=True, text=True, cwd=self.work, timeout=120,
        )  # fmt: skip
        try:
            run_id = str(json.loads(submitted.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise TrainError(f"flwr run failed: {flwr_message(submitted.stdout, submitted.stderr)}") from None
        rounds = RoundWatch(Path(str(run_config["out-dir"])) / "rounds.json")
        with open(self.work / "logs" / "serverapp.log", "wb") as out, rounds:
            streamed = subprocess.Popen(
                [flwr, "log", run_id, CONNECTION, "--stream"], env=self.env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=self.work,
            )  # fmt: skip
            watchdog = threading.Timer(timeout, streamed.kill)  # a federation that never ends
            watchdog.start()
            assert streamed.stdout is not None
            try:
                for line in streamed.stdout:
                    out.write(line)
                    out.flush()
                    if echo:
                        sys.stderr.write(line.decode(errors="replace"))
            finally:
                watchdog.cancel()
                streamed.kill()
                streamed.wait()
        listed = subprocess.run(
            [flwr, "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
            env=self.env, capture_output=True, text=True, cwd=self.work, timeout=60,
        )  # fmt: skip
        try:
            return str(json.loads(listed.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def __enter__(self) -> Federation:
        return self

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


def flwr_message(stdout: str, stderr: str) -> str:
    """What a failed ``flwr`` command said, as one short line: the ``error-message`` of its JSON
    answer where it gave one, else its last line of output."""
    try:
        answer = json.loads(stdout)
        message = str(answer.get("error-message") or answer.get("error") or "") if isinstance(answer, dict) else ""
    except ValueError:
        message = ""
    if not message:
        lines = [line for line in (stdout + "\n" + stderr).splitlines() if line.strip(" {}[],")]
        message = lines[-1] if lines else "no output"
    return " ".join(message.split())[:300]


class RoundWatch:
    """Log each federated round as the server records it (``rounds.json``): the round, its clients,
    their held-out loss and the bytes each way, so that minutes of rounds are not silent."""

    def __init__(self, record: Path, every: float = 1.0) -> None:
        self.record, self.every, self.seen = record, every, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        with contextlib.suppress(OSError, ValueError):  # a resumed run: its earlier rounds are not news
            self.seen = len(json.loads(record.read_text())["rounds"])

    def __enter__(self) -> RoundWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._report()  # the last round, written just before the run ended

    def _watch(self) -> None:
        while not self.stop.wait(self.every):
            self._report()

    def _report(self) -> None:
        try:
            rounds = json.loads(self.record.read_text())["rounds"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        for r in rounds[self.seen :]:
            clients = r["clients"]
            losses = ", ".join(f"{c['name']} {c['held_out_loss']:.4f}" for c in clients)
            n = max(len(clients), 1)
            logger.info(
                "federated round %d: %d clients, held-out loss %s; %.2f MB down, %.2f MB up per client; %.0f s",
                r["round"], len(clients), losses, r["bytes_down"] / n / 1e6, r["bytes_up"] / n / 1e6, r["seconds"],
            )  # fmt: skip
        self.seen = max(self.seen, len(rounds))


def node_config(data: Path, model: Path, teacher: Path, name: str, threads: int) -> str:
    """A SuperNode's ``--node-config``: where its text and its copies of the models are."""
    for p in (data, model, teacher):
        if '"' in str(p.resolve()):
            raise TrainError(f"{p}: a path with a double quote cannot be passed to Flower; rename it")
    return (
        f'data-dir="{data.resolve()}" model-dir="{model.resolve()}" teacher-dir="{teacher.resolve()}" '
        f'name="{name}" threads={threads}'
    )


@dataclass
class LocalFederation(Federation):
    """A SuperLink and one SuperNode per client directory, all on loopback."""

    clients: list[Path] = field(default_factory=list)
    model_dir: Path = Path()
    teacher_dir: Path = Path()
    client_models: list[Path] | None = None  # each client's own copy of the model (default: model_dir)
    nodes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    link: int = 0

    def __enter__(self) -> LocalFederation:
        self.link = _free_port()
        try:
            self._link("127.0.0.1", self.link, None)
            for i in range(len(self.clients)):
                self.start_node(i)
        except BaseException:
            self.__exit__()
            raise
        return self

    def start_node(self, i: int) -> None:
        """Start (or restart: a client that reconnects) the SuperNode of client ``i``."""
        data, port = self.clients[i], _free_port()
        model = self.client_models[i] if self.client_models else self.model_dir
        node = node_config(data, model, self.teacher_dir, data.name or str(i), self.threads)
        cmd = [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.link}", "--host",
               "127.0.0.1", "--port", str(port), "--node-config", node]  # fmt: skip
        self._start(cmd, self.work / "logs" / f"supernode-{i}.log", port)
        self.nodes[i] = self.procs[-1]

    def stop_node(self, i: int) -> None:
        """Kill client ``i``'s SuperNode and its running ClientApp (a client that drops out)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.nodes[i].pid, signal.SIGKILL)
        self.nodes[i].wait()


@dataclass
class ServedFederation(Federation):
    """A SuperLink listening for SuperNodes on other machines (``lmpress federated join``)."""

    host: str = "0.0.0.0"
    port: int = 9092
    certificates: Certificates | None = None

    def __enter__(self) -> ServedFederation:
        try:
            self._link(self.host, self.port, self.certificates)
        except BaseException:
            self.__exit__()
            raise
        return self


def serverapp_error(work: Path) -> str:
    """The ServerApp's own last error line, from its streamed log."""
    log = work / "logs" / "serverapp.log"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no log"])[-1].strip()


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) -> (host, port); a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TrainError(f"{address!r} is not an address; give HOST:PORT, e.g. 10.0.0.5:9092")
    return host.strip("[]"), int(port)


def join(address: str, data: Path, model: Path, teacher: Path, name: str, certificates: Path | None,
         threads: int = 1) -> int:  # fmt: skip
    """Run a SuperNode for the federation served at ``address`` with this machine's text in ``data``
    (which never leaves it) until it is interrupted; returns its exit code."""
    log = logging.getLogger("lmpress.federated")
    host, port = parse_address(address)
    check_clients([data], FederatedConfig(min_clients=1))  # type: ignore[call-arg]
    certs = Certificates.from_dir(certificates, server=False) if certificates else None
    loaded = load_model(model, device="cpu")
    load_model(teacher, device="cpu")
    fp = fingerprint_model(loaded.model, loaded.tokenizer)
    del loaded
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise TrainError(
            f"cannot reach the federation server at {address} ({e.strerror or e}); start it there with "
            "lmpress federated serve, or check the address and the firewall"
        ) from None
    home = Path(tempfile.mkdtemp(prefix="lmpress-join-"))
    try:
        env = flower_env(home, threads)
        cmd = [_bin("flower-supernode"), *tls_args(certs, server=False), "--superlink", f"{host}:{port}",
               "--host", "127.0.0.1", "--port", str(_free_port()),
               "--node-config", node_config(data, model, teacher, name, threads)]  # fmt: skip
        log.info("joining %s as %s (model fingerprint %s); Ctrl-C to leave", address, name, fp)
        proc = subprocess.Popen(cmd, env=env)  # in this process group: Ctrl-C or a group kill reaches both
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(home, ignore_errors=True)
