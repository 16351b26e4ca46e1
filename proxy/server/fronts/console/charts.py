"""SVG charts drawn on the server: no chart library, no script, nothing to download.

A stacked bar chart of a value per day, split by a series (model, team or key). Every bar
segment carries ``data-day``, ``data-series`` and ``data-value`` so the page (and its
tests) can read the figures back, and a <title> for the hover text.
"""

from __future__ import annotations

from html import escape

PALETTE = (
    "#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed",
    "#0891b2", "#db2777", "#65a30d", "#9333ea", "#475569",
)  # fmt: skip


def stacked_bars(
    days: list[str],
    series: dict[str, dict[str, float]],
    unit: str = "$",
    width: int = 760,
    height: int = 260,
) -> str:
    """``series``: name -> {day -> value}. Days without data get an empty slot."""
    left, bottom, top = 56, 28, 12
    plot_w, plot_h = width - left - 8, height - bottom - top
    totals = [sum(values.get(day, 0.0) for values in series.values()) for day in days]
    peak = max(totals, default=0.0) or 1.0
    slot = plot_w / max(len(days), 1)
    bar_w = min(48.0, max(2.0, slot * 0.7))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 '
        f'{width} {height}" width="{width}" height="{height}" aria-label="daily {escape(unit)}">'
    ]
    for i in range(5):  # grid lines and their labels
        value = peak * i / 4
        y = top + plot_h - plot_h * i / 4
        out.append(f'<line x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(value, unit)}</text>'
        )
    names = list(series)
    for d, day in enumerate(days):
        x = left + d * slot + (slot - bar_w) / 2
        y = top + plot_h
        for s, name in enumerate(names):
            value = series[name].get(day, 0.0)
            if value <= 0:
                continue
            h = plot_h * value / peak
            y -= h
            label = escape(f"{day} · {name}: {_fmt(value, unit)}")
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                f'fill="{PALETTE[s % len(PALETTE)]}" class="point" data-day="{escape(day)}" '
                f'data-series="{escape(name)}" data-value="{value!r}"><title>{label}</title></rect>'
            )
        if len(days) <= 16 or d % max(1, len(days) // 8) == 0:
            out.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height - 8}" text-anchor="middle">'
                f"{escape(day[5:])}</text>"
            )
    out.append("</svg>")
    return "".join(out)


def legend(names: list[str]) -> list[tuple[str, str]]:
    return [(name, PALETTE[i % len(PALETTE)]) for i, name in enumerate(names)]


def _fmt(value: float, unit: str) -> str:
    if unit == "$":
        return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.2g}"
    return f"{value:,.0f}"
