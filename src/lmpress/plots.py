"""The report's plots, drawn as inline SVG: a scatter plot with its Pareto front and labels that keep
clear of each other and of the axes, and a bar chart of per-layer numbers."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]
W, H, R, T, B = 520, 360, 16, 36, 48  # a scatter plot's size and its right, top and bottom margins


def pareto(items: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (smaller is better), by x."""
    front = []
    for i, (x, y) in enumerate(items):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(items) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: items[i])


@dataclass(frozen=True)
class _Frame:
    """Where a scatter plot's numbers go: the padded data ranges and the left margin."""

    x0: float
    x1: float
    y0: float
    y1: float
    L: int  # wide enough for the y ticks beside the axis title, not under it
    nonneg: bool  # every y is >= 0: no negative ticks

    @classmethod
    def fit(cls, xs: list[float], ys: list[float]) -> _Frame:
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        padx, pady = (x1 - x0) * 0.08 or abs(x0) * 0.1 or 1, (y1 - y0) * 0.1 or abs(y0) * 0.1 or 1
        x0, x1 = x0 - padx, x1 + 2.5 * padx  # room on the right for labels
        nonneg = y0 >= 0
        y0, y1 = y0 - pady, y1 + pady
        widest = max(len(_tick(y0 + (y1 - y0) * k / 4, y1 - y0)) for k in range(5))
        return cls(x0, x1, y0, y1, max(64, round(30 + 6.3 * widest)), nonneg)

    def sx(self, x: float) -> float:
        return self.L + (x - self.x0) / (self.x1 - self.x0) * (W - self.L - R)

    def sy(self, y: float) -> float:
        return H - B - (y - self.y0) / (self.y1 - self.y0) * (H - T - B)


def scatter_svg(
    title: str, xlabel: str, ylabel: str, pts: list[tuple[str, float, float]], original: tuple[float, float] | None
) -> str:
    """A scatter plot with labelled points, the Pareto front as a line and the original as a star."""
    xs = [p[1] for p in pts] + ([original[0]] if original else [])
    ys = [p[2] for p in pts] + ([original[1]] if original else [])
    if not xs:
        return ""
    f = _Frame.fit(xs, ys)
    out = [_svg_open(W, H, title), *_axes(f, title, xlabel, ylabel)]
    front = pareto([(p[1], p[2]) for p in pts])
    if len(front) > 1:
        path = " ".join(f"{f.sx(pts[i][1]):.1f},{f.sy(pts[i][2]):.1f}" for i in front)
        out.append(
            f'<polyline class="pareto" points="{path}" fill="none" stroke="#e45756" stroke-width="2" '
            'stroke-dasharray="6 3"/>'
        )
    placed: list[tuple[float, float, float, float]] = []  # label boxes so far (x0, y0, x1, y1)
    area = (f.L, T, W - R, H - B)
    if original:
        olx, oly, oanchor = label_position(f.sx(original[0]), f.sy(original[1]), len("original"), placed, area)
    for i, (name, x, y) in enumerate(pts):
        on_front = i in front
        color = COLORS[i % len(COLORS)]
        out.append(
            f'<circle class="run{" front" if on_front else ""}" cx="{f.sx(x):.1f}" cy="{f.sy(y):.1f}" '
            f'r="{7 if on_front else 5}" '
            f'fill="{color}" stroke="{"#e45756" if on_front else "#fff"}" stroke-width="2"><title>{html.escape(name)}: '
            f"{_num(x)}, {_num(y)}</title></circle>"
        )
        lx, ly, anchor = label_position(f.sx(x), f.sy(y), len(name), placed, area)
        if abs(ly - 4 - f.sy(y)) > 16:  # moved off its point to stay clear of others: a leader line to it
            out.append(
                f'<line class="leader" x1="{f.sx(x):.1f}" y1="{f.sy(y):.1f}" x2="{lx:.1f}" y2="{ly - 4:.1f}" '
                'stroke="#bbb" stroke-width="1"/>'
            )
        out.append(f'<text class="label" x="{lx:.1f}" y="{ly:.1f}"{anchor} font-size="11">{html.escape(name)}</text>')
    if original:
        out += _star(f.sx(original[0]), f.sy(original[1]))
        out.append(
            f'<text class="label" x="{olx:.1f}" y="{oly:.1f}"{oanchor} font-size="11" font-weight="600">original</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _axes(f: _Frame, title: str, xlabel: str, ylabel: str) -> list[str]:
    """The background, the title, grid lines with their ticks, the frame and the axis titles."""
    L = f.L
    out = [f'<rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/>']
    out.append(
        f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="600">{html.escape(title)}</text>'
    )
    for k in range(5):  # grid and ticks
        gx, gy = f.x0 + (f.x1 - f.x0) * k / 4, f.y0 + (f.y1 - f.y0) * k / 4
        out.append(f'<line x1="{f.sx(gx):.1f}" y1="{T}" x2="{f.sx(gx):.1f}" y2="{H - B}" stroke="#eee"/>')
        out.append(f'<line x1="{L}" y1="{f.sy(gy):.1f}" x2="{W - R}" y2="{f.sy(gy):.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{f.sx(gx):.1f}" y="{H - B + 16}" text-anchor="middle" font-size="11">'
            f"{_tick(gx, f.x1 - f.x0)}</text>"
        )
        if gy >= 0 or not f.nonneg:  # no negative ticks on an axis of non-negative numbers
            out.append(
                f'<text x="{L - 6}" y="{f.sy(gy) + 4:.1f}" text-anchor="end" font-size="11">'
                f"{_tick(gy, f.y1 - f.y0)}</text>"
            )
    out.append(f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#888"/>')
    out.append(
        f'<text x="{(L + W - R) / 2}" y="{H - 10}" text-anchor="middle" font-size="12">{html.escape(xlabel)}</text>'
    )
    out.append(
        f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {(T + H - B) / 2})">{html.escape(ylabel)}</text>'
    )
    return out


def _star(ox: float, oy: float) -> list[str]:
    """The original's five-pointed star at (ox, oy)."""
    star = " ".join(
        f"{ox + (9 if k % 2 == 0 else 4) * math.sin(k * math.pi / 5):.1f},"
        f"{oy - (9 if k % 2 == 0 else 4) * math.cos(k * math.pi / 5):.1f}"
        for k in range(10)
    )
    return [f'<polygon class="original" points="{star}" fill="#ffb000" stroke="#333"><title>original</title></polygon>']


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
