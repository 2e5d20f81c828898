"""Instance probabilities -> instance label -> study verdict. Pure functions, no I/O.

The classes, which of them are findings (flag a study) and their order of urgency come from the model
card (:attr:`~screener.model.modelcard.ModelCard.findings`), the operating points from its ``thresholds``.

An image's label (:func:`decide`): a class *clears* when its probability reaches its threshold, or, for a
class without a threshold, when it is the most probable class. The most urgent finding that clears wins;
else the most probable non-finding class that clears; else no class clears and the image is
``indeterminate``. An image in the content gate's borderline band is ``indeterminate`` whatever its
probabilities. A card without thresholds therefore labels by argmax, as before operating points existed.

A study's verdict (:func:`study_verdict`) is the most urgent finding among its classified images, with the
probabilities of the image that carries it (the highest probability of that finding), so one positive image
is never averaged away by normal ones. Without a finding, one indeterminate image makes the study
``indeterminate`` (it cannot be called normal); otherwise the most probable non-finding label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from screener.model.modelcard import DEFAULT_CONCEPTS

NOT_ANALYSED = "not_analysed"
INDETERMINATE = "indeterminate"
NO_CLASS_CLEARS = "no class reached its operating point"


@dataclass(frozen=True)
class Decision:
    """An image's label and, for ``indeterminate``, why."""

    label: str
    reason: str | None = None


def decide(
    probs: Sequence[float],
    classes: Sequence[str],
    thresholds: Mapping[str, float],
    findings: Sequence[str],
    *,
    borderline: str | None = None,
) -> Decision:
    """The label of one image (see the module docstring).

    ``findings``: the finding classes, most urgent first. ``borderline``: the content gate's reason when the
    image lies in its borderline band. Raises ValueError when ``probs`` and ``classes`` differ in length.
    """
    if len(probs) != len(classes):
        raise ValueError(f"{len(probs)} probabilities for {len(classes)} classes {list(classes)}")
    if borderline is not None:
        return Decision(INDETERMINATE, borderline)
    by_class = {c: float(p) for c, p in zip(classes, probs, strict=True)}
    top = max(classes, key=lambda c: by_class[c])

    def clears(c: str) -> bool:
        return by_class[c] >= thresholds[c] if c in thresholds else c == top

    for label in findings:
        if label in by_class and clears(label):
            return Decision(label)
    cleared = [c for c in classes if c not in findings and clears(c)]
    if cleared:
        return Decision(max(cleared, key=lambda c: by_class[c]))
    points = ", ".join(f"{c} {by_class[c]:.3f} < {thresholds[c]:.3f}" for c in classes if c in thresholds)
    return Decision(INDETERMINATE, f"{NO_CLASS_CLEARS} ({points})")


def instance_label(
    probs: Sequence[float],
    classes: Sequence[str],
    thresholds: Mapping[str, float],
    findings: Sequence[str] | None = None,
) -> str:
    """:func:`decide`'s label. ``findings`` defaults to the classes with a default finding concept, in their
    default order (:data:`screener.model.modelcard.DEFAULT_CONCEPTS`), for callers holding no card."""
    if findings is None:
        findings = default_findings(classes)
    return decide(probs, classes, thresholds, findings).label


def default_findings(classes: Sequence[str]) -> tuple[str, ...]:
    """The finding classes among ``classes`` by the default concepts, most urgent first."""
    known = [c for c in classes if c in DEFAULT_CONCEPTS and DEFAULT_CONCEPTS[c].finding]
    return tuple(sorted(known, key=lambda c: DEFAULT_CONCEPTS[c].priority))


@dataclass(frozen=True)
class ImageOutcome:
    status: str  # classified | skipped | failed
    label: str | None = None
    probs: Mapping[str, float] | None = None
    reason: str | None = None  # why the label is indeterminate


@dataclass(frozen=True)
class Verdict:
    label: str  # a class name, "indeterminate" or "not_analysed"
    probs: Mapping[str, float] | None
    total: int
    classified: int
    skipped: int
    failed: int
    reason: str | None = None  # why the verdict is indeterminate


def study_verdict(images: Sequence[ImageOutcome], findings: Sequence[str] | None = None) -> Verdict:
    """The study verdict over its images; "not_analysed" when no image could be classified.

    ``findings``: the card's finding classes, most urgent first (default: :func:`default_findings` of the
    labels seen)."""
    classified = [i for i in images if i.status == "classified" and i.label is not None and i.probs]

    def verdict(label: str, probs: Mapping[str, float] | None, reason: str | None = None) -> Verdict:
        return Verdict(
            label=label,
            probs=probs,
            total=len(images),
            classified=len(classified),
            skipped=sum(1 for i in images if i.status == "skipped"),
            failed=sum(1 for i in images if i.status == "failed"),
            reason=reason,
        )

    if not classified:
        return verdict(NOT_ANALYSED, None)
    labels = {i.label for i in classified}
    if findings is None:
        findings = default_findings(sorted(str(label) for label in labels))
    worst = next((f for f in findings if f in labels), None)
    if worst is not None:
        carrier = max(
            (i for i in classified if i.label == worst), key=lambda i: (i.probs or {}).get(worst, 0.0)
        )
        return verdict(worst, dict(carrier.probs or {}))
    if INDETERMINATE in labels:
        carrier = next(i for i in classified if i.label == INDETERMINATE)
        return verdict(INDETERMINATE, dict(carrier.probs or {}), carrier.reason)
    # No finding, none indeterminate: the non-finding label of the image most sure of its own label.
    best = max(classified, key=lambda i: (i.probs or {}).get(i.label or "", 0.0))
    return verdict(str(best.label), dict(best.probs or {}))


def flags(label: str, findings: Sequence[str]) -> bool:
    """True when a verdict ``label`` flags the study (a finding class)."""
    return label in findings
