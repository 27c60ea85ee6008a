"""Standard tasks through lm-evaluation-harness: a local multiple-choice task (YAML over a JSONL the
test writes), scored by lm-eval through lmpress's model interface, against a hand computation of
the same log-likelihoods; a rolling-perplexity task and a generation task the same way; any format
lmpress loads (a packed 4-bit model, a GGUF file in llama.cpp)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import lmpress
from lmpress.cli import app
from tests.export.helpers import compress

pytest.importorskip("lm_eval")

runner = CliRunner()

QUESTIONS = [
    ("def add(a, b):\n    return a", [" + b", " - b", " * b", " / b"], 0),
    ("import os\nimport", [" sys", " banana", " (((", " 123"], 0),
    ("for i in range(10):\n    print(", ["i)", "]]]", "def", " class"], 0),
    ("class Foo:\n    def __init__(self", ["):", ", x):", " = 3", " import"], 1),
    ("if x is None:\n    raise", [" ValueError", " import", " for", " 7"], 0),
    ("try:\n    pass\nexcept", [" Exception:", " return", " while", " )"], 0),
    ("with open(path) as", [" f:", " 12", " else", " ]"], 0),
    ("    def __repr__(self):\n        return", [" f'", " import", " class", " while"], 0),
    ("x = [i for i in", [" range(n)]", " import]", " class)", " +++"], 0),
    ("from collections import", [" OrderedDict", " 42", " ((", " return"], 0),
    ("while True:\n    line = f.", ["readline()", "42", "class", "import"], 0),
    ("def __init__(self, name", ["):", " return", " import", "]]"], 0),
]
TEXTS = [
    "def main():\n    print('hello')\n",
    "import sys\n\nfor arg in sys.argv:\n    print(arg)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
]
PROMPTS = [("for i in", " range(self.size):"), ("import", " os"), ("def add(a, b):\n    return", " a + b")]


def _write_tasks(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mc.jsonl", "w") as f:
        for q, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    with open(root / "text.jsonl", "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")
    with open(root / "gen.jsonl", "w") as f:
        for p, a in PROMPTS:
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")

    def data(name: str) -> str:
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name}\ntest_split: test\n"

    (root / "mc.yaml").write_text(
        "task: lmpress_mc\n" + data("mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "text.yaml").write_text(
        "task: lmpress_text\n" + data("text.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "gen.yaml").write_text(
        "task: lmpress_gen\n" + data("gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tasks(tmp_path_factory.mktemp("tasks"))


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def _logprob(model: torch.nn.Module, ids: list[int], n: int) -> float:
    """log p of the last ``n`` of ``ids`` given the ones before."""
    logits = model(input_ids=torch.tensor([ids[:-1]]), use_cache=False).logits[0].float()
    logp = logits.log_softmax(-1)[-n:]
    return float(logp.gather(-1, torch.tensor(ids[-n:])[:, None]).sum())


def hand_mc(model: torch.nn.Module, tok: Any) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per character of the choice), one sequence at a time."""
    acc = norm = 0
    for q, choices, answer in QUESTIONS:
        ctx = _encode(tok, q)
        lls = []
        for c in choices:
            cont = _encode(tok, q + c)[len(ctx) :]
            lls.append(_logprob(model, ctx + cont, len(cont)))
        acc += int(max(range(len(choices)), key=lambda i: lls[i]) == answer)
        norm += int(max(range(len(choices)), key=lambda i: lls[i] / len(choices[i])) == answer)
    return {"acc": acc / len(QUESTIONS), "acc_norm": norm / len(QUESTIONS)}


def hand_text(model: torch.nn.Module, tok: Any) -> dict[str, float]:
    """Whole documents after the end-of-text token (each fits one window); words as lm-eval counts
    them (pieces between runs of whitespace, so a final newline ends one empty word)."""
    ll = sum(_logprob(model, [tok.eos_token_id, *_encode(tok, t)], len(_encode(tok, t))) for t in TEXTS)
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)
    nbytes = sum(len(t.encode()) for t in TEXTS)
    return {"word_perplexity": math.exp(-ll / words), "bits_per_byte": -ll / nbytes / math.log(2)}


def test_scores_are_lm_eval_over_the_models_own_log_likelihoods(task_dir: Path) -> None:
    builtin = lmpress.load("builtin", device="cpu")
    packed = compress([{"method": "rtn", "bits": 4, "group_size": 64}])
    for loaded in (builtin, packed):
        r = lmpress.evaluate_tasks(loaded, ["lmpress_mc", "lmpress_text"], task_path=[task_dir], batch_size=5)
        mc, text = r.scores.scores["lmpress_mc"], r.scores.scores["lmpress_text"]
        assert mc == pytest.approx(hand_mc(loaded.model, loaded.tokenizer), abs=1e-9)
        assert 0.0 < mc["acc"] < 1.0  # the task separates; neither all right nor all wrong
        hand = hand_text(loaded.model, loaded.tokenizer)
        assert text["word_perplexity"] == pytest.approx(hand["word_perplexity"], rel=1e-4)
        assert text["bits_per_byte"] == pytest.approx(hand["bits_per_byte"], rel=1e-4)
        assert r.scores.samples == {"lmpress_mc": len(QUESTIONS), "lmpress_text": len(TEXTS)}
        assert r.scores.stderr["lmpress_mc"]["acc"] == pytest.approx(
            math.sqrt(mc["acc"] * (1 - mc["acc"]) / (len(QUESTIONS) - 1)), rel=1e-6
        )
    # 4 bits cost the built-in model something on the same text
    assert r.scores.scores["lmpress_text"]["word_perplexity"] != pytest.approx(
        hand_text(builtin.model, builtin.tokenizer)["word_perplexity"], rel=1e-6
    )


def test_generation_is_greedy_until_the_stop_string(task_dir: Path) -> None:
    loaded = lmpress.load("builtin", device="cpu")
    tok = loaded.tokenizer
    hits = 0
    for prompt, answer in PROMPTS:
        ids = torch.tensor([_encode(tok, prompt)])
        out = loaded.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        hits += int(text == answer)
    assert 0 < hits < len(PROMPTS)
    r = lmpress.evaluate_tasks(loaded, ["lmpress_gen"], task_path=[task_dir])
    assert r.scores.scores["lmpress_gen"]["exact_match"] == pytest.approx(hits / len(PROMPTS))


def test_cli_side_by_side_and_recorded(task_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4"
    r = runner.invoke(app, ["compress", "-r", "w4", "-o", str(out), "--no-eval", "--no-track", "-q"])
    assert r.exit_code == 0, r.output
    args = ["eval", str(out), "--reference", "builtin", "--tasks", "lmpress_mc", "--task-path", str(task_dir)]
    r = runner.invoke(app, [*args, "--json", "--track", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    ref = lmpress.load("builtin", device="cpu")
    assert result["reference"]["scores"]["lmpress_mc"] == pytest.approx(hand_mc(ref.model, ref.tokenizer))
    model = lmpress.load(out, device="cpu")
    assert result["scores"]["lmpress_mc"] == pytest.approx(hand_mc(model.model, model.tokenizer))
    record = json.loads((Path(result["run_dir"]) / "run.json").read_text())
    assert record["metrics"]["evaluated"]["lmpress_mc/acc"] == result["scores"]["lmpress_mc"]["acc"]
    assert (
        record["metrics"]["reference"]["lmpress_mc/acc_norm"] == result["reference"]["scores"]["lmpress_mc"]["acc_norm"]
    )
    r = runner.invoke(app, [*args, "--no-track"])
    assert r.exit_code == 0, r.output
    assert "lmpress_mc" in r.stdout and "acc_norm" in r.stdout and "reference" in r.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "lmpress_nope"], "no task lmpress_nope"),
        (["--tasks", "lmpress_mc", "--data", "x.txt"], "--data choose held-out text"),
        (["--tasks", "lmpress_mc", "--task-path", "/nonexistent"], "task directory /nonexistent does not exist"),
        (["--tasks", ","], "no task named"),
    ],
)
def test_bad_task_input_is_one_line(task_dir: Path, extra: list[str], message: str) -> None:
    args = ["eval", "builtin", *extra]
    if "--task-path" not in extra:
        args += ["--task-path", str(task_dir)]
    r = runner.invoke(app, [*args, "--no-track"])
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.count("\n") == 1, r.output


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs lmpress[gguf]")
def test_a_gguf_file_is_scored_in_llama_cpp(task_dir: Path, tmp_path: Path) -> None:
    from lmpress.export import export

    path = tmp_path / "m.gguf"
    export(lmpress.load("builtin", device="cpu"), "gguf", path)
    loaded = lmpress.load(path)
    r = lmpress.evaluate_tasks(loaded, ["lmpress_mc"], task_path=[task_dir])
    assert type(loaded.model).__name__ == "LlamaCppModel"
    assert r.scores.scores["lmpress_mc"] == pytest.approx(hand_mc(loaded.model, loaded.tokenizer))
