"""Charts drawn as SVG on the server: lines (curves, CDFs), scatters (Pareto fronts) and request timelines.

Why SVG from Python rather than a JavaScript charting library: the page then needs no script at all (the
Content-Security-Policy forbids every script), there is no minified third-party file to vendor, audit and
update, a chart is in the HTML the server sends (a test reads its points from the DOM and checks them against
the run's files), and mlc's charts are few and simple. A point's <title> is its tooltip. Curves longer than
MAX_POINTS are thinned by min/max buckets, which keeps spikes that plain striding would drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
MAX_POINTS = 1500
WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 44
LEGEND_W = 150  # the legend sits right of the plot, never over the data


@dataclass
class Series:
    name: str
    xs: list[float]
    ys: list[float]
    colour: str = ""
    markers: bool = False  # draw each point (with a tooltip) as well as the line
    line: bool = True


@dataclass
class Mark:
    """One labelled point drawn over a chart (a pool member, the chosen merge, the chosen sweep point)."""

    x: float
    y: float
    label: str
    colour: str = "#2ca02c"
    shape: str = "star"


@dataclass
class Frame:
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    width: int = WIDTH
    height: int = HEIGHT
    right: int = RIGHT

    def px(self, x: float) -> float:
        return LEFT + (x - self.x_lo) / (self.x_hi - self.x_lo) * (self.width - LEFT - self.right)

    def py(self, y: float) -> float:
        return self.height - BOTTOM - (y - self.y_lo) / (self.y_hi - self.y_lo) * (self.height - TOP - BOTTOM)


def finite_pairs(xs: list, ys: list) -> tuple[list[float], list[float]]:
    """The (x, y) pairs where both are finite numbers (JSON can carry NaN, Infinity, strings, nulls)."""
    px, py = [], []
    for x, y in zip(xs, ys):
        if _num(x) and _num(y) and math.isfinite(x) and math.isfinite(y):
            px.append(float(x))
            py.append(float(y))
    return px, py


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def thin(xs: list[float], ys: list[float], limit: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most about `limit` points: per bucket the first, the lowest and the highest (in x order)."""
    if len(xs) <= limit:
        return xs, ys
    size = math.ceil(len(xs) / (limit // 3))
    keep: list[int] = []
    for start in range(0, len(xs), size):
        idx = range(start, min(start + size, len(xs)))
        keep += sorted({start, min(idx, key=ys.__getitem__), max(idx, key=ys.__getitem__)})
    keep.append(len(xs) - 1)
    keep = sorted(set(keep))
    return [xs[i] for i in keep], [ys[i] for i in keep]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 times a power of ten apart)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def fmt(v: float) -> str:
    """A tick or tooltip number: short, without float noise."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        return f"{v:.3g}"
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _span(lo: float, hi: float, pad: float) -> tuple[float, float]:
    if hi == lo:
        d = abs(lo) * 0.1 or 1.0
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


def chart(series: list[Series], title: str, x_label: str, y_label: str, *, kind: str = "line", step: bool = False,
          y_from_zero: bool = False, y_range: tuple[float, float] | None = None, marks: list[Mark] | None = None,
          width: int = WIDTH, height: int = HEIGHT) -> Markup:
    """An SVG chart of several series (lines, step lines for CDFs, or points), with axes, ticks and a legend."""
    cleaned = []
    for i, s in enumerate(series):
        xs, ys = finite_pairs(s.xs, s.ys)
        if s.line:
            xs, ys = thin(xs, ys)
        cleaned.append(Series(s.name, xs, ys, s.colour or PALETTE[i % len(PALETTE)], s.markers, s.line))
    marks = [m for m in marks or [] if all(_num(v) and math.isfinite(v) for v in (m.x, m.y))]
    all_x = [x for s in cleaned for x in s.xs] + [m.x for m in marks]
    all_y = [y for s in cleaned for y in s.ys] + [m.y for m in marks]
    legend = len(cleaned) > 1 or bool(marks)
    width += LEGEND_W if legend else 0
    parts = [_head(kind, title, width, height), f'<text class="title" x="{LEFT}" y="16">{escape(title)}</text>']
    if not all_x:
        parts.append(f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">no finite values</text></svg>')
        return Markup("".join(parts))
    x_lo, x_hi = _span(min(all_x), max(all_x), 0.02)
    y_lo, y_hi = y_range or _span(0.0 if y_from_zero else min(all_y), max(all_y), 0.05)
    if y_from_zero and y_range is None:
        y_lo = 0.0 if min(all_y) >= 0 else y_lo
    f = Frame(x_lo, x_hi, y_lo, y_hi, width, height, RIGHT + (LEGEND_W if legend else 0))
    parts.append(_axes(f, x_label, y_label))
    for s in cleaned:
        parts.append(_series(f, s, step))
    for m in marks:
        parts.append(_mark(f, m))
    if legend:
        parts.append(_legend(f, cleaned))
    parts.append("</svg>")
    return Markup("".join(parts))


def _head(kind: str, title: str, width: int, height: int) -> str:
    return (f'<svg class="chart" data-kind="{escape(kind)}" data-title="{escape(title)}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">')


def _axes(f: Frame, x_label: str, y_label: str) -> str:
    out = [f'<g class="axes"><rect class="plot" x="{LEFT}" y="{TOP}" width="{f.width - LEFT - f.right}" height="{f.height - TOP - BOTTOM}"/>']
    for t in nice_ticks(f.x_lo, f.x_hi, 6):
        x = f.px(t)
        if LEFT - 0.5 <= x <= f.width - f.right + 0.5:
            out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{f.height - BOTTOM}"/>'
                       f'<text class="tick" x="{x:.1f}" y="{f.height - BOTTOM + 14}" text-anchor="middle">{fmt(t)}</text>')
    for t in nice_ticks(f.y_lo, f.y_hi, 5):
        y = f.py(t)
        if TOP - 0.5 <= y <= f.height - BOTTOM + 0.5:
            out.append(f'<line class="grid" x1="{LEFT}" x2="{f.width - f.right}" y1="{y:.1f}" y2="{y:.1f}"/>'
                       f'<text class="tick" x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
    out.append(f'<text class="label" x="{(LEFT + f.width - f.right) / 2}" y="{f.height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text class="label" transform="translate(14 {(TOP + f.height - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text></g>')
    return "".join(out)


def _series(f: Frame, s: Series, step: bool) -> str:
    out = [f'<g class="series" data-name="{escape(s.name)}" data-points="{len(s.xs)}">']
    if s.line and s.xs:
        pts: list[str] = []
        for i, (x, y) in enumerate(zip(s.xs, s.ys)):
            if step and i:
                pts.append(f"{f.px(x):.1f},{f.py(s.ys[i - 1]):.1f}")
            pts.append(f"{f.px(x):.1f},{f.py(y):.1f}")
        out.append(f'<polyline fill="none" stroke="{s.colour}" stroke-width="1.6" points="{" ".join(pts)}"/>')
    if s.markers or len(s.xs) == 1:
        for x, y in zip(s.xs, s.ys):
            out.append(f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3" fill="{s.colour}" data-x="{x!r}" data-y="{y!r}">'
                       f'<title>{escape(s.name)}: ({fmt(x)}, {fmt(y)})</title></circle>')
    out.append("</g>")
    return "".join(out)


def _mark(f: Frame, m: Mark) -> str:
    x, y = f.px(m.x), f.py(m.y)
    if m.shape == "square":
        glyph = f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{m.colour}"/>'
    else:
        pts = " ".join(f"{x + r * math.sin(a * math.pi / 5):.1f},{y - r * math.cos(a * math.pi / 5):.1f}" for a, r in
                       ((a, 8 if a % 2 == 0 else 3.5) for a in range(10)))
        glyph = f'<polygon points="{pts}" fill="{m.colour}" stroke="#222" stroke-width="0.6"/>'
    return (f'<g class="mark" data-label="{escape(m.label)}">{glyph}<text class="tick" x="{x + 7:.1f}" y="{y - 6:.1f}">{escape(m.label)}</text>'
            f'<title>{escape(m.label)}: ({fmt(m.x)}, {fmt(m.y)})</title></g>')


def _legend(f: Frame, series: list[Series]) -> str:
    out, x = ['<g class="legend">'], f.width - LEGEND_W + 8.0
    y = TOP + 12
    for s in series:
        label = s.name if len(s.name) <= 22 else s.name[:21] + "…"
        out.append(f'<rect x="{x:.0f}" y="{y - 8}" width="10" height="10" fill="{s.colour}"/>'
                   f'<text class="tick" x="{x + 14:.0f}" y="{y + 1}">{escape(label)}</text>')
        y += 13
    return "".join(out) + "</g>"


@dataclass
class Span:
    """One request on a timeline: waiting for a client slot, then before its first token, then streaming."""

    row: int
    start: float
    queued: float
    ttft: float | None
    end: float | None
    ok: bool
    tooltip: str


def timeline(spans: list[Span], title: str, width: int = WIDTH * 2 + 20) -> Markup:
    """Requests as horizontal bars over time: grey waiting, orange until the first token, blue streaming, red x failed."""
    height = max(120, min(900, 6 * len(spans) + TOP + BOTTOM))
    times = [s.start - s.queued for s in spans] + [s.end if s.end is not None else s.start for s in spans]
    rows = [s.row for s in spans]
    if not spans:
        return chart([], title, "seconds from the start", "request", kind="timeline")
    f = Frame(*_span(min(times), max(times), 0.01), min(rows) - 1, max(rows) + 1, width, height)
    parts = [_head("timeline", title, width, height), f'<text class="title" x="{LEFT}" y="16">{escape(title)}</text>', _axes(f, "seconds from the start", "request")]
    bar = max(1.5, min(5.0, (height - TOP - BOTTOM) / max(len(spans), 1) * 0.7))
    for s in spans:
        y = f.py(s.row)
        seg = []
        if s.queued:
            seg.append(_bar(f, s.start - s.queued, s.start, y, bar, "#bbbbbb"))
        if not s.ok:
            seg.append(f'<text class="fail" x="{f.px(s.start):.1f}" y="{y + 3:.1f}" text-anchor="middle" fill="#d62728">×</text>')
        elif s.ttft is not None and s.end is not None:
            seg.append(_bar(f, s.start, s.start + s.ttft, y, bar, "#ff7f0e"))
            seg.append(_bar(f, s.start + s.ttft, s.end, y, bar, "#1f77b4"))
        parts.append(f'<g class="request" data-ok="{str(s.ok).lower()}"><title>{escape(s.tooltip)}</title>{"".join(seg)}</g>')
    legend = [("#bbbbbb", "waiting for a client slot"), ("#ff7f0e", "sent, before the first token"), ("#1f77b4", "streaming"), ("#d62728", "× failed")]
    parts.append('<g class="legend">' + "".join(
        f'<rect x="{LEFT + 6 + 190 * i}" y="{TOP + 4}" width="10" height="10" fill="{c}"/><text class="tick" x="{LEFT + 20 + 190 * i}" y="{TOP + 13}">{t}</text>'
        for i, (c, t) in enumerate(legend)) + "</g></svg>")
    return Markup("".join(parts))


def _bar(f: Frame, t0: float, t1: float, y: float, h: float, colour: str) -> str:
    x0, x1 = f.px(t0), f.px(t1)
    return f'<rect x="{x0:.1f}" y="{y - h / 2:.1f}" width="{max(x1 - x0, 0.8):.1f}" height="{h:.1f}" fill="{colour}"/>'
