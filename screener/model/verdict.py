"""Instance probabilities -> instance label -> study verdict. Pure functions, no I/O.

Severity, most severe first: COVID-19, viral pneumonia, normal. A study's verdict is the most severe
label among its classified frontal images, with the probabilities of the image that carries it (the
highest probability of that label), so one positive image is never averaged away by normal ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

NOT_ANALYSED = "not_analysed"
SEVERITY: tuple[str, ...] = ("covid19", "viral_pneumonia", "normal")


def instance_label(probs: Sequence[float], classes: Sequence[str], thresholds: Mapping[str, float]) -> str:
    """The label of one image.

    A finding class whose probability reaches its decision threshold (from the model card) wins,
    the most severe first; without thresholds, or when none is reached, the most probable class.
    """
    if len(probs) != len(classes):
        raise ValueError(f"{len(probs)} probabilities for {len(classes)} classes {list(classes)}")
    by_class = dict(zip(classes, probs, strict=True))
    for label in SEVERITY:
        if label != "normal" and label in thresholds and by_class.get(label, 0.0) >= thresholds[label]:
            return label
    return max(by_class, key=lambda c: by_class[c])


@dataclass(frozen=True)
class ImageOutcome:
    status: str  # classified | skipped | failed
    label: str | None = None
    probs: Mapping[str, float] | None = None


@dataclass(frozen=True)
class Verdict:
    label: str  # a class name or "not_analysed"
    probs: Mapping[str, float] | None
    total: int
    classified: int
    skipped: int
    failed: int


def study_verdict(images: Sequence[ImageOutcome]) -> Verdict:
    """The study verdict over its images; "not_analysed" when no image could be classified."""
    classified = [i for i in images if i.status == "classified" and i.label is not None and i.probs]
    counts = {
        "total": len(images),
        "classified": len(classified),
        "skipped": sum(1 for i in images if i.status == "skipped"),
        "failed": sum(1 for i in images if i.status == "failed"),
    }
    if not classified:
        return Verdict(label=NOT_ANALYSED, probs=None, **counts)
    rank = {label: n for n, label in enumerate(SEVERITY)}
    worst = min((i.label for i in classified if i.label), key=lambda lab: rank.get(lab, len(SEVERITY)))
    carrier = max((i for i in classified if i.label == worst), key=lambda i: (i.probs or {}).get(worst, 0.0))
    return Verdict(label=worst, probs=dict(carrier.probs or {}), **counts)
