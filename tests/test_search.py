"""Recipe search: recipes from choices, budgets met, pruning, a study that resumes, two workers on one
study, the found recipe reproducing its numbers, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmpress.cli import app
from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.evaluation import quality
from lmpress.io.load import load_model
from lmpress.method import Context
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe
from lmpress.recipe_search import SearchConfig, block_groups, build_recipe, run_search
from lmpress.select import matches

SPACE = {"bits": [2, 4, 8], "group_sizes": [32], "head_bits": [None, 4], "embedding_bits": [None, 4]}


def test_block_groups_and_recipes_from_choices() -> None:
    assert block_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert block_groups(2, 4) == [[0], [1]]
    choice = {"method": "gptq", "bits_g0": 4, "bits_g1": 2, "group_size": 64, "head_bits": 8, "embedding_bits": 4,
              "sparsity_g0": 0.0, "sparsity_g1": 0.0, "drop_blocks": 0}  # fmt: skip
    recipe = build_recipe(choice, "model.layers", [[0, 1], [2, 3]], "r")
    (quant,) = recipe["stages"]
    assert quant["method"] == "gptq" and quant["bits"] == 4 and quant["embedding_bits"] == 4 and quant["ignore"] == []
    block_rule, head_rule = quant["overrides"]
    assert matches("model.layers.3.mlp.up_proj", block_rule["targets"]) and block_rule["bits"] == 2
    assert not matches("model.layers.1.mlp.up_proj", block_rule["targets"])
    assert head_rule == {"targets": ["lm_head"], "bits": 8}
    parse_recipe(recipe)  # a valid recipe
    # a sparse group is pruned and quantized jointly by SparseGPT at its own bits; groups are the blocks
    # that remain after dropping (5 blocks, 1 dropped: [0, 1] and [2, 3])
    sparse = {**choice, "sparsity_g1": 0.5, "drop_blocks": 1}
    recipe = build_recipe(sparse, "model.layers", [[0, 1, 2], [3, 4]], "r")
    assert [s["method"] for s in recipe["stages"]] == ["drop_blocks", "sparsegpt", "gptq"]
    drop, prune, quant = recipe["stages"]
    assert drop["blocks"] == 1 and prune["sparsity"] == 0.5 and prune["bits"] == 2 and prune["group_size"] == 64
    assert matches("model.layers.3.self_attn.q_proj", prune["targets"])
    assert not matches("model.layers.1.self_attn.q_proj", prune["targets"])
    assert not matches("model.layers.4.self_attn.q_proj", prune["targets"])  # block 4 is gone
    assert quant["bits"] == 4 and quant["overrides"] == [{"targets": ["lm_head"], "bits": 8}]
    parse_recipe(recipe)
    # every group sparse and the head kept: no quantizer stage is left
    all_sparse = {**sparse, "sparsity_g0": 0.5, "head_bits": None, "drop_blocks": 0}
    stages = build_recipe(all_sparse, "model.layers", [[0], [1]], "r")["stages"]
    assert [s["method"] for s in stages] == ["sparsegpt", "sparsegpt"]


def _setup(trained_dir: Callable[[str], Path], distill_text: Path) -> tuple[object, object, object]:
    loaded = load_model(trained_dir("llama"))
    data = DataOptions(source=distill_text, seq_len=32)
    calib = data.load(loaded.tokenizer, "calib", 24)
    return loaded, data, calib


def test_search_meets_the_budget_resumes_and_its_recipe_reproduces(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    loaded, _, calib = _setup(trained_dir, distill_text)
    model, tok = loaded.model, loaded.tokenizer  # type: ignore[attr-defined]
    cfg = {"space": SPACE, "calib_windows": 16, "select_windows": 8, "trials": 6}
    full = quality(model, calib.windows[16:24])  # type: ignore[attr-defined]
    from lmpress.evaluation import tensor_bytes

    budget = int(0.45 * tensor_bytes(model))
    config = SearchConfig.model_validate({**cfg, "budget": {"max_bytes": budget}})
    first = run_search(model, tok, calib, config, tmp_path / "study")
    assert len(first.trials) == 6 and first.best is not None
    assert first.best["bytes"] <= budget
    assert all(t["bytes"] > budget for t in first.trials if t.get("pruned_by") == "size")
    feasible = [t for t in first.trials if t["state"] == "COMPLETE" and t["bytes"] <= budget]
    assert first.best["perplexity"] == min(t["perplexity"] for t in feasible)
    assert (tmp_path / "study" / "trials.json").is_file()
    # resume: the study is in SQLite; asking for 9 trials runs 3 more, keeping the first 6
    more = SearchConfig.model_validate({**cfg, "trials": 9, "budget": {"max_bytes": budget}})
    resumed = run_search(model, tok, calib, more, tmp_path / "study")
    assert len(resumed.trials) == 9
    assert [t["number"] for t in resumed.trials[:6]] == [t["number"] for t in first.trials]
    # the found recipe, run alone, gives the same numbers
    again = load_model(trained_dir("llama")).model
    ctx = Context(tokenizer=tok, device=torch.device("cpu"), calibration=lambda: _first(calib, 16))
    run_stages(again, parse_recipe(first.best["recipe"]), ctx)
    q = quality(again, calib.windows[16:24], reference=model)  # type: ignore[attr-defined]
    assert q["perplexity"] == pytest.approx(first.best["perplexity"], rel=1e-5)
    assert full["perplexity"] < first.best["perplexity"]


def _first(calib: object, n: int) -> object:
    import dataclasses

    return dataclasses.replace(calib, windows=calib.windows[:n])  # type: ignore[type-var,attr-defined]


WORKER = """
import sys, torch
from pathlib import Path
from lmpress.io.load import load_model
from lmpress.data_options import DataOptions
from lmpress.recipe_search import SearchConfig, run_search
torch.set_num_threads(1)
loaded = load_model(sys.argv[1])
calib = DataOptions(source=sys.argv[2], seq_len=32).load(loaded.tokenizer, "calib", 24)
cfg = SearchConfig.model_validate({"space": %s, "calib_windows": 16, "select_windows": 8, "trials": 30,
                                   "budget": {"max_ppl_increase": 0.5}, "seeds": False})
run_search(loaded.model, loaded.tokenizer, calib, cfg, Path(sys.argv[3]))
""".replace("%s", repr(SPACE))


def test_two_workers_share_one_study(trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path) -> None:
    src = trained_dir("llama")
    study = tmp_path / "shared"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # one worker first fills the sensitivity cache, so both start on equal terms
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(src), str(distill_text), str(study)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trials = json.loads((study / "trials.json").read_text())["trials"]
    assert 30 <= len(trials) <= 31  # the study stops at 30 (a trial already running may finish)
    assert len({t["worker"] for t in trials if "worker" in t}) == 2  # both processes contributed


def test_bad_budgets_and_spaces_are_clear_errors(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    loaded, _, calib = _setup(trained_dir, distill_text)
    model, tok = loaded.model, loaded.tokenizer  # type: ignore[attr-defined]
    tiny = SearchConfig.model_validate(
        {"space": SPACE, "calib_windows": 16, "select_windows": 8, "budget": {"max_bytes": 1000}}
    )
    with pytest.raises(
        LmpressError, match=r"no recipe in the space fits 0\.00 MB; the smallest reachable is \d+\.\d+ MB"
    ):
        run_search(model, tok, calib, tiny, tmp_path / "s")
    assert not (tmp_path / "s").exists()  # nothing written for an impossible budget
    with pytest.raises(LmpressError, match="give a budget"):
        run_search(model, tok, calib, SearchConfig.model_validate({"space": SPACE}), tmp_path / "s")
    runner = CliRunner()
    bad = tmp_path / "space.yaml"
    for text, message in (("methods: [gptq, magic]\n", "unknown method 'magic'"), ("bits: []\n", "empty list"),
                          ("colour: red\n", "colour"), ("sparsity: [1.5]\n", "sparsity")):  # fmt: skip
        bad.write_text(text)
        r = runner.invoke(app, ["search", str(trained_dir("llama")), "--max-bytes", "1MB", "--space", str(bad),
                                "--study-dir", str(tmp_path / "cli")])  # fmt: skip
        assert r.exit_code == 2 and message in r.output, r.output
    r = runner.invoke(app, ["search", "--max-bytes", "lots"])
    assert r.exit_code == 2 and "is not a size" in r.output
    r = runner.invoke(app, ["search", "--max-bytes", "1MB", "--objective", "beauty"])
    assert r.exit_code == 2 and "objective" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["search", "--min-speedup", "2", "--speed", "warp"])
    assert r.exit_code == 2 and "speed" in r.output and "Traceback" not in r.output


KILLED_WORKER = """
import sys, time, torch
from pathlib import Path
import lmpress.recipe_search as search
from lmpress.io.load import load_model
from lmpress.data_options import DataOptions
torch.set_num_threads(1)
calls = []
measure = search.Evaluator.measure
def hang_on_the_fourth(self, model, windows=None):
    calls.append(1)
    if len(calls) == 4:  # the fourth trial is mid-way (compressed, not yet scored): wait to be killed
        Path(sys.argv[4]).write_text("mid-trial")
        time.sleep(600)
    return measure(self, model, windows)
search.Evaluator.measure = hang_on_the_fourth
loaded = load_model(sys.argv[1])
calib = DataOptions(source=sys.argv[2], seq_len=32).load(loaded.tokenizer, "calib", 24)
cfg = search.SearchConfig.model_validate(%s)
search.run_search(loaded.model, loaded.tokenizer, calib, cfg, Path(sys.argv[3]))
"""


def test_a_killed_worker_s_trial_is_failed_retried_and_the_study_resumes(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    import time

    import optuna

    cfg = {"space": SPACE, "calib_windows": 16, "select_windows": 8, "trials": 6, "budget": {"max_ppl_increase": 0.5},
           "seeds": False, "prune": False, "heartbeat": 1, "grace": 2}  # fmt: skip
    study_dir, marker, script = tmp_path / "study", tmp_path / "mid-trial", tmp_path / "worker.py"
    script.write_text(KILLED_WORKER.replace("%s", repr(cfg)))
    src = trained_dir("llama")
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(distill_text), str(study_dir), str(marker)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[1][-2000:]
    proc.kill()  # SIGKILL: no cleanup, the trial stays RUNNING in the database
    proc.wait()
    storage = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    before = optuna.load_study(study_name="lmpress-search", storage=storage).trials
    states = [t.state.name for t in before]
    assert states[-1] == "RUNNING" and set(states[:-1]) == {"COMPLETE"} and len(states) >= 4, states  # repeats reuse
    killed = before[-1]
    time.sleep(3)  # past the grace period: the killed worker's heartbeat has stopped

    loaded = load_model(src)
    calib = DataOptions(source=distill_text, seq_len=32).load(loaded.tokenizer, "calib", 24)
    result = run_search(loaded.model, loaded.tokenizer, calib, SearchConfig.model_validate(cfg), study_dir)
    by_number = {t["number"]: t for t in result.trials}
    assert by_number[killed.number]["state"] == "FAIL"  # failed by the heartbeat check, not left RUNNING
    retried = [t for t in result.trials if t["number"] > killed.number and t["params"] == killed.params]
    assert retried and retried[0]["state"] == "COMPLETE"  # the killed recipe was run again
    assert sum(t["state"] in ("COMPLETE", "PRUNED") for t in result.trials) == 6  # the crash used up no trial
    assert [t["number"] for t in result.trials[: len(before) - 1]] == [t.number for t in before[:-1]]  # kept
    assert result.best is not None


def test_a_speed_budget_is_measured_and_met(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    loaded, _, calib = _setup(trained_dir, distill_text)
    model, tok = loaded.model, loaded.tokenizer  # type: ignore[attr-defined]
    base = {"space": SPACE, "calib_windows": 16, "select_windows": 8, "trials": 4, "seeds": False}
    easy = SearchConfig.model_validate({**base, "budget": {"min_speedup": 0.05}})
    result = run_search(model, tok, calib, easy, tmp_path / "easy")
    measured = [t for t in result.trials if t["state"] == "COMPLETE"]
    assert measured and all(t["speedup"] > 0 for t in measured)
    assert all(len(t["constraints"]) == 3 and t["constraints"][2] == pytest.approx(0.05 - t["speedup"])
               for t in measured)  # fmt: skip
    assert result.best is not None and result.best["speedup"] >= 0.05
    assert result.best["perplexity"] == min(t["perplexity"] for t in measured)  # perplexity under a speed budget
    impossible = SearchConfig.model_validate({**base, "trials": 2, "budget": {"min_speedup": 1000}})
    assert run_search(model, tok, calib, impossible, tmp_path / "hard").best is None
    # the fastest model within a quality budget, by prefill speed
    fastest = SearchConfig.model_validate(
        {**base, "objective": "speedup", "budget": {"max_ppl_increase": 0.5, "speed": "prefill"}}
    )
    result = run_search(model, tok, calib, fastest, tmp_path / "fast")
    feasible = [t for t in result.trials if t["state"] == "COMPLETE" and all(c <= 0 for c in t["constraints"])]
    assert feasible and all(t["speedup"] > 0 and t["constraints"][2] == 0.0 for t in feasible)  # timed, no budget
    assert result.best is not None and result.best["speedup"] == max(t["speedup"] for t in feasible)


def test_per_group_sparsity_is_searched_and_predicted(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    from lmpress.evaluation import tensor_bytes

    loaded, _, calib = _setup(trained_dir, distill_text)
    model, tok = loaded.model, loaded.tokenizer  # type: ignore[attr-defined]
    space = {**SPACE, "bits": [4, 8], "sparsity": [0.0, 0.5], "drop_blocks": [0, 1]}
    cfg = {"space": space, "calib_windows": 16, "select_windows": 8, "trials": 8, "seed": 1,
           "budget": {"max_bytes": int(0.5 * tensor_bytes(model))}}  # fmt: skip
    result = run_search(model, tok, calib, SearchConfig.model_validate(cfg), tmp_path / "s")
    sens = result.sensitivity
    assert {"g0@s0.5", "g1@s0.5", "drop@1", "g0@4", "head@4", "embed@8"} <= set(sens)
    assert all(v >= 0 for v in sens.values()) and sens["drop@1"] > sens["g0@8"]  # a dropped block costs more
    sparse = [
        t for t in result.trials if "recipe" in t and any(s["method"] == "sparsegpt" for s in t["recipe"]["stages"])
    ]
    assert sparse, "no trial tried sparsity"
    measured = next(t for t in sparse if t["state"] == "COMPLETE" and "perplexity" in t and "repeat_of" not in t)
    alone = load_model(trained_dir("llama")).model  # the trial ran its shared stages once for proxy and trial
    ctx = Context(tokenizer=tok, device=torch.device("cpu"), calibration=lambda: _first(calib, 16))
    run_stages(alone, parse_recipe(measured["recipe"]), ctx)
    q = quality(alone, calib.windows[16:24], reference=model)  # type: ignore[attr-defined]
    assert q["perplexity"] == pytest.approx(measured["perplexity"], rel=1e-5)
    for t in sparse:  # the sparse group's codes are chosen by SparseGPT at the group's bits
        prune = next(s for s in t["recipe"]["stages"] if s["method"] == "sparsegpt")
        assert prune["bits"] in (4, 8) and prune["sparsity"] == 0.5
        assert t["predicted_kl"] >= sens["g0@s0.5"] or t["predicted_kl"] >= sens["g1@s0.5"]
    assert result.best is not None and result.best["bytes"] <= cfg["budget"]["max_bytes"]  # type: ignore[index]


def test_recovery_refines_the_best_candidates_and_its_recipe_reproduces(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    from lmpress.evaluation import tensor_bytes

    loaded, data, calib = _setup(trained_dir, distill_text)
    model, tok = loaded.model, loaded.tokenizer  # type: ignore[attr-defined]
    train = data.load(tok, "train", None)  # type: ignore[attr-defined]
    cfg = {"space": {**SPACE, "bits": [2]}, "calib_windows": 16, "select_windows": 8, "trials": 5, "objective": "kl",
           "budget": {"max_bytes": int(0.45 * tensor_bytes(model))},
           "recovery": {"steps": 12, "top_k": 2, "batch_size": 8, "lr": 1e-3, "codes": "frozen"}}  # fmt: skip
    with pytest.raises(LmpressError, match="recovery training needs the train split"):
        run_search(model, tok, calib, SearchConfig.model_validate(cfg), tmp_path / "none")
    result = run_search(model, tok, calib, SearchConfig.model_validate(cfg), tmp_path / "s", train=train)
    refined = [t for t in result.trials if "refines" in t]
    assert len(refined) == 2
    by_number = {t["number"]: t for t in result.trials}
    for r in refined:
        cand = by_number[r["refines"]]
        assert r["params"] == {**cand["params"], "recovery_steps": 12}
        assert r["recipe"]["stages"][:-1] == cand["recipe"]["stages"]
        assert r["recipe"]["stages"][-1]["method"] == "distill" and r["recipe"]["stages"][-1]["steps"] == 12
        assert r["bytes"] == cand["bytes"]  # training keeps the format
        assert r["kl"] < 0.97 * cand["kl"]  # and it moves closer to the original
    # the better of the two by at least 15% (12 steps: 18% and 9% here with transformers 5.24; 20%+ with 5.23)
    assert min(r["kl"] / by_number[r["refines"]]["kl"] for r in refined) < 0.85
    assert result.best is not None and "refines" in result.best  # a recovered candidate wins
    # resumed with the same settings: candidates already refined are not trained again
    again = run_search(model, tok, calib, SearchConfig.model_validate(cfg), tmp_path / "s", train=train)
    assert sum("refines" in t for t in again.trials) == 2
    # the winning recipe run alone (same calibration, train data and teacher) gives the same numbers
    alone = load_model(trained_dir("llama")).model
    ctx = Context(tokenizer=tok, device=torch.device("cpu"), calibration=lambda: _first(calib, 16),
                  training=lambda: train, teacher=model)  # fmt: skip
    run_stages(alone, parse_recipe(result.best["recipe"]), ctx)
    q = quality(alone, calib.windows[16:24], reference=model)  # type: ignore[attr-defined]
    assert q["perplexity"] == pytest.approx(result.best["perplexity"], rel=1e-4)


def test_cli_search_writes_recipes_pareto_models_and_tracks_the_study(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    import yaml
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    study, runs = tmp_path / "study", tmp_path / "runs"
    r = CliRunner().invoke(
        app,
        [
            "search",
            str(trained_dir("llama")),
            "--multi-objective",
            "--save-pareto",
            "--space",
            str(space),
            "--trials",
            "6",
            "--data",
            str(distill_text),
            "--seq-len",
            "32",
            "--calib-windows",
            "16",
            "--select-windows",
            "8",
            "--max-windows",
            "8",
            "--study-dir",
            str(study),
            "--track",
            "--runs-dir",
            str(runs),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    best = yaml.safe_load((study / "best.yaml").read_text())
    parse_recipe(best)  # an ordinary recipe file
    assert out["trials"] == 6 and out["pareto"] and (study / "report.html").is_file()
    # the final compress calibrated on the trials' windows: the best recipe run alone gives its trial's number
    assert out["reproduced_selection_perplexity"] == pytest.approx(out["best"]["perplexity"], rel=1e-5)
    assert sorted(p.name for p in (study / "pareto").glob("*.yaml")) == sorted(f"trial-{n}.yaml" for n in out["pareto"])
    # every Pareto recipe as a saved model with its metrics, and the sizes ordered as the front says
    assert [p["number"] for p in out["pareto_models"]] == out["pareto"]
    for p in out["pareto_models"]:
        reloaded = load_model(p["output"])
        assert reloaded.meta and p["metrics"]["perplexity"] > 0 and p["metrics"]["bytes"] > 0
    # the study is a run of its own, in MLflow with a series over trials
    record = json.loads((Path(out["search_run_dir"]) / "run.json").read_text())
    assert record["command"] == "search" and record["search"]["best_trial"] == out["best"]["number"]
    client = MlflowClient(f"sqlite:///{runs.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpress")
    assert exp is not None
    found = client.get_run(record["mlflow"]["run_id"])
    assert found.data.metrics["selection.perplexity"] == pytest.approx(out["best"]["perplexity"])
    assert found.data.metrics["study.trials"] == 6
    history = client.get_metric_history(found.info.run_id, "trial.perplexity")
    assert len(history) == sum(t["state"] == "COMPLETE" and "repeat_of" not in t for t in
                               json.loads((study / "trials.json").read_text())["trials"])  # fmt: skip
    assert {"trials.json", "report.html", "best.yaml", "run.json"} <= {
        a.path for a in client.list_artifacts(found.info.run_id)
    }


def test_calibration_and_selection_windows_are_the_compress_ones_and_disjoint() -> None:
    from lmpress.data import Manifest, TokenData, windows

    stream = torch.arange(100 * 4)
    every = windows(stream, 4)  # 100 windows, each identified by its first token
    data = TokenData(every, Manifest("test", "calib", 1, 400, "0"))
    from lmpress.recipe_search import calibration_and_selection

    cut = calibration_and_selection(data, 10, 6).windows
    assert torch.equal(cut[:10], windows(stream, 4, 10))  # what a compress run with 10 windows calibrates on
    calib_ids, select_ids = set(cut[:10, 0].tolist()), set(cut[10:, 0].tolist())
    assert len(select_ids) == 6 and not calib_ids & select_ids
    with pytest.raises(LmpressError, match="need 120"):
        calibration_and_selection(data, 100, 20)
