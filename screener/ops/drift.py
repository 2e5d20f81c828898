"""``screener report drift``: has what reaches a model version moved away from its reference?

Per model version, four features of the instances it classified, as recorded by the worker (migration
0010): the prediction mix (share of each predicted label), the image size (Rows x Columns, in megapixel
bins), the manufacturer (Manufacturer of the header) and the mean intensity of the decoded [0, 1] image
(bins). Each is compared between a reference and the recent window with the population stability index
(screener.core.stats.psi), flagged against 0.1 (moderate) and 0.25 (major).

The reference of a feature is the model card's ``metrics.reference`` where it has that feature
(``prediction_mix``, ``intensity_histogram``; schema in docs/reporting.md), else the first
``baseline_days`` days of the version's own predictions. The recent window is ``--since``..``--until``,
by default the last ``baseline_days`` days with predictions; it never starts before the baseline ends.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, timedelta
from typing import Any

from sqlalchemy import Engine, select

from screener.core.db.models import Instance, ModelVersion, Prediction
from screener.core.errors import ScreenerError
from screener.core.stats import PSI_MAJOR, PSI_MODERATE, histogram, psi_flag, psi_terms, shares

FEATURES: tuple[str, ...] = ("prediction_mix", "image_size", "manufacturer", "mean_intensity")
INTENSITY_EDGES: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))  # [0, 0.1, ..., 1]
SIZE_EDGES_MP: tuple[float, ...] = (0.0, 0.25, 1.0, 2.0, 4.0, 6.0, 9.0, math.inf)  # megapixels
NO_MANUFACTURER = "(none)"
THRESHOLDS: dict[str, Any] = {
    "moderate": PSI_MODERATE,
    "major": PSI_MAJOR,
    "rule": "PSI < 0.1 stable, 0.1 <= PSI < 0.25 moderate shift, PSI >= 0.25 major shift",
    "source": "credit-scorecard monitoring convention (Siddiqi, Credit Risk Scorecards, Wiley 2006)",
}


class CardReferenceError(ScreenerError):
    """A registered card's ``metrics.reference`` does not follow the schema of docs/reporting.md."""


@dataclass(frozen=True)
class Observation:
    """One classified instance: what the drift features read."""

    day: date
    label: str
    manufacturer: str | None
    rows: int | None
    columns: int | None
    mean_intensity: float | None
    recorded: bool  # the worker recorded the image facts (instances finished since migration 0010)


@dataclass(frozen=True)
class FeatureDrift:
    model_version: str
    feature: str
    reference: str  # "model card" | "baseline"
    reference_window: str
    recent_window: str
    n_reference: int | None
    n_recent: int
    psi: float | None
    terms: dict[str, float]
    reference_shares: dict[str, float]
    recent_shares: dict[str, float]

    @property
    def flag(self) -> str:
        return psi_flag(self.psi)


def size_bin(rows: int, columns: int) -> str:
    """The megapixel bin of a Rows x Columns image, e.g. ``"4-6 MP"``."""
    mp = rows * columns / 1e6
    for low, high in itertools.pairwise(SIZE_EDGES_MP):
        if mp < high:
            return f">= {low:g} MP" if math.isinf(high) else f"{low:g}-{high:g} MP"
    return f">= {SIZE_EDGES_MP[-2]:g} MP"


def _bin_names(edges: Sequence[float]) -> list[str]:
    return [f"{a:g}-{b:g}" for a, b in itertools.pairwise(edges)]


def card_reference(card_json: str) -> dict[str, Any]:
    """``metrics.reference`` of a registered card, checked against the schema of docs/reporting.md:
    ``{"prediction_mix": {class: share}, "intensity_histogram": {"edges": [...], "counts": [...]}}``, both
    optional. Empty when the card has none. Raises CardReferenceError naming the offending part."""
    try:
        card = json.loads(card_json)
    except ValueError as exc:
        raise CardReferenceError(f"the registered model card is not JSON ({exc})") from exc
    metrics = card.get("metrics") if isinstance(card, dict) else None
    reference = metrics.get("reference") if isinstance(metrics, dict) else None
    if reference is None:
        return {}
    if not isinstance(reference, dict):
        raise CardReferenceError("metrics.reference must be an object")
    out: dict[str, Any] = {}
    mix = reference.get("prediction_mix")
    if mix is not None:
        if (
            not isinstance(mix, dict)
            or not mix
            or not all(isinstance(v, int | float) and v >= 0 for v in mix.values())
        ):
            raise CardReferenceError("metrics.reference.prediction_mix must map class names to shares >= 0")
        out["prediction_mix"] = {str(k): float(v) for k, v in mix.items()}
    hist = reference.get("intensity_histogram")
    if hist is not None:
        edges = hist.get("edges") if isinstance(hist, dict) else None
        counts = hist.get("counts") if isinstance(hist, dict) else None
        if (
            not isinstance(edges, list)
            or not isinstance(counts, list)
            or len(edges) != len(counts) + 1
            or len(counts) < 1
            or not all(isinstance(e, int | float) for e in edges)
            or any(b <= a for a, b in itertools.pairwise(edges))
            or not all(isinstance(c, int | float) and c >= 0 for c in counts)
        ):
            raise CardReferenceError(
                "metrics.reference.intensity_histogram must be {edges: N+1 increasing numbers, "
                "counts: N numbers >= 0}"
            )
        out["intensity_histogram"] = {
            "edges": [float(e) for e in edges],
            "counts": [float(c) for c in counts],
        }
    return out


def _distribution(feature: str, rows: Sequence[Observation], edges: Sequence[float]) -> dict[str, float]:
    if feature == "prediction_mix":
        return dict(Counter(r.label for r in rows))
    recorded = [r for r in rows if r.recorded]
    if feature == "manufacturer":
        return dict(Counter((r.manufacturer or NO_MANUFACTURER) for r in recorded))
    if feature == "image_size":
        return dict(Counter(size_bin(r.rows, r.columns) for r in recorded if r.rows and r.columns))
    values = [r.mean_intensity for r in recorded if r.mean_intensity is not None]
    if not values:
        return {}
    return {name: n for name, n in zip(_bin_names(edges), histogram(values, edges), strict=True) if n}


def _days(first: date, last: date) -> str:
    return f"{first.isoformat()}..{last.isoformat()}"


def drift_for_version(
    version: str,
    observations: Sequence[Observation],
    reference: Mapping[str, Any],
    *,
    since: date | None,
    until: date | None,
    baseline_days: int,
) -> list[FeatureDrift]:
    """PSI of every feature for one model version's ``observations`` (see the module docstring)."""
    if not observations:
        return []
    first = min(o.day for o in observations)
    last = max(o.day for o in observations)
    baseline_end = first + timedelta(days=baseline_days - 1)
    start = since if since is not None else last - timedelta(days=baseline_days - 1)
    start = max(start, baseline_end + timedelta(days=1))
    end = until if until is not None else last
    baseline = [o for o in observations if first <= o.day <= baseline_end]
    recent = [o for o in observations if start <= o.day <= end]
    recent_window = _days(start, end) if start <= end else f"none (the baseline ends {baseline_end})"
    hist = reference.get("intensity_histogram")
    edges = hist["edges"] if hist else list(INTENSITY_EDGES)
    out = []
    for feature in FEATURES:
        ref: dict[str, float]
        n_ref: int | None
        if feature == "prediction_mix" and "prediction_mix" in reference:
            ref, source, window, n_ref = dict(reference["prediction_mix"]), "model card", "training", None
        elif feature == "mean_intensity" and hist:
            ref = {n: c for n, c in zip(_bin_names(edges), hist["counts"], strict=True) if c}
            source, window, n_ref = "model card", "training", int(sum(hist["counts"]))
        else:
            ref = _distribution(feature, baseline, edges)
            source, window, n_ref = "baseline", _days(first, baseline_end), int(sum(ref.values()))
        new = _distribution(feature, recent, edges)
        terms = psi_terms(ref, new) if ref and new and sum(ref.values()) > 0 else {}
        out.append(
            FeatureDrift(
                model_version=version,
                feature=feature,
                reference=source,
                reference_window=window,
                recent_window=recent_window,
                n_reference=n_ref,
                n_recent=int(sum(new.values())),
                psi=float(sum(terms.values())) if terms else None,
                terms=terms,
                reference_shares=shares(ref),
                recent_shares=shares(new),
            )
        )
    return out


def load_observations(engine: Engine, model: str | None) -> dict[str, tuple[str, list[Observation]]]:
    """``{version: (card_json, observations)}`` of every model version with predictions (``model`` only)."""
    query = (
        select(
            ModelVersion.version,
            Prediction.created_at,
            Prediction.label,
            Instance.manufacturer,
            Instance.image_rows,
            Instance.image_columns,
            Instance.mean_intensity,
            Instance.model_version_id,
        )
        .join(ModelVersion, ModelVersion.id == Prediction.model_version_id)
        .join(Instance, Instance.id == Prediction.instance_id)
        .order_by(Prediction.id)
    )
    cards_query = select(ModelVersion.version, ModelVersion.card_json)
    if model is not None:
        query = query.where(ModelVersion.version == model)
        cards_query = cards_query.where(ModelVersion.version == model)
    out: dict[str, tuple[str, list[Observation]]] = {}
    with engine.connect() as conn:
        cards = {str(v): str(c) for v, c in conn.execute(cards_query)}
        for version, at, label, maker, rows, columns, mean, finished_by in conn.execute(query):
            out.setdefault(version, (cards[version], []))[1].append(
                Observation(
                    day=at.astimezone(UTC).date(),
                    label=str(label),
                    manufacturer=maker,
                    rows=rows,
                    columns=columns,
                    mean_intensity=mean,
                    recorded=finished_by is not None,
                )
            )
    return out


def drift(
    engine: Engine,
    since: date | None = None,
    until: date | None = None,
    *,
    model: str | None = None,
    baseline_days: int = 7,
) -> list[FeatureDrift]:
    """Every feature's drift for every model version with predictions (``model`` only, when given).
    Raises CardReferenceError when a card's reference breaks the schema; ValueError for baseline_days < 1."""
    if baseline_days < 1:
        raise ValueError(f"baseline days must be 1 or more, got {baseline_days}")
    out: list[FeatureDrift] = []
    for version, (card_json, observations) in sorted(load_observations(engine, model).items()):
        try:
            reference = card_reference(card_json)
        except CardReferenceError as exc:
            raise CardReferenceError(f"model {version}: {exc}") from None
        out += drift_for_version(
            version, observations, reference, since=since, until=until, baseline_days=baseline_days
        )
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def psi_rows(results: Sequence[FeatureDrift]) -> list[dict[str, Any]]:
    return [
        {
            "model_version": d.model_version,
            "feature": d.feature,
            "reference": d.reference,
            "reference_window": d.reference_window,
            "recent_window": d.recent_window,
            "n_reference": d.n_reference,
            "n_recent": d.n_recent,
            "psi": _r(d.psi),
            "flag": d.flag,
        }
        for d in results
    ]


def bin_rows(results: Sequence[FeatureDrift]) -> list[dict[str, Any]]:
    rows = []
    for d in results:
        for name in sorted(d.reference_shares.keys() | d.recent_shares.keys()):
            rows.append(
                {
                    "model_version": d.model_version,
                    "feature": d.feature,
                    "bin": name,
                    "reference_share": _r(d.reference_shares.get(name, 0.0)),
                    "recent_share": _r(d.recent_shares.get(name, 0.0)),
                    "psi_term": _r(d.terms.get(name)),
                }
            )
    return rows
