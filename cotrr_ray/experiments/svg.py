"""The experiment page's plots as inline SVG: the confidence sequence over the looks, and the stage
timeline. Drawn by hand, not with matplotlib: a few polylines need no figure machinery, and the SVG
text stays small and exact (a test can read the drawn coordinates back). Labels from data are
HTML-escaped like everything else on the page.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if _finite(t) else "–"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / (n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def sequence_svg(looks: list[dict[str, Any]], label: str, *, width: int = 640, height: int = 240) -> str:
    """The cumulative effect (line) and its confidence sequence (band) at each look, and zero."""
    pts = [lk for lk in looks if all(_finite(lk.get(k)) for k in ("ts", "effect", "cs_low", "cs_high"))]
    if not pts:
        return '<p class="note">No look with a finite confidence sequence yet.</p>'
    left, right, top, bottom = 64, 12, 12, 36
    t0, t1 = pts[0]["ts"], pts[-1]["ts"]
    # The first looks' sequences are far wider than the later ones; scaled to them, the rest of the
    # plot is a flat line. The range covers zero, every effect and the band of the later half of the
    # looks, with as much again for the early band, which is cut at the edge (and says so).
    tail = pts[len(pts) // 2 :]
    lo = min(0.0, *(p["effect"] for p in pts), *(p["cs_low"] for p in tail))
    hi = max(0.0, *(p["effect"] for p in pts), *(p["cs_high"] for p in tail))
    pad = (hi - lo) * 0.5 or 1.0
    lo, hi = lo - pad, hi + pad
    clipped = any(p["cs_low"] < lo or p["cs_high"] > hi for p in pts)

    def x(t: float) -> float:
        return left + (width - left - right) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.5)

    def y(v: float) -> float:
        return top + (height - top - bottom) * (hi - min(max(v, lo), hi)) / (hi - lo)

    band = [(x(p["ts"]), y(p["cs_high"])) for p in pts] + [(x(p["ts"]), y(p["cs_low"])) for p in reversed(pts)]
    line = [(x(p["ts"]), y(p["effect"])) for p in pts]
    fmt = " ".join
    parts = [
        f'<svg class="sequence" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>{_e(label)}</title>",
        f'<polygon points="{fmt(f"{a:.1f},{b:.1f}" for a, b in band)}" fill="#4c78a8" fill-opacity="0.25"/>',
        f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#888" stroke-dasharray="4 3"/>',
        f'<polyline points="{fmt(f"{a:.1f},{b:.1f}" for a, b in line)}" fill="none" stroke="#1f4e8c" stroke-width="2"/>',
    ]
    parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="#1f4e8c"/>' for a, b in line]
    for v in _ticks(lo, hi):
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:+.3g}</text>')
        parts.append(f'<line x1="{left - 3}" x2="{left}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#333"/>')
    parts.append(f'<text x="{left}" y="{height - 8}">{_e(_when(t0))}</text>')
    parts.append(f'<text x="{width - right}" y="{height - 8}" text-anchor="end">{_e(_when(t1))}</text>')
    parts.append(f'<text x="{(left + width) / 2:.0f}" y="{height - 8}" text-anchor="middle">{_e(label)}</text>')
    if clipped:
        parts.append(
            f'<text class="clipped" x="{width - right}" y="{top + 10}" text-anchor="end">band cut at the edge</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def timeline_svg(rows: list[dict[str, Any]], now: float, *, width: int = 640) -> str:
    """One bar per visited stage, from entered to left (or now), on a shared time axis."""
    bars = [r for r in rows if _finite(r.get("entered_at"))]
    if not bars:
        return ""
    t0 = min(r["entered_at"] for r in bars)
    t1 = max(max((r["left_at"] if _finite(r.get("left_at")) else now) for r in bars), t0 + 1)
    left, right, h = 110, 12, 22
    height = h * len(bars) + 28

    def x(t: float) -> float:
        return left + (width - left - right) * (t - t0) / (t1 - t0)

    parts = [f'<svg class="timeline" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for i, r in enumerate(bars):
        end = r["left_at"] if _finite(r.get("left_at")) else now
        fill = "#4c78a8" if _finite(r.get("left_at")) else "#f58518"
        w = max(x(end) - x(r["entered_at"]), 2.0)
        parts.append(f'<text x="{left - 6}" y="{i * h + 15}" text-anchor="end">{_e(r.get("stage"))}</text>')
        parts.append(
            f'<rect x="{x(r["entered_at"]):.1f}" y="{i * h + 3}" width="{w:.1f}" height="{h - 6}" fill="{fill}"/>'
        )
    parts.append(f'<text x="{left}" y="{height - 6}">{_e(_when(t0))}</text>')
    parts.append(f'<text x="{width - right}" y="{height - 6}" text-anchor="end">{_e(_when(t1))}</text>')
    parts.append("</svg>")
    return "".join(parts)
