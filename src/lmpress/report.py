"""One self-contained HTML page comparing runs: what each compression bought and what it cost.

The page works offline: plots are inline SVG drawn here, styles are inline, there is no script and
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
from lmpress.track import load_run

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]
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


def pareto(items: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (smaller is better), by x."""
    front = []
    for i, (x, y) in enumerate(items):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(items) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: items[i])


def scatter_svg(
    title: str, xlabel: str, ylabel: str, pts: list[tuple[str, float, float]], original: tuple[float, float] | None
) -> str:
    """A scatter plot with labelled points, the Pareto front as a line and the original as a star."""
    W, H, L, R, T, B = 520, 360, 64, 16, 36, 48
    xs = [p[1] for p in pts] + ([original[0]] if original else [])
    ys = [p[2] for p in pts] + ([original[1]] if original else [])
    if not xs:
        return ""
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    padx, pady = (x1 - x0) * 0.08 or abs(x0) * 0.1 or 1, (y1 - y0) * 0.1 or abs(y0) * 0.1 or 1
    x0, x1 = x0 - padx, x1 + 2.5 * padx  # room on the right for labels
    nonneg = y0 >= 0
    y0, y1 = y0 - pady, y1 + pady
    widest = max(len(_tick(y0 + (y1 - y0) * k / 4, y1 - y0)) for k in range(5))
    L = max(L, round(30 + 6.3 * widest))  # room for the y ticks beside the axis title, not under it

    def sx(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def sy(y: float) -> float:
        return H - B - (y - y0) / (y1 - y0) * (H - T - B)

    out = [_svg_open(W, H, title)]
    out.append(f'<rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/>')
    out.append(
        f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="600">{html.escape(title)}</text>'
    )
    for k in range(5):  # grid and ticks
        gx, gy = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        out.append(f'<line x1="{sx(gx):.1f}" y1="{T}" x2="{sx(gx):.1f}" y2="{H - B}" stroke="#eee"/>')
        out.append(f'<line x1="{L}" y1="{sy(gy):.1f}" x2="{W - R}" y2="{sy(gy):.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{sx(gx):.1f}" y="{H - B + 16}" text-anchor="middle" font-size="11">{_tick(gx, x1 - x0)}</text>'
        )
        if gy >= 0 or not nonneg:  # no negative ticks on an axis of non-negative numbers
            out.append(
                f'<text x="{L - 6}" y="{sy(gy) + 4:.1f}" text-anchor="end" font-size="11">{_tick(gy, y1 - y0)}</text>'
            )
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#888"/>')
    out.append(
        f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle" font-size="12">{html.escape(xlabel)}</text>'
    )
    out.append(
        f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {(T + H - B) / 2})">{html.escape(ylabel)}</text>'
    )
    front = pareto([(p[1], p[2]) for p in pts])
    if len(front) > 1:
        path = " ".join(f"{sx(pts[i][1]):.1f},{sy(pts[i][2]):.1f}" for i in front)
        out.append(
            f'<polyline class="pareto" points="{path}" fill="none" stroke="#e45756" stroke-width="2" '
            'stroke-dasharray="6 3"/>'
        )
    placed: list[tuple[float, float, float, float]] = []  # label boxes so far (x0, y0, x1, y1)
    area = (L, T, W - R, H - B)
    if original:
        olx, oly, oanchor = label_position(sx(original[0]), sy(original[1]), len("original"), placed, area)
    for i, (name, x, y) in enumerate(pts):
        on_front = i in front
        color = COLORS[i % len(COLORS)]
        out.append(
            f'<circle class="run{" front" if on_front else ""}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" '
            f'r="{7 if on_front else 5}" '
            f'fill="{color}" stroke="{"#e45756" if on_front else "#fff"}" stroke-width="2"><title>{html.escape(name)}: '
            f"{_num(x)}, {_num(y)}</title></circle>"
        )
        lx, ly, anchor = label_position(sx(x), sy(y), len(name), placed, area)
        if abs(ly - 4 - sy(y)) > 16:  # moved off its point to stay clear of others: a leader line to it
            out.append(
                f'<line class="leader" x1="{sx(x):.1f}" y1="{sy(y):.1f}" x2="{lx:.1f}" y2="{ly - 4:.1f}" '
                'stroke="#bbb" stroke-width="1"/>'
            )
        out.append(f'<text class="label" x="{lx:.1f}" y="{ly:.1f}"{anchor} font-size="11">{html.escape(name)}</text>')
    if original:
        ox, oy = sx(original[0]), sy(original[1])
        star = " ".join(
            f"{ox + (9 if k % 2 == 0 else 4) * math.sin(k * math.pi / 5):.1f},"
            f"{oy - (9 if k % 2 == 0 else 4) * math.cos(k * math.pi / 5):.1f}"
            for k in range(10)
        )
        out.append(
            f'<polygon class="original" points="{star}" fill="#ffb000" stroke="#333"><title>original</title></polygon>'
        )
        out.append(
            f'<text class="label" x="{olx:.1f}" y="{oly:.1f}"{oanchor} font-size="11" font-weight="600">original</text>'
        )
    out.append("</svg>")
    return "".join(out)


def label_position(
    px: float,
    py: float,
    chars: int,
    placed: list[tuple[float, float, float, float]],
    area: tuple[float, float, float, float],
) -> tuple[float, float, str]:
    """Where a point's label goes: beside the point (right, else left), moved up or down in steps
    until it overlaps no label placed before, always inside the plot ``area`` (x0, y0, x1, y1), so
    it never runs into the title, the axis or off the picture. Appends its box to ``placed``;
    returns the text's x, baseline y and text-anchor attribute."""
    width, height = 6.2 * chars, 12.0  # 11 px text: about 6 px a character
    x0, y0, x1, y1 = area
    right = px + 9 + width <= x1 or px - 9 - width < x0
    left_edge = px + 9 if right else px - 9 - width

    def box(top: float) -> tuple[float, float, float, float]:
        return (left_edge, top, left_edge + width, top + height)

    def free(b: tuple[float, float, float, float]) -> bool:
        return all(b[2] <= p[0] or b[0] >= p[2] or b[3] <= p[1] or b[1] >= p[3] for p in placed)

    lowest = max(y0 + 1, y1 - height - 1)
    start = min(max(py - height - 1, y0 + 1), lowest)  # just above the point, inside the area
    tops = sorted(  # then a line further up or down at a time, nearest first, clamped to the area
        {min(max(start + d * (height + 1) * k, y0 + 1), lowest) for k in range(30) for d in (-1, 1)},
        key=lambda t: abs(t - start),
    )
    top = next((t for t in tops if free(box(t))), start)
    placed.append(box(top))
    anchor = "" if right else ' text-anchor="end"'
    return (left_edge if right else left_edge + width), top + height - 2.5, anchor


def bars_svg(title: str, values: dict[str, float]) -> str:
    """A horizontal bar chart of per-layer numbers (layer names shortened to their tail)."""
    items = list(values.items())[:96]
    row, L, W = 14, 190, 520
    H = 30 + row * len(items) + 10
    top = max((abs(v) for _, v in items), default=1.0) or 1.0
    out = [_svg_open(W, H, title)]
    out.append(f'<rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/>')
    out.append(f'<text x="4" y="16" font-size="13" font-weight="600">{html.escape(title)}</text>')
    for k, (name, v) in enumerate(items):
        y = 26 + k * row
        short = ".".join(name.split(".")[-3:])
        width = abs(v) / top * (W - L - 60)
        out.append(f'<text x="{L - 4}" y="{y + 10}" text-anchor="end" font-size="10">{html.escape(short)}</text>')
        out.append(f'<rect class="bar" x="{L}" y="{y}" width="{max(width, 1):.1f}" height="{row - 3}" fill="#4c78a8"/>')
        out.append(f'<text x="{L + width + 4:.1f}" y="{y + 10}" font-size="10">{_num(v)}</text>')
    out.append("</svg>")
    return "".join(out)


def _svg_open(width: int, height: int, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">'
    )


def _tick(v: float, span: float) -> str:
    """An axis label with as many decimals as the axis' span needs."""
    if abs(v) < 1e-3 * span:
        return "0"
    if span < 1e-3 or abs(v) < 1e-3:
        return f"{v:.2e}"
    decimals = max(0, min(6, 1 - math.floor(math.log10(span / 4))))
    return f"{v:,.{decimals}f}"


def _num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.1e}"


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
    from lmpress.io import write_text_atomic

    write_text_atomic(out, render(runs, title))
    return out
