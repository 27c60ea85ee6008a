"""One self-contained HTML page comparing runs: what each compression bought and what it cost.

The page works offline: plots are inline SVG (`lmpress.plots`), styles are inline, there is no script and
nothing is fetched. It shows

- the trade-off plots: perplexity and KL against size on disk, the original marked, the Pareto
  front (no other run is both smaller and better) drawn as a line;
- per-layer charts where a stage measured something per layer (clustering's output error,
  low-rank ranks, structured widths, ...);
- generation samples: the original's and each run's greedy continuation of the same prompts;
- the full metrics table.

Runs measured on different text (another data set, split or sequence length) or on a different
number of windows are never compared on one front: each such group is a section of its own, its
header naming the data. Runs of the same name are told apart by the time they were made.

Input: run directories (``run.json`` from `lmpress.track`) or saved model directories
(``lmpress.json``); what lmpress's tracking itself keeps beside the runs in a runs directory (the
MLflow store, TensorBoard curves, hidden files) is passed over, so ``lmpress-runs/*`` works.
"""

from __future__ import annotations

import html
import math
import re
import time
from pathlib import Path
from typing import Any

from lmpress.errors import LmpressError
from lmpress.io import write_text_atomic
from lmpress.plots import bars_svg, scatter_svg
from lmpress.track import load_run

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1100px;color:#222;
padding:0 16px}
h1{font-size:24px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin-top:20px}h2.group{background:#f4f4f4;padding:6px 8px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}tr.orig td{background:#fff8e1}
.plots{display:flex;flex-wrap:wrap;gap:16px}.note{color:#555;font-size:13px}
pre{white-space:pre-wrap;font-size:12px;margin:0;max-height:180px;overflow:auto}
.sample td{vertical-align:top;text-align:left}
"""


def _size_mb(m: dict[str, Any]) -> float | None:
    """Megabytes on disk when the model was saved, else of its tensors in memory."""
    for key in ("bytes_on_disk", "bytes"):
        b = m.get(key)
        if isinstance(b, int | float) and b == b and b > 0:  # b == b: not NaN
            return float(b) / 1e6
    return None


def _seconds(run: dict[str, Any]) -> float | None:
    stages = run.get("stages") or []
    total = sum(float(s.get("seconds", 0)) for s in stages if isinstance(s, dict))
    return total if stages else None


def points(
    runs: list[dict[str, Any]], labels: list[str] | None = None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The original's metrics (from the first run that has them) and one point per run."""
    labels = labels or unique_labels(runs)
    original = next((r["metrics"]["original"] for r in runs if (r.get("metrics") or {}).get("original")), None)
    pts = []
    for r, label in zip(runs, labels, strict=True):
        m = (r.get("metrics") or {}).get("compressed") or (r.get("metrics") or {}).get("evaluated")
        if not m:
            continue
        pts.append({"label": label, "metrics": m, "run": r, "size": _size_mb(m)})
    return original, pts


def label_of(run: dict[str, Any], i: int) -> str:
    recipe = run.get("recipe") or {}
    return str(recipe.get("name") or run.get("name") or f"run {i + 1}")


def unique_labels(runs: list[dict[str, Any]]) -> list[str]:
    """Each run's name (its recipe's, else the run's); a name several runs share gets the time its run
    was made (``w4 08:24:28``), and an index where even that repeats (``w4 08:24:28 #2``)."""
    base = [label_of(r, i) for i, r in enumerate(runs)]
    labels = [f"{b} {_made_at(r)}".rstrip() if base.count(b) > 1 else b for b, r in zip(base, runs, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return out


def _made_at(run: dict[str, Any]) -> str:
    """When a run was made, as HH:MM:SS: from its record, else from its directory's name."""
    created = str(run.get("created") or "")
    if m := re.match(r"\d{4}-\d\d-\d\dT(\d\d:\d\d:\d\d)", created):
        return m.group(1)
    if m := re.match(r"\d{8}-(\d\d)(\d\d)(\d\d)-", Path(str(run.get("path") or "")).name):
        return ":".join(m.groups())
    return ""


def data_key(run: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a run's numbers were measured on: the evaluation text (its content hash, else its source;
    the same file named two ways is the same text), the split, the window length and the number of
    windows; None when the run recorded none."""
    d = run.get("data")
    if not isinstance(d, dict):
        return None
    return (d.get("sha256") or str(d.get("source")), d.get("split"), d.get("seq_len"), d.get("windows"))


def data_note(data: dict[str, Any]) -> str:
    """One line naming what a group of runs was measured on."""
    return (
        f"Evaluation text: {html.escape(str(data.get('source')))} ({data.get('split')} split), "
        f"{data.get('windows')} windows × {data.get('seq_len')} tokens, sha256 {str(data.get('sha256'))[:16]}."
    )


def groups(runs: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of the runs with metrics measured on the same text and windows, one list per
    `data_key`, in the order each first appears."""
    keyed: dict[tuple[Any, ...] | None, list[int]] = {}
    for i, r in enumerate(runs):
        if (r.get("metrics") or {}).get("compressed") or (r.get("metrics") or {}).get("evaluated"):
            keyed.setdefault(data_key(r), []).append(i)
    return list(keyed.values())


def per_layer(run: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """Every stage-report entry that maps layer names to numbers (at least two layers)."""
    out = []
    for s in run.get("stages") or []:
        if not isinstance(s, dict):
            continue
        for key, value in s.items():
            if (
                isinstance(value, dict)
                and len(value) >= 2
                and all(isinstance(k, str) and "." in k for k in value)
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values())
            ):
                out.append(
                    (f"stage {s.get('stage')} {s.get('method')}: {key}", {k: float(v) for k, v in value.items()})
                )
    return out


COLUMNS = [
    ("perplexity", "ppl", "{:.3f}"),
    ("kl", "KL", "{:.4f}"),
    ("top1_agreement", "top-1", "{:.3f}"),
    ("parameters", "params", "{:,.0f}"),
    ("size", "MB", "{:.2f}"),
    ("bits_per_weight", "bits/w", "{:.2f}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:,.0f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:,.1f}"),
    ("peak_memory_mb", "peak MiB", "{:,.0f}"),
    ("seconds", "compress s", "{:.1f}"),
]


def _cell(fmt: str, v: Any) -> str:
    return fmt.format(v) if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)) else "-"


def metrics_table(original: dict[str, Any] | None, pts: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    rows = [f'<tr><th class="l">run</th>{head}</tr>']
    entries = ([("original", {**original, "size": _size_mb(original)}, None)] if original else []) + [
        (p["label"], {**p["metrics"], "size": p["size"]}, _seconds(p["run"])) for p in pts
    ]
    for name, m, secs in entries:
        m = {**m, "seconds": secs}
        cells = "".join(f"<td>{_cell(fmt, m.get(key))}</td>" for key, _, fmt in COLUMNS)
        cls = ' class="orig"' if name == "original" and m.get("seconds") is None else ""
        rows.append(f'<tr{cls}><td class="l">{html.escape(name)}</td>{cells}</tr>')
    return "<table>" + "".join(rows) + "</table>"


def samples_html(pts: list[dict[str, Any]]) -> str:
    with_samples = [p for p in pts if (p["run"].get("samples") or {}).get("prompts")]
    if not with_samples:
        return '<p class="note">No generation samples (runs were made with --samples 0 or without evaluation).</p>'
    prompts = with_samples[0]["run"]["samples"]["prompts"]
    parts = []
    for k, prompt in enumerate(prompts):
        rows = [f'<tr><th class="l">prompt</th><td><pre>{html.escape(prompt)}</pre></td></tr>']
        original = with_samples[0]["run"]["samples"]["original"][k]
        rows.append(f'<tr class="orig"><th class="l">original</th><td><pre>{html.escape(original)}</pre></td></tr>')
        for p in with_samples:
            s = p["run"]["samples"]
            if s.get("prompts") == prompts:
                name, text = html.escape(p["label"]), html.escape(s["compressed"][k])
                rows.append(f'<tr><th class="l">{name}</th><td><pre>{text}</pre></td></tr>')
        parts.append('<table class="sample">' + "".join(rows) + "</table>")
    return "".join(parts)


def render(runs: list[dict[str, Any]], title: str = "lmpress report") -> str:
    """The page: one section per set of runs measured on the same text and windows (`groups`)."""
    labels = unique_labels(runs)
    parts = groups(runs)
    n_points = len(points(runs, labels)[1])
    body = [f"<h1>{html.escape(title)}</h1>"]
    if len(parts) <= 1:
        note = data_note(runs[parts[0][0]]["data"]) if parts and data_key(runs[parts[0][0]]) else ""
        body.append(f'<p class="note">{n_points} runs, generated {time.strftime("%Y-%m-%d %H:%M")}. {note}</p>')
        body += _section(runs, labels, level=2)
    else:
        body.append(
            f'<p class="note">{n_points} runs, generated {time.strftime("%Y-%m-%d %H:%M")}, measured on '
            f"{len(parts)} different evaluation texts or window counts. Numbers measured on different text "
            "do not compare, so each set is its own section: its plots, front and table hold only its runs.</p>"
        )
        for k, idx in enumerate(parts, 1):
            first = runs[idx[0]]
            what = data_note(first["data"]) if data_key(first) else "Runs that recorded no evaluation data."
            runs_word = "run" if len(idx) == 1 else "runs"
            body.append(
                f'<h2 class="group">Set {k} of {len(parts)}: {len(idx)} {runs_word}</h2><p class="note">{what}</p>'
            )
            body += _section([runs[i] for i in idx], [labels[i] for i in idx], level=3)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>" + "".join(body) + "</body></html>"
    )


def _section(runs: list[dict[str, Any]], labels: list[str], level: int) -> list[str]:
    """Plots, metrics table, samples and per-layer charts of runs measured on the same windows."""
    h = f"h{level}"
    original, pts = points(runs, labels)
    if not pts:
        return ['<p class="note">None of these runs has metrics.</p>']
    orig_size = _size_mb(original) if original else None
    plots = []
    for key, label in (("perplexity", "held-out perplexity"), ("kl", "KL vs the original (nats/token)")):
        data = [(p["label"], p["size"], float(p["metrics"][key])) for p in pts if p["size"] and key in p["metrics"]]
        base_y = (original or {}).get(key, 0.0 if key == "kl" else None)  # the original's KL to itself is 0
        base_point = (orig_size, float(base_y)) if orig_size is not None and base_y is not None else None
        if data:
            plots.append(scatter_svg(f"{label} vs size", "size on disk (MB)", label, data, base_point))
    layers = [(f"{p['label']} — {name}", values) for p in pts for name, values in per_layer(p["run"])]
    body = [
        f"<{h}>Quality against size</{h}>",
        '<p class="note">Lower is better on both axes. The star is the original; circles ringed in red are on the '
        "Pareto front (no other run is both smaller and better), joined by the dashed line.</p>",
        '<div class="plots">' + "".join(plots) + "</div>",
        f"<{h}>Metrics</{h}>",
        metrics_table(original, pts),
        '<p class="note">KL and top-1 agreement compare each run with the original on the same tokens. Speeds are '
        "measured in each run's own process: compare them within one run (the demo measures all runs together).</p>",
        f"<{h}>Generation samples</{h}>",
        '<p class="note">Greedy continuations of openings of the evaluation text.</p>',
        samples_html(pts),
    ]
    if layers:
        body += [f"<{h}>Per-layer measurements</{h}>", '<div class="plots">']
        body += [bars_svg(name, values) for name, values in layers]
        body += ["</div>"]
    return body


# What lmpress's tracking keeps in a runs directory beside the run directories (MLflow's SQLite
# store and artifacts, TensorBoard curves): `lmpress report lmpress-runs/*` passes over these.
TRACKING_FILES = ("mlartifacts", "mlruns", "tensorboard")


def is_tracking_file(path: Path) -> bool:
    """True for what lmpress's tracking (or the file system) keeps beside runs, never a run itself."""
    name = path.name
    return name.startswith(".") or name in TRACKING_FILES or name.startswith("mlflow.db")


def write_report(paths: list[Path], out: Path, title: str = "lmpress report") -> Path:
    """Read run (or model) directories, write the report to ``out`` atomically; returns ``out``."""
    paths = [p for p in paths if not is_tracking_file(p)]
    if not paths:
        raise LmpressError("report: give at least one run directory (see `lmpress compress`'s 'run:' line)")
    runs = [load_run(p) for p in paths]
    if not points(runs)[1]:
        raise LmpressError("report: none of the runs has metrics; run compress or eval with evaluation on")
    write_text_atomic(out, render(runs, title))
    return out
