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
from lmpress.errors import LmpressError
from lmpress.evaluation import quality
from lmpress.models.loading import load_model
from lmpress.pipeline import DataOptions, run_stages
from lmpress.recipe import parse_recipe
from lmpress.registry import Context
from lmpress.search import SearchConfig, block_groups, build_recipe, run_search
from lmpress.select import matches

SPACE = {"bits": [2, 4, 8], "group_sizes": [32], "head_bits": [None, 4], "embedding_bits": [None, 4]}


def test_block_groups_and_recipes_from_choices() -> None:
    assert block_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert block_groups(2, 4) == [[0], [1]]
    choice = {"method": "gptq", "bits_g0": 4, "bits_g1": 2, "group_size": 64, "head_bits": 8, "embedding_bits": 4,
              "sparsity": 0.5, "drop_blocks": 1}  # fmt: skip
    recipe = build_recipe(choice, "model.layers", [[0, 1], [2, 3]], "r")
    methods = [s["method"] for s in recipe["stages"]]
    assert methods == ["drop_blocks", "sparsegpt", "gptq"]
    quant = recipe["stages"][-1]
    assert quant["bits"] == 4 and quant["embedding_bits"] == 4 and quant["ignore"] == []
    block_rule, head_rule = quant["overrides"]
    assert matches("model.layers.3.mlp.up_proj", block_rule["targets"]) and block_rule["bits"] == 2
    assert not matches("model.layers.1.mlp.up_proj", block_rule["targets"])
    assert head_rule == {"targets": ["lm_head"], "bits": 8}
    parse_recipe(recipe)  # a valid recipe


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
from lmpress.models.loading import load_model
from lmpress.pipeline import DataOptions
from lmpress.search import SearchConfig, run_search
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
    with pytest.raises(LmpressError, match="give a budget"):
        run_search(model, tok, calib, SearchConfig.model_validate({"space": SPACE}), tmp_path / "s")
    runner = CliRunner()
    bad = tmp_path / "space.yaml"
    for text, message in (("methods: [gptq, magic]\n", "unknown method 'magic'"), ("bits: []\n", "empty list"),
                          ("colour: red\n", "colour")):  # fmt: skip
        bad.write_text(text)
        r = runner.invoke(app, ["search", str(trained_dir("llama")), "--max-bytes", "1MB", "--space", str(bad),
                                "--study-dir", str(tmp_path / "cli")])  # fmt: skip
        assert r.exit_code == 2 and message in r.output, r.output
    r = runner.invoke(app, ["search", "--max-bytes", "lots"])
    assert r.exit_code == 2 and "is not a size" in r.output
