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
from lmpress.report import pareto, render, write_report

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
