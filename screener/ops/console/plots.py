"""Small server-rendered SVG bar charts for the dashboard (no script, no inline style: CSP-clean).

Every piece is a :class:`markupsafe.Markup` template whose arguments markupsafe escapes, so a label from the
database can never become markup.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup

WIDTH = 640
BAR_AREA = 150
LABEL_BAND = 48
PALETTE = {
    "normal": "#3b7d4f",
    "covid19": "#b03a2e",
    "viral_pneumonia": "#c47f17",
    "indeterminate": "#6a5acd",
    "not_analysed": "#7a7a7a",
}
DEFAULT_COLOUR = "#2d5d8a"
MAX_AXIS_LABELS = 12
MAX_VALUE_LABELS = 24


def bar_chart(title: str, items: Sequence[tuple[str, float]], *, unit: str = "") -> Markup:
    """A vertical bar chart of ``items`` (label, value) with the value above each bar, as inline SVG."""
    height = BAR_AREA + LABEL_BAND + 30
    parts = [
        Markup(
            '<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {} {}" role="img" '
            'aria-label="{}"><title>{}</title>'
        ).format(WIDTH, height, title, title)
    ]
    if not items:
        parts.append(
            Markup('<text x="{}" y="{}" text-anchor="middle">no data</text>').format(WIDTH // 2, height // 2)
        )
    top = max([v for _, v in items] + [1e-9])
    slot = WIDTH / max(1, len(items))
    bar = max(2.0, slot * 0.7)
    every = max(1, len(items) // MAX_AXIS_LABELS)
    base = 20 + BAR_AREA
    for i, (label, value) in enumerate(items):
        h = BAR_AREA * value / top
        x = i * slot + (slot - bar) / 2
        mid = f"{x + bar / 2:.1f}"
        shown = f"{value:g}{unit}"
        parts.append(
            Markup(
                '<rect x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{}: {}</title></rect>'
            ).format(
                f"{x:.1f}",
                f"{base - h:.1f}",
                f"{bar:.1f}",
                f"{h:.1f}",
                PALETTE.get(label, DEFAULT_COLOUR),
                label,
                shown,
            )
        )
        if len(items) <= MAX_VALUE_LABELS:
            parts.append(
                Markup('<text x="{}" y="{}" text-anchor="middle">{}</text>').format(
                    mid, f"{base - h - 4:.1f}", shown
                )
            )
        if i % every == 0:
            parts.append(
                Markup(
                    '<text x="{}" y="{}" text-anchor="end" transform="rotate(-35 {} {})">{}</text>'
                ).format(mid, base + 14, mid, base + 14, label)
            )
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)
