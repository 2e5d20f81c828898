"""PNG figures of the site reports (``screener report site-performance|drift --plot FILE.png``).

matplotlib is imported only here, and only when a plot is asked for; figures are drawn on the Agg canvas
(no display needed) and written durably enough for a report: to a temporary name, then renamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from screener.core.stats import PSI_MAJOR, PSI_MODERATE
from screener.ops.drift import FeatureDrift
from screener.ops.site_performance import SitePerformance

MAX_VERSIONS = 4  # one row of panels per model version, at most this many (the newest names last)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    tmp.replace(path)


def plot_site_performance(result: SitePerformance, path: Path) -> None:
    """Per model version: per-class sensitivity and PPV bars with their 95% Wilson intervals, and the
    reliability diagram (15 bins of top-class probability) with its ECE."""
    versions = result.versions[-MAX_VERSIONS:]
    fig = _figure(11, 3.6 * max(1, len(versions)))
    if not versions:
        fig.text(0.5, 0.5, "no labelled instances in this window", ha="center", va="center")
    for row, v in enumerate(versions):
        bars = fig.add_subplot(len(versions), 2, 2 * row + 1)
        x = list(range(len(v.per_class)))
        for offset, name, colour in ((-0.2, "sensitivity", "tab:blue"), (0.2, "ppv", "tab:orange")):
            values, low, high = [], [], []
            for f in v.per_class:
                prop = getattr(f, name)
                value = prop.value or 0.0
                interval = prop.interval or (value, value)
                values.append(value)
                low.append(value - interval[0])
                high.append(interval[1] - value)
            bars.bar(
                [i + offset for i in x],
                values,
                width=0.4,
                yerr=[low, high],
                capsize=3,
                color=colour,
                label=name,
            )
        bars.set_xticks(x, [f"{f.label}\n(n={f.support})" for f in v.per_class])
        bars.set_ylim(0, 1.05)
        bars.set_title(f"{v.model_version}: n={v.n}, not analysed {v.not_analysed}/{v.labelled}")
        bars.legend(loc="lower right", fontsize=8)
        rel = fig.add_subplot(len(versions), 2, 2 * row + 2)
        filled = [b for b in v.calibration_bins if b["count"]]
        rel.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        rel.bar(
            [(b["low"] + b["high"]) / 2 for b in filled],
            [b["accuracy"] for b in filled],
            width=[b["high"] - b["low"] for b in filled],
            edgecolor="black",
            alpha=0.6,
        )
        rel.set_xlim(0, 1)
        rel.set_ylim(0, 1)
        rel.set_xlabel("confidence (top-class probability)")
        rel.set_ylabel("accuracy")
        ece = "n/a" if v.ece is None else f"{v.ece:.3f}"
        rel.set_title(f"reliability, ECE = {ece}")
    _save(fig, path)


def plot_drift(results: Sequence[FeatureDrift], path: Path) -> None:
    """PSI per feature and model version as horizontal bars, with the 0.1 and 0.25 thresholds."""
    versions = sorted({d.model_version for d in results})[-MAX_VERSIONS:]
    fig = _figure(8, 2.2 + 1.6 * max(1, len(versions)))
    ax = fig.add_subplot(1, 1, 1)
    labels, values, colours = [], [], []
    for version in versions:
        for d in (r for r in results if r.model_version == version):
            labels.append(f"{version}: {d.feature}")
            values.append(d.psi or 0.0)
            colours.append({"major": "tab:red", "moderate": "tab:orange"}.get(d.flag, "tab:green"))
    ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    ax.axvline(PSI_MODERATE, color="tab:orange", linestyle="--", label=f"moderate ({PSI_MODERATE})")
    ax.axvline(PSI_MAJOR, color="tab:red", linestyle="--", label=f"major ({PSI_MAJOR})")
    ax.set_xlabel("population stability index (recent window against reference)")
    ax.legend(loc="lower right", fontsize=8)
    if not values:
        ax.set_title("no predictions to compare")
    _save(fig, path)
