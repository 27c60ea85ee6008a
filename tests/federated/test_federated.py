"""Federated recovery: the aggregation arithmetic, client data, bad input, and a real loopback
federation (a Flower SuperLink and three SuperNodes as separate processes over gRPC/HTTP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import lmpress
from lmpress.cli import app, expand_list_options
from lmpress.distill.train import TrainError
from lmpress.federated.core import Aggregator, FederatedConfig, check_clients, client_data, weighted_mean
from lmpress.sources import load_documents

PACKAGES = {"a": "email/", "b": "xml/", "c": "json/"}  # non-identical data, as federated data is


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three client directories: the stdlib sources of three different packages."""
    root = tmp_path_factory.mktemp("clients")
    docs = load_documents("stdlib")
    for name, package in PACKAGES.items():
        d = root / name
        d.mkdir()
        for doc in docs:
            if doc.path.startswith(package):
                (d / doc.path.replace("/", "_")).write_text(doc.text)
    return [root / n for n in PACKAGES]


def test_fedavg_weights_by_tokens_and_fedadam_steps_along_the_mean() -> None:
    a, b = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([4.0, 0.0])}
    assert torch.allclose(weighted_mean([a, b], [1.0, 2.0])["w"], torch.tensor([3.0, 1.0]))
    g = {"w": torch.zeros(2)}
    adam = Aggregator("fedadam", lr=0.1, tau=1e-3)
    out = adam(g, weighted_mean([a, b], [1.0, 2.0]))["w"]
    # first step: m = 0.1 delta, v = 0.01 delta^2 -> lr * 0.1 delta / (0.1 |delta| + tau)
    delta = torch.tensor([3.0, 1.0])
    assert torch.allclose(out, 0.1 * 0.1 * delta / (0.1 * delta.abs() + 1e-3))
    step = Aggregator("fedavg", step=3.0)(g, weighted_mean([a, b], [1.0, 2.0]))["w"]  # server SGD: 3x the mean change
    assert torch.allclose(step, torch.tensor([9.0, 3.0]))
    with pytest.raises(TrainError, match="no client trained"):
        weighted_mean([a], [0.0])


def test_client_data_holds_out_text(clients: list[Path], tmp_path: Path) -> None:
    tok = lmpress.load("builtin").tokenizer
    data = client_data(tok, clients[0], 128, 4)
    assert data.train.shape[1] == 128 and 1 <= data.held_out.shape[0] <= 4 and data.tokens == data.train.numel()
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.py").write_text((clients[2] / "json_decoder.py").read_text())
    small = client_data(tok, one, 128, 4)  # one document: split by position
    assert small.held_out.shape[0] >= 1 and small.train.shape[0] >= 1
    empty = tmp_path / "empty"
    empty.mkdir()
    config = FederatedConfig(min_clients=2)  # type: ignore[call-arg]
    with pytest.raises(TrainError, match="fewer than min_clients 2"):
        check_clients(clients[:1], config)
    with pytest.raises(TrainError, match="empty has no text"):
        check_clients([clients[0], empty], config)


RECIPE = {
    "stages": [
        {"method": "rtn", "bits": 4, "group_size": 128},
        {
            "method": "federated",
            "train": {"lora_rank": 8, "lr": 1e-3, "batch_size": 8},
            "rounds": 2,
            "local_steps": 5,
            "min_clients": 3,
            "seq_len": 128,
            "eval_windows": 4,
        },
    ]
}


def test_a_loopback_federation_recovers_with_lora(clients: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "fed"
    r = lmpress.compress(
        "builtin", RECIPE, lmpress.DataOptions(eval_windows=8), output=out, clients=clients, measure_speed=False
    )
    report = r.stages[1]
    rounds = report["rounds"]
    assert [x["round"] for x in rounds] == [1, 2] and all(len(x["clients"]) == 3 and not x["failed"] for x in rounds)
    lora_bytes = (
        4
        * 8
        * sum(  # rank-8 adapters (A: r x in, B: out x r) in float32 on every linear, head included
            m.in_features + m.out_features
            for m in lmpress.load("builtin").model.modules()
            if isinstance(m, torch.nn.Linear)
        )
    )
    for x in rounds:  # the adapters each way, for 3 clients; array headers and settings add about 1.2 %
        for way in ("bytes_up", "bytes_down"):
            assert 3 * lora_bytes < x[way] < 3.05 * lora_bytes
    for c0, c1 in zip(rounds[0]["clients"], rounds[1]["clients"], strict=True):
        assert c1["global_held_out_loss"] < c0["global_held_out_loss"]  # the global model improved on every client
        assert report["final_held_out_loss"][c0["name"]] < 0.9 * c0["global_held_out_loss"]
    saved = json.loads((out / "lmpress.json").read_text())
    assert "lora" in {m["format"] for m in saved["modules"].values()}  # adapters beside the unchanged 4-bit codes
    reloaded = lmpress.load(out)
    ids = torch.arange(16)[None]
    with torch.no_grad():
        a, b = reloaded.model(input_ids=ids).logits.float(), r.model(input_ids=ids).logits.float()
    # the same tensors (reloaded); the forwards may take different int4 kernel paths in bfloat16
    kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean()
    assert kl < 1e-3


runner = CliRunner()


def test_cli_bad_client_input(clients: list[Path], tmp_path: Path) -> None:
    import yaml

    recipe = tmp_path / "fed.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    empty = tmp_path / "nothing"
    empty.mkdir()
    for extra, msg in (
        ([], "needs client data: pass --clients"),
        (["--clients", f"{clients[0]},{clients[1]}"], "fewer than min_clients 3"),
        (["--clients", f"{clients[0]},{clients[1]},{empty}"], "nothing has no text"),
        (["--clients", str(clients[0]), str(clients[1]), str(empty)], "nothing has no text"),  # space-separated
    ):
        args = ["compress", "-r", str(recipe), "-o", str(tmp_path / "out"), "--no-eval", *extra]
        r = runner.invoke(app, expand_list_options(args))  # what `lmpress` does with its arguments
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "out").exists()


def test_cli_federated_as_the_readme_runs_it(
    clients: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's path: GPTQ then federated, a relative -o and relative --clients, through the
    ``lmpress`` entry point; each round is a line as it finishes; the saved model reloads."""
    import logging
    import shutil

    import yaml

    from lmpress.cli import run

    for c in clients:
        shutil.copytree(c, tmp_path / c.name)
    stages = [{"method": "gptq", "bits": 4, "group_size": 128}, {**RECIPE["stages"][1], "local_steps": 2}]
    (tmp_path / "fed.yaml").write_text(yaml.safe_dump({"stages": stages}))
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()  # the command's own log lines on stderr, as in a terminal
    kept, root.handlers[:] = root.handlers[:], []
    try:
        code = run(["compress", "-r", "fed.yaml", "-o", "out/fed", "--clients", "a/", "b/", "c/", "--no-eval",
                    "--calib-windows", "16", "--seq-len", "128"])  # fmt: skip
    finally:
        root.handlers[:] = kept
    err = capsys.readouterr().err
    assert code == 0, err
    assert [line.split(":")[0] for line in err.splitlines() if "federated round" in line] == [
        "federated round 1",
        "federated round 2",
    ]
    saved = json.loads((tmp_path / "out" / "fed" / "lmpress.json").read_text())
    assert [s["method"] for s in saved["stages"]] == ["gptq", "federated"]
    assert {"lora", "quant"} <= {m["format"] for m in saved["modules"].values()}
    reloaded = lmpress.load(tmp_path / "out" / "fed")
    with torch.no_grad():
        assert torch.isfinite(reloaded.model(input_ids=torch.arange(16)[None]).logits).all()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fed", "fed.work"]


def _federation_run(work: Path, clients: list[Path], models: list[Path], teacher: Path, config: FederatedConfig) -> str:
    from lmpress.federated.core import encode_config
    from lmpress.federated.local import LocalFederation

    run_config = {"lmpress-config": encode_config(config), "model-dir": str(models[0]), "teacher-dir": str(teacher),
                  "out-dir": str(work / "server"), "round-timeout": 300.0}  # fmt: skip
    with LocalFederation(work, clients=clients, model_dir=models[0], teacher_dir=teacher, client_models=models) as fed:
        return fed.run(run_config, timeout=600)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The built-in model at 4 and 8 bits (two different students) and its original (the teacher)."""
    from lmpress.io import save

    root = tmp_path_factory.mktemp("models")
    original = lmpress.load("builtin", device="cpu")
    out = {"teacher": save(original.model, original.tokenizer, root / "teacher")}
    for name, bits in (("w4", 4), ("w8", 8)):
        r = lmpress.compress("builtin", {"stages": [{"method": "rtn", "bits": bits}]}, run_eval=False)
        out[name] = save(r.model, r.tokenizer, root / name)
    return out


SHORT = {**{k: v for k, v in RECIPE["stages"][1].items() if k != "method"}, "rounds": 1, "local_steps": 2}


def test_a_client_with_another_model_is_left_out_or_stops_the_round(
    clients: list[Path], saved: dict[str, Path], tmp_path: Path
) -> None:
    from lmpress.federated.local import serverapp_error

    models, teacher = [saved["w4"], saved["w4"], saved["w8"]], saved["teacher"]
    config = FederatedConfig.model_validate({**SHORT, "min_clients": 2})
    # client c holds a different model: the round goes on with a and b, and says why c is missing
    work = tmp_path / "tolerant"
    status = _federation_run(work, clients, models, teacher, config)
    record = json.loads((work / "server" / "rounds.json").read_text())
    assert status == "finished:completed" and record["status"] == "completed"
    assert record["rounds"][0]["failed"] == 1 and [c["name"] for c in record["rounds"][0]["clients"]] == ["a", "b"]
    assert "differs from the server's" in (work / "logs" / "serverapp.log").read_text()
    # with min_clients 3 the federation stops, naming the reason
    work = tmp_path / "strict"
    strict = FederatedConfig.model_validate({**config.model_dump(), "min_clients": 3})
    status = _federation_run(work, clients, models, teacher, strict)
    assert status != "finished:completed" and "differs from the server's" in serverapp_error(work)


def test_secure_aggregation_and_local_dp_change_only_what_they_should(
    clients: list[Path], saved: dict[str, Path], tmp_path: Path
) -> None:
    """SecAgg+ hides each client's parameters and yields the same mean (to its quantization);
    local DP clips every update to its norm bound and adds noise of the stated deviation."""
    from safetensors.torch import load_file

    from lmpress.federated.core import Student
    from lmpress.method import Context

    models, teacher = [saved["w4"]] * 3, saved["teacher"]
    result = {}
    dp = {"clip": 0.25, "epsilon": 12_000.0}  # noise std 2.0e-4 (a test of the arithmetic, not a privacy level)
    for name, extra in (("plain", {}), ("secagg", {"secure_aggregation": True}), ("dp", {"dp": dp})):
        config = FederatedConfig.model_validate({**SHORT, **extra})
        assert _federation_run(tmp_path / name, clients, models, teacher, config) == "finished:completed"
        result[name] = (
            load_file(str(tmp_path / name / "server" / "global.safetensors")),
            json.loads((tmp_path / name / "server" / "rounds.json").read_text())["rounds"][0],
        )
    (plain, p_round), (secagg, s_round), (noised, d_round) = result["plain"], result["secagg"], result["dp"]
    assert max(float((plain[k] - secagg[k]).abs().max()) for k in plain) < 2e-5
    # SecAgg+ costs more bytes up (masked integers, key shares); the plain round sends the adapters
    assert s_round["bytes_up"] > 1.5 * p_round["bytes_up"]
    assert [c["held_out_loss"] for c in s_round["clients"]] == [c["held_out_loss"] for c in p_round["clients"]]
    # DP: the update (global minus start) is the clipped mean plus noise averaged over 3 clients
    config = FederatedConfig.model_validate({**SHORT, "dp": dp})
    loaded = lmpress.load(saved["w4"], device="cpu")
    ctx = Context(tokenizer=loaded.tokenizer, device=torch.device("cpu"), teacher=lmpress.load(teacher).model)
    start = Student(loaded.model, config.train, ctx).state()
    u_plain = torch.cat([(plain[k] - start[k]).flatten() for k in start])
    u_dp = torch.cat([(noised[k] - start[k]).flatten() for k in start])
    norms = [c["update_norm"] for c in p_round["clients"]]
    assert min(norms) > dp["clip"]  # every client's update is clipped
    scale = sum(dp["clip"] / n for n in norms) / 3  # equal token counts: the mean of the clipped updates
    assert abs(float(u_dp @ u_plain / (u_plain @ u_plain)) - scale) < 0.01
    residual = u_dp - scale * u_plain
    sigma = config.dp.noise_std() / 3**0.5  # type: ignore[union-attr]
    assert abs(float(residual.std()) / sigma - 1) < 0.05
    assert all(c["update_norm"] != c["update_norm"] for c in d_round["clients"])  # not reported under DP (nan)


def test_cli_serve_and_join_bad_input(clients: list[Path], saved: dict[str, Path], tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = ["federated", "join", f"127.0.0.1:{port}", "--data", str(clients[0]), "--model", str(saved["w4"]),
            "--teacher", str(saved["teacher"])]  # fmt: skip
    for args, msg in (
        ([*base, "--insecure"], f"cannot reach the federation server at 127.0.0.1:{port}"),
        (base, "choose --insecure"),
        ([*base[:2], "nowhere", *base[3:], "--insecure"], "'nowhere' is not an address"),
        ([*base[:4], str(tmp_path), *base[5:], "--insecure"], "has no text"),
        (["federated", "serve", "-r", "w4", "-o", str(tmp_path / "o"), "--insecure"], "has no federated stage"),
        (["federated", "serve", "-r", "w4", "-o", str(tmp_path / "o")], "choose --insecure"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def _certificates(d: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=lmpress-test-ca")  # fmt: skip
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return d


def test_serve_and_join_run_as_separate_commands(clients: list[Path], tmp_path: Path) -> None:
    """``lmpress federated serve`` and two ``lmpress federated join`` processes, as on three machines,
    over TLS with a certificate authority of the test's own."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time

    import yaml

    from lmpress.track import round_series

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = tmp_path / "fed.yaml"
    fed = {**RECIPE["stages"][1], "rounds": 2, "local_steps": 2, "min_clients": 2}
    recipe.write_text(yaml.safe_dump({"stages": [RECIPE["stages"][0], fed]}))
    out = tmp_path / "out"
    cli = [str(Path(sys.executable).parent / "lmpress")]
    tls = _certificates(tmp_path / "tls")  # server: ca.crt, server.pem, server.key; a client: ca.crt
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    serve = subprocess.Popen(
        [*cli, "federated", "serve", "builtin", "-r", str(recipe), "-o", str(out), "--address", f"127.0.0.1:{port}",
         "--certificates", str(tls), "--no-eval", "--no-track", "--wait", "300", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    joins: list[subprocess.Popen[str]] = []
    try:
        shared = out.with_name("out.work") / "federated"
        t0 = time.monotonic()
        while not (shared / "teacher" / "lmpress.json").exists() and serve.poll() is None:
            assert time.monotonic() - t0 < 300, "the server did not write the models for its clients"
            time.sleep(0.5)
        client_tls = tmp_path / "client-tls"  # a client holds only the CA's certificate
        client_tls.mkdir()
        shutil.copy(tls / "ca.crt", client_tls / "ca.crt")
        copies = []
        for c in clients[:2]:  # each client's own copy, as on its own machine
            mine = tmp_path / f"copy-{c.name}"
            shutil.copytree(shared / "student", mine / "student")
            shutil.copytree(shared / "teacher", mine / "teacher")
            copies.append(mine)
        for c, mine in zip(clients[:2], copies, strict=True):
            cmd = [*cli, "federated", "join", f"127.0.0.1:{port}", "--data", str(c), "--model", str(mine / "student"),
                   "--teacher", str(mine / "teacher"), "--certificates", str(client_tls)]  # fmt: skip
            with open(tmp_path / f"join-{c.name}.log", "w") as log:
                joins.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
                    )
                )
        stdout, stderr = serve.communicate(timeout=600)
        assert serve.returncode == 0, stderr[-2000:]
    finally:
        for p in [serve, *joins]:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in joins:  # a join leaves on Ctrl-C; one caught between connection retries is killed
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # with its SuperNode
                p.wait()
    summary = json.loads(stdout)
    stage = summary["stages"][1]
    assert stage["method"] == "federated" and stage["clients"] == ["a", "b"] and len(stage["rounds"]) == 2
    assert "lmpress federated join" in stderr and f"127.0.0.1:{port} --data" in stderr  # the join instructions
    saved = json.loads((out / "lmpress.json").read_text())
    assert "lora" in {m["format"] for m in saved["modules"].values()}
    # the rounds as series (MLflow) and curves (TensorBoard)
    series = round_series(summary)
    assert [s for s, _ in series["federated.a.held_out_loss"]] == [0, 1, 2] and len(series["federated.bytes_up"]) == 2
    assert list((shared / "tensorboard").glob("events.out.tfevents.*"))


def test_a_client_drops_out_and_rejoins_and_a_restarted_server_resumes(
    clients: list[Path], saved: dict[str, Path], tmp_path: Path
) -> None:
    import threading
    import time

    from lmpress.federated.core import encode_config
    from lmpress.federated.local import LocalFederation

    config = FederatedConfig.model_validate({**SHORT, "rounds": 3, "min_clients": 2})
    work = tmp_path / "fed"
    run_config = {
        "lmpress-config": encode_config(config),
        "model-dir": str(saved["w4"]),
        "teacher-dir": str(saved["teacher"]),
        "out-dir": str(work / "server"),
        "round-timeout": 40.0,  # a client that vanished is given up after this
    }
    rounds_file = work / "server" / "rounds.json"

    def rounds() -> list[dict]:
        return json.loads(rounds_file.read_text())["rounds"] if rounds_file.exists() else []

    def wait_until(ready: Any, what: str, timeout: float = 300) -> None:
        t0 = time.monotonic()
        while not ready():
            assert time.monotonic() - t0 < timeout, what
            time.sleep(0.2)

    def federation() -> LocalFederation:
        return LocalFederation(work, clients=clients, model_dir=saved["w4"], teacher_dir=saved["teacher"])

    with federation() as fed:
        runner_ = threading.Thread(target=fed.run, args=(run_config, 600), daemon=True)
        runner_.start()
        log_c = work / "logs" / "supernode-2.log"
        wait_until(lambda: "flwr-clientapp" in log_c.read_text(), "client c never started training")
        fed.stop_node(2)  # c drops out in the middle of round 1
        fed.start_node(2)  # and comes back (a new SuperNode) while the round still waits for its old self
        wait_until(lambda: len(rounds()) >= 1, "round 1 did not finish without c")
        wait_until(lambda: len(rounds()) >= 2, "round 2 did not finish")
    runner_.join(timeout=60)  # the whole server side went down during round 3
    first = rounds()
    assert len(first) == 2
    assert [c["name"] for c in first[0]["clients"]] == ["a", "b"] and first[0]["failed"] >= 1
    assert "c" in [c["name"] for c in first[1]["clients"]]  # the client that reconnected trained again
    with federation() as fed:  # a new server on the same state
        status = fed.run(run_config, timeout=600)
    record = json.loads(rounds_file.read_text())
    assert status == "finished:completed" and record["status"] == "completed"
    assert record["rounds"][:2] == first and record["rounds"][2]["round"] == 3
    assert "resuming after round 2" in (work / "logs" / "serverapp.log").read_text()


def test_a_sparse_model_federates_its_kept_weights_and_keeps_its_mask(clients: list[Path], tmp_path: Path) -> None:
    """Without LoRA the clients train (and send) every float parameter; a 2:4 layer's pruned weights stay zero."""
    from lmpress.nn import SparseLinear

    fed = {**RECIPE["stages"][1], "train": {"lora_rank": 0, "lr": 1e-4, "batch_size": 8}, "rounds": 1,
           "local_steps": 1}  # fmt: skip
    sparse = {"method": "magnitude", "pattern": "2:4"}
    before = lmpress.compress("builtin", {"stages": [sparse]}, run_eval=False).model
    r = lmpress.compress("builtin", {"stages": [sparse, fed]}, clients=clients, run_eval=False)
    layers = [(n, m) for n, m in r.model.named_modules() if isinstance(m, SparseLinear)]
    assert layers
    old = dict(before.named_modules())
    changed = 0
    for name, m in layers:
        w, w0 = m.dense_weight().float(), old[name].dense_weight().float()  # type: ignore[operator]
        assert torch.equal(w == 0, w0 == 0)  # the same mask
        changed += int(not torch.equal(w, w0))
    assert changed == len(layers)  # every kept weight trained
    (round1,) = r.stages[1]["rounds"]
    # on the wire, in float32: every float parameter, and of each 2:4 layer only its kept half
    floats = sum(p.numel() * 4 for p in before.parameters() if p.is_floating_point())
    kept = sum(m.nnz * 4 for _, m in layers)
    assert kept == sum(m.in_features * m.out_features * 2 for _, m in layers)
    assert 3 * (floats + kept) < round1["bytes_up"] < 3.02 * (floats + kept)


def test_federated_quantization_aware_training_keeps_the_4_bit_format(clients: list[Path]) -> None:
    """``codes: train`` (QAT on the grid: latent weights rounded in the forward pass) over the
    federation: the clients move latent weights and scales, and the result is 4-bit again."""
    from lmpress.nn import QuantLinear

    fed = {**RECIPE["stages"][1], "train": {"lora_rank": 0, "codes": "train", "lr": 1e-3, "batch_size": 8},
           "rounds": 1, "local_steps": 2}  # fmt: skip
    base = lmpress.compress("builtin", {"stages": [RECIPE["stages"][0]]}, run_eval=False).model
    r = lmpress.compress("builtin", {"stages": [RECIPE["stages"][0], fed]}, clients=clients, run_eval=False)
    old = dict(base.named_modules())
    layers = [(n, m) for n, m in r.model.named_modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bits == 4 for _, m in layers)
    flipped = sum(int((m.qweight != old[n].qweight).sum()) for n, m in layers)  # type: ignore[operator]
    assert flipped > 0  # some codes moved to a neighbouring grid point
    (round1,) = r.stages[1]["rounds"]
    latent = sum(m.in_features * m.out_features * 4 for _, m in layers)  # float32 latent weights travel
    assert round1["bytes_up"] > 3 * latent


def test_frozen_lora_a_aggregates_exactly_and_sends_half() -> None:
    """FFA-LoRA: with every client's A at the same seeded start, the mean of the clients' B A is
    the mean B times A, so FedAvg of the adapters is FedAvg of the updates; only B travels."""
    from lmpress.federated.core import Student, nbytes
    from lmpress.method import Context
    from tests.export.helpers import compress, held_out_windows

    windows = held_out_windows()
    teacher = lmpress.load("builtin", device="cpu").model
    config = FederatedConfig.model_validate({"freeze_lora_a": True})

    def student(freeze: bool) -> Student:
        loaded = compress([{"method": "rtn", "bits": 4, "group_size": 128}])
        ctx = Context(tokenizer=loaded.tokenizer, device=torch.device("cpu"), teacher=teacher)
        return Student(loaded.model, config.train, ctx, freeze)

    full, clients = student(False), [student(True), student(True)]
    assert all(n.endswith("lora_b") for n in clients[0].named) and 2 * len(clients[0].named) == len(full.named)
    assert nbytes(clients[0].state()) < 0.6 * nbytes(full.state())
    a = {n: p.detach().clone() for n, p in clients[0].distiller.named_parameters() if n.endswith("lora_a")}
    assert all(torch.equal(a[n], p) for n, p in clients[1].distiller.named_parameters() if n.endswith("lora_a"))
    for i, c in enumerate(clients):
        c.fit(windows[i : i + 1], steps=2, lr=1e-2, seed=i)
    states = [c.state() for c in clients]
    assert all(float(s[n].abs().max()) > 0 for s in states for n in s)  # B moved from zero
    mean = weighted_mean(states, [1.0, 3.0])
    for n in list(mean)[:4]:
        a_n = a[n.removesuffix("lora_b") + "lora_a"]
        products = [s[n] @ a_n for s in states]
        torch.testing.assert_close(mean[n] @ a_n, 0.25 * products[0] + 0.75 * products[1])
    with pytest.raises(ValueError, match="lora_rank > 0"):
        FederatedConfig.model_validate({"freeze_lora_a": True, "train": {"lora_rank": 0}})
