"""The HTML report: Pareto front math, a self-contained page, and a real headless browser that loads
it without errors and renders the plots (screenshot checked for content)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lmpress.cli import app
from lmpress.plots import pareto, scatter_svg
from lmpress.report import render, unique_labels, write_report

STAR, FRONT = (0xFF, 0xB0, 0x00), (0xE4, 0x57, 0x56)  # the original's star, the Pareto front's line


def _run(name: str, mb: float, ppl: float, kl: float, **extra: Any) -> dict[str, Any]:
    original = {"perplexity": 20.0, "bytes": 10e6, "parameters": 1e6, "bits_per_weight": 16.0}
    compressed = {"perplexity": ppl, "kl": kl, "top1_agreement": 0.9, "bytes": mb * 1e6, "parameters": 1e6}
    return {
        "name": name,
        "recipe": {"name": name},
        "metrics": {"original": original, "compressed": compressed},
        **extra,
    }


def test_pareto_front_keeps_only_undominated_points() -> None:
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0 + 1e-9)]
    assert pareto(pts) == [0, 1, 3]


def test_page_is_self_contained_and_has_every_part() -> None:
    samples = {"prompts": ["def f(", "import"], "original": ["x):", " os"], "compressed": ["y):", " sys"]}
    runs = [
        _run("small", 2.0, 25.0, 0.2, samples=samples),
        _run(
            "mid", 5.0, 21.0, 0.05, stages=[{"stage": 1, "method": "cluster", "output_error": {"a.q": 0.1, "a.k": 0.3}}]
        ),
        _run("bad", 6.0, 30.0, 0.5),
        _run("<script>", 9.0, 20.1, 0.01),
    ]
    page = render(runs)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "<script>" not in page and "&lt;script&gt;" in page  # names are escaped, no script at all
    assert page.count('class="original"') == 2  # the star in both plots
    assert page.count('class="pareto"') == 2
    assert page.count('class="run front"') == 2 * 3  # small, mid, <script>; bad is dominated
    assert "stage 1 cluster: output_error" in page and page.count('class="bar"') == 2
    assert "x):" in page and "y):" in page


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_report_renders_in_a_real_headless_browser(
    tiny_model_dir: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    browser = _browser()
    if browser is None:
        if os.environ.get("LMPRESS_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH; .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    runner = CliRunner()
    src = tiny_model_dir("llama")
    runs = tmp_path / "runs"
    for preset in ("w8", "w4"):
        r = runner.invoke(app, ["compress", str(src), "-r", preset, "--data", str(text_file), "--seq-len", "32",
                                "--max-windows", "4", "--calib-windows", "8", "--no-speed", "--samples", "1",
                                "--track", "--runs-dir", str(runs)])  # fmt: skip
        assert r.exit_code == 0, r.output
    run_dirs = sorted(p for p in runs.iterdir() if p.is_dir() and p.name != "mlartifacts")
    report = tmp_path / "report.html"
    r = runner.invoke(app, ["report", *map(str, run_dirs), "-o", str(report)])
    assert r.exit_code == 0 and report.is_file(), r.output
    shot = tmp_path / "report.png"
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr"]
    proc = subprocess.run(
        [browser, *flags, "--window-size=1200,900", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    for bad in ("Uncaught", "ERR_FILE_NOT_FOUND", "ERR_NAME_NOT_RESOLVED", "Failed to load resource"):
        assert bad not in proc.stderr, bad
    dom = subprocess.run([browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.stdout.count("<svg") >= 2 and dom.stdout.count('class="original"') == 2
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 50  # not blank: text, grid, points
    pixels = {c for _, c in colors}
    assert any(max(abs(a - b) for a, b in zip(c, STAR, strict=True)) < 8 for c in pixels)  # the star is drawn
    assert any(max(abs(a - b) for a, b in zip(c, FRONT, strict=True)) < 8 for c in pixels)  # the front is drawn
    keep = os.environ.get("LMPRESS_SCREENSHOT_DIR")
    if keep:  # for docs: the screenshot this test took
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report-screenshot.png")
    # a path that is no run is one clear line, exit code 2
    r = runner.invoke(app, ["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.html")])
    assert r.exit_code == 2 and "not a run directory" in r.output and not (tmp_path / "x.html").exists()


def test_write_report_refuses_runs_without_metrics(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text('{"command": "compress", "metrics": {}}')
    with pytest.raises(Exception, match="none of the runs has metrics"):
        write_report([run], tmp_path / "out.html")


def test_demo_runs_presets_prints_one_table_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = CliRunner().invoke(
        app, ["demo", "--presets", "w8,edge", "--out-dir", str(out), "--max-windows", "2", "--no-speed", "--no-track"]
    )
    assert r.exit_code == 0, r.output
    for name in ("original", "w8", "edge", "ppl", "bits/w"):
        assert name in r.output
    assert (out / "report.html").is_file() and f"report: {out / 'report.html'}" in r.output.replace("\n", "")
    assert (out / "models" / "edge" / "lmpress.json").is_file()
    runs = [p for p in (out / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 2 and not (out / "runs" / "mlflow.db").exists()  # --no-track: records, no MLflow
    r = CliRunner().invoke(app, ["demo", "--presets", "w8,nope", "--out-dir", str(tmp_path / "d2")])
    assert r.exit_code == 2 and "unknown preset nope" in r.output and not (tmp_path / "d2").exists()


def _data(source: str = "stdlib", windows: int = 64, sha: str = "ab" * 32) -> dict[str, Any]:
    return {"source": source, "split": "eval", "sha256": sha, "seq_len": 256, "windows": windows}


def test_runs_on_different_data_or_windows_are_never_on_one_front() -> None:
    runs = [
        _run("w8", 5.0, 20.5, 0.01, data=_data()),
        _run("w4", 3.0, 22.0, 0.05, data=_data()),
        _run("jsonl-w4", 3.0, 9.8, 0.04, data=_data("notes.jsonl", sha="cd" * 32)),  # other text
        _run("w4-8win", 3.0, 25.0, 0.06, data=_data(windows=8)),  # same text, other windows
    ]
    page = render(runs)
    head, *sets = page.split('<h2 class="group">')
    assert "3 different evaluation texts or window counts" in head and len(sets) == 3
    assert "stdlib (eval split), 64 windows" in sets[0] and "w8" in sets[0] and "w4" in sets[0]
    assert "notes.jsonl (eval split), 64 windows" in sets[1] and "sha256 cdcdcdcdcdcdcdcd" in sets[1]
    assert "stdlib (eval split), 8 windows" in sets[2]
    for name, k in (("jsonl-w4", 1), ("w4-8win", 2)):  # each run only in its own set's plots and table
        assert [name in s for s in sets] == [i == k for i in range(3)]
    assert sets[0].count('class="pareto"') == 2 and sets[1].count('class="pareto"') == 0  # one point: no line
    runs[1]["data"]["source"] = "/usr/lib/python3.11"  # the same text named another way: the same set
    single = render(runs[:2])  # one data set: no sets, its data named once at the top
    assert '<h2 class="group">' not in single and single.count("stdlib (eval split), 64 windows × 256 tokens") == 1


def test_runs_of_one_name_are_told_apart() -> None:
    runs = [
        _run("w4", 3.0, 22.0, 0.05, created="2026-12-07T08:24:28+0000"),
        _run("w4", 3.1, 21.0, 0.04, created="2026-12-07T08:25:52+0000"),
        _run("w4", 3.2, 21.5, 0.05, path="runs/20261207-082552-compress-w4-1"),  # time from the directory
        _run("w8", 5.0, 20.5, 0.01),
    ]
    assert unique_labels(runs) == ["w4 08:24:28", "w4 08:25:52 #1", "w4 08:25:52 #2", "w8"]
    page = render(runs)
    for label in unique_labels(runs):
        assert f">{label}</text>" in page and f'<td class="l">{label}</td>' in page


def test_labels_stay_inside_the_plot_and_off_each_other() -> None:
    """Crowded points at the top of the plot: no label rises into the title or leaves the plot, and
    no two labels overlap."""
    import re

    pts = [(f"recipe-{k}", 1.0 + 0.01 * k, 30.0 - 0.01 * k) for k in range(8)] + [("low", 9.0, 10.0)]
    svg = scatter_svg("held-out perplexity vs size", "MB", "ppl", pts, (10.0, 10.0))
    boxes = []
    for x, y, anchor, name in re.findall(
        r'<text class="label" x="([\d.]+)" y="([\d.]+)"( text-anchor="end")?[^>]*>([^<]+)<', svg
    ):
        width = 6.2 * len(name)
        left = float(x) - width if anchor else float(x)
        boxes.append((left, float(y) - 9.5, left + width, float(y) + 2.5))
    assert len(boxes) == len(pts) + 1  # and the original's
    title_bottom, (W, H) = 22, (520, 360)
    for b in boxes:
        assert b[1] >= title_bottom and b[3] <= H - 48 and b[0] >= 0 and b[2] <= W, b
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_report_of_a_runs_directory_passes_over_what_tracking_keeps_there(tmp_path: Path) -> None:
    """`lmpress report lmpress-runs/*`: the MLflow store, TensorBoard curves and hidden files that
    lmpress's tracking keeps beside the runs are not runs; a foreign directory is still one line."""
    import json

    runs_dir = tmp_path / "lmpress-runs"
    for k, name in enumerate(("w8", "w4")):
        run = runs_dir / f"20261207-08000{k}-compress-{name}"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps(_run(name, 5.0 - k, 20.0 + k, 0.01 * (k + 1), data=_data())))
    for d in ("mlartifacts/1/abc", "tensorboard/stage1", ".cache"):
        (runs_dir / d).mkdir(parents=True)
    for f in ("mlflow.db", "mlflow.db-journal", ".DS_Store"):
        (runs_dir / f).write_text("")
    out = tmp_path / "report.html"
    r = CliRunner().invoke(app, ["report", *map(str, sorted(runs_dir.iterdir())), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text().count('class="run') == 2 * 2  # two runs, both plots
    foreign = tmp_path / "notes"
    foreign.mkdir()
    r = CliRunner().invoke(app, ["report", *map(str, sorted(runs_dir.iterdir())), str(foreign), "-o", str(out)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and f"{foreign} is not a run directory" in r.output
