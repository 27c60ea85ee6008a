"""One self-contained HTML page comparing runs: what each compression bought and what it cost.

The page works offline: plots are inline SVG drawn here, styles are inline, there is no script and
nothing is fetched. It shows

- the trade-off plots: perplexity and KL against size on disk, the original marked, the Pareto
  front (no other run is both smaller and better) drawn as a line;
- per-layer charts where a stage measured something per layer (clustering's output error,
  low-rank ranks, structured widths, ...);
- generation samples: the original's and each run's greedy continuation of the same prompts;
- the full metrics table.

Input: run directories (``run.json`` from `lmpress.track`) or saved model directories
(``lmpress.json``).
"""

from __future__ import annotations

import html
import math
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


def points(runs: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The original's metrics (from the first run that has them) and one point per run."""
    original = next((r["metrics"]["original"] for r in runs if (r.get("metrics") or {}).get("original")), None)
    pts = []
    for i, r in enumerate(runs):
        m = (r.get("metrics") or {}).get("compressed") or (r.get("metrics") or {}).get("evaluated")
        if not m:
            continue
        pts.append({"label": label_of(r, i), "metrics": m, "run": r, "size": _size_mb(m)})
    return original, pts


def label_of(run: dict[str, Any], i: int) -> str:
    recipe = run.get("recipe") or {}
    return str(recipe.get("name") or run.get("name") or f"run {i + 1}")


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
    W, H, L, R, T, B = 520, 360, 64, 16, 32, 48
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
    placed: list[tuple[float, float]] = []  # label positions so far: nudge a label off another
    for i, (name, x, y) in enumerate(pts):
        on_front = i in front
        color = COLORS[i % len(COLORS)]
        out.append(
            f'<circle class="run{" front" if on_front else ""}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" '
            f'r="{7 if on_front else 5}" '
            f'fill="{color}" stroke="{"#e45756" if on_front else "#fff"}" stroke-width="2"><title>{html.escape(name)}: '
            f"{_num(x)}, {_num(y)}</title></circle>"
        )
        lx, ly = sx(x) + 9, sy(y) - 7
        while any(abs(lx - px) < 70 and abs(ly - py) < 12 for px, py in placed):
            ly -= 13
        placed.append((lx, ly))
        out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="11">{html.escape(name)}</text>')
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
            f'<text x="{ox - 11:.1f}" y="{oy - 8:.1f}" text-anchor="end" font-size="11" '
            'font-weight="600">original</text>'
        )
    out.append("</svg>")
    return "".join(out)


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
    original, pts = points(runs)
    orig_size = _size_mb(original) if original else None
    plots = []
    for key, label in (("perplexity", "held-out perplexity"), ("kl", "KL vs the original (nats/token)")):
        data = [(p["label"], p["size"], float(p["metrics"][key])) for p in pts if p["size"] and key in p["metrics"]]
        base_y = (original or {}).get(key, 0.0 if key == "kl" else None)  # the original's KL to itself is 0
        base_point = (orig_size, float(base_y)) if orig_size is not None and base_y is not None else None
        if data:
            plots.append(scatter_svg(f"{label} vs size", "size on disk (MB)", label, data, base_point))
    layers = [(f"{p['label']} — {name}", values) for p in pts for name, values in per_layer(p["run"])]
    data_note = ""
    first = next((r.get("data") for r in runs if r.get("data")), None)
    if first:
        data_note = (
            f"Evaluation text: {html.escape(str(first.get('source')))} ({first.get('split')} split), "
            f"{first.get('windows')} windows × {first.get('seq_len')} tokens, sha256 {str(first.get('sha256'))[:16]}."
        )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{len(pts)} runs, generated {time.strftime("%Y-%m-%d %H:%M")}. {data_note}</p>',
        "<h2>Quality against size</h2>",
        '<p class="note">Lower is better on both axes. The star is the original; circles ringed in red are on the '
        "Pareto front (no other run is both smaller and better), joined by the dashed line.</p>",
        '<div class="plots">' + "".join(plots) + "</div>",
        "<h2>Metrics</h2>",
        metrics_table(original, pts),
        '<p class="note">KL and top-1 agreement compare each run with the original on the same tokens. Speeds are '
        "measured in each run's own process: compare them within one run (the demo measures all runs together).</p>",
        "<h2>Generation samples</h2>",
        '<p class="note">Greedy continuations of openings of the evaluation text.</p>',
        samples_html(pts),
    ]
    if layers:
        body += ["<h2>Per-layer measurements</h2>", '<div class="plots">']
        body += [bars_svg(name, values) for name, values in layers]
        body += ["</div>"]
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>" + "".join(body) + "</body></html>"
    )


def write_report(paths: list[Path], out: Path, title: str = "lmpress report") -> Path:
    """Read run (or model) directories, write the report to ``out`` atomically; returns ``out``."""
    if not paths:
        raise LmpressError("report: give at least one run directory (see `lmpress compress`'s 'run:' line)")
    runs = [load_run(p) for p in paths]
    if not points(runs)[1]:
        raise LmpressError("report: none of the runs has metrics; run compress or eval with evaluation on")
    from lmpress.io import write_text_atomic

    write_text_atomic(out, render(runs, title))
    return out
