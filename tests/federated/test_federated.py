"""Federated recovery: the aggregation arithmetic, client data, bad input, and a real loopback
federation (a Flower SuperLink and three SuperNodes as separate processes over gRPC/HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import lmpress
from lmpress.cli import app
from lmpress.data import load_documents
from lmpress.distill.train import TrainError
from lmpress.federated.core import Aggregator, FederatedConfig, client_data, weighted_mean
from lmpress.federated.stage import check_clients

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
    out = adam(g, [a, b], [1.0, 2.0])["w"]
    # first step: m = 0.1 delta, v = 0.01 delta^2 -> lr * 0.1 delta / (0.1 |delta| + tau)
    delta = torch.tensor([3.0, 1.0])
    assert torch.allclose(out, 0.1 * 0.1 * delta / (0.1 * delta.abs() + 1e-3))
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
    for x in rounds:
        assert {c["bytes_up"] for c in x["clients"]} == {lora_bytes} and {c["bytes_down"] for c in x["clients"]} == {
            lora_bytes
        }
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
    ):
        r = runner.invoke(app, ["compress", "-r", str(recipe), "-o", str(tmp_path / "out"), "--no-eval", *extra])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "out").exists()


def _federation_run(work: Path, clients: list[Path], models: list[Path], teacher: Path, config: FederatedConfig) -> str:
    from lmpress.federated.apps import encode_config
    from lmpress.federated.local import LocalFederation

    run_config = {"lmpress-config": encode_config(config), "model-dir": str(models[0]), "teacher-dir": str(teacher),
                  "out-dir": str(work / "server"), "round-timeout": 300.0}  # fmt: skip
    with LocalFederation(work, clients, models[0], teacher, client_models=models) as fed:
        return fed.run(run_config, timeout=600)


def test_a_client_with_another_model_is_left_out_or_stops_the_round(clients: list[Path], tmp_path: Path) -> None:
    from lmpress.federated.local import serverapp_error
    from lmpress.io import save

    original = lmpress.load("builtin", device="cpu")
    models = []
    for name, bits in (("w4", 4), ("w8", 8)):
        r = lmpress.compress("builtin", {"stages": [{"method": "rtn", "bits": bits}]}, run_eval=False)
        models.append(save(r.model, r.tokenizer, tmp_path / name))
    teacher = save(original.model, original.tokenizer, tmp_path / "teacher")
    stage = {k: v for k, v in RECIPE["stages"][1].items() if k != "method"}
    config = FederatedConfig.model_validate({**stage, "rounds": 1, "local_steps": 2, "min_clients": 2})
    # client c holds a different model: the round goes on with a and b, and says why c is missing
    work = tmp_path / "tolerant"
    status = _federation_run(work, clients, [models[0], models[0], models[1]], teacher, config)
    record = json.loads((work / "server" / "rounds.json").read_text())
    assert status == "finished:completed" and record["status"] == "completed"
    assert record["rounds"][0]["failed"] == 1 and [c["name"] for c in record["rounds"][0]["clients"]] == ["a", "b"]
    assert "differs from the server's" in (work / "logs" / "serverapp.log").read_text()
    # with min_clients 3 the federation stops, naming the reason
    work = tmp_path / "strict"
    strict = FederatedConfig.model_validate({**config.model_dump(), "min_clients": 3})
    status = _federation_run(work, clients, [models[0], models[0], models[1]], teacher, strict)
    assert status != "finished:completed" and "differs from the server's" in serverapp_error(work)
