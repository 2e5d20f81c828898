"""`trainer adapt`: fine-tune a model on a site's own labelled images, and say whether it got better there.

The site's images (the same data forms as ``trainer train``, or the confirmed labels in SQL for
``trainer retrain``) are split leak-free into training, validation and a held-out site test split (or,
with ``evaluation``, training and validation only, the given images being the test). Then
:func:`trainer.pipeline.train_and_export` fine-tunes both networks from the base model's weights
(its preprocessing and lung crop kept), re-fits the fusion weight, the calibration (presets that
calibrate), and the image-content gate's reference statistics and threshold on the SITE's training and
validation splits. The base model and the adapted one are both evaluated on the site test split, which
neither trained on, and the new model directory's card records the adaptation under
``metrics.adaptation``: base version, the site data's split digest and counts, and the before/after
figures (accuracy, macro ROC AUC, ECE, per-class sensitivity). A model is only worth promoting at a
site when the after figures beat the before ones there (see the README, "Going live at a new site").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from screener.core.errors import DataError, TrainingError
from screener.core.logs import get_logger
from screener.model.modelcard import CARD_FILE, CLASSES, ModelCard, load_model_dir
from trainer.data import Sample, source_table
from trainer.evaluate import evaluate_model
from trainer.pipeline import PRESETS, TrainOutcome, train_and_export

log = get_logger("trainer.adapt")

SITE_TEST_FRACTION = 0.25
"""Share of the site's images held out to judge the adaptation when no evaluation set is given."""
SITE_VAL_FRACTION = 0.15
"""Share of the rest that re-fits the fusion weight, calibration and the gate's threshold."""
MIN_SITE_IMAGES = 20
ADAPTATION_FIGURES: tuple[str, ...] = ("n", "accuracy", "macro_auc", "ece", "macro_f1")


@dataclass(frozen=True)
class AdaptOutcome:
    """The adapted model and the figures of the base and adapted models on the site test split."""

    card: ModelCard
    model_dir: Path
    test_samples: list[Sample]
    before: dict[str, Any]
    after: dict[str, Any]
    training: TrainOutcome

    @property
    def improved(self) -> bool:
        """True when the adapted model's macro ROC AUC (accuracy where AUC is undefined) on the site test
        split is at least the base model's."""
        key = "macro_auc" if self.after.get("macro_auc") is not None else "accuracy"
        after, before = self.after.get(key), self.before.get(key)
        return after is not None and (before is None or float(after) >= float(before))


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a :func:`trainer.evaluate.evaluate_model` report, for the card."""
    out: dict[str, Any] = {key: report.get(key) for key in ADAPTATION_FIGURES}
    per_class = report.get("per_class", {})
    out["sensitivity"] = {c: per_class.get(c, {}).get("sensitivity") for c in CLASSES if c in per_class}
    return out


def _preset_of(card: ModelCard, preset: str | None) -> str:
    name = preset or str(card.metrics.get("preset") or "quick")
    if name not in PRESETS:
        raise TrainingError(f"unknown preset {name!r} (from the base model's card): give --preset")
    return name


def adapt_model(
    model_dir: Path,
    samples: Sequence[Sample],
    out: Path,
    *,
    evaluation: Sequence[Sample] | None = None,
    preset: str | None = None,
    epochs: int | None = None,
    samples_per_epoch: int | None = None,
    seed: int = 0,
    version: str | None = None,
    workdir: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    source: str = "site images",
    target_sensitivity: Mapping[str, float] | None = None,
) -> AdaptOutcome:
    """Fine-tune the verified model in ``model_dir`` on the site's ``samples`` and write ``out``.

    ``evaluation`` (optional) are site images kept apart for the before/after figures; without it
    :data:`SITE_TEST_FRACTION` of ``samples`` is held out (leak-free, by patient and near-duplicate).
    ``preset`` (default: the base model's) gives the recipe; ``epochs`` and ``samples_per_epoch``
    override it (a site has few images: the defaults are the preset's). ``source`` says where the
    labels came from (recorded). ``target_sensitivity`` (``{class: sensitivity}``) re-chooses the
    operating points on the site's validation split (:mod:`trainer.operating_points`).
    Raises :class:`DataError` with fewer than :data:`MIN_SITE_IMAGES` images or an empty split,
    :class:`TrainingError` / :class:`screener.core.errors.ModelError` as ``trainer train`` does (``out``
    existing included).
    """
    base = load_model_dir(Path(model_dir))
    site = list(samples)
    if len(site) < MIN_SITE_IMAGES:
        raise DataError(
            f"{len(site)} labelled site images: adaptation needs at least {MIN_SITE_IMAGES} (import more "
            "confirmed labels with `trainer labels import`, or run the site in shadow mode for longer)"
        )
    held_out = list(evaluation) if evaluation is not None else None
    recipe = _preset_of(base.card, preset)
    name = version or f"{base.card.version}+site"[:64]
    adaptation: dict[str, Any] = {
        "base_model": base.card.version,
        "base_training_data_digest": base.card.training_data_digest,
        "source": source,
        "preset": recipe,
        "site_images": len(site),
        "site_sources": source_table(site),
    }
    outcome = train_and_export(
        preset=recipe,
        data=site,
        out=Path(out),
        epochs=epochs,
        samples_per_epoch=samples_per_epoch,
        seed=seed,
        version=name,
        parent=base,
        workdir=workdir,
        device=device,
        progress=progress,
        val_fraction=SITE_VAL_FRACTION,
        test_fraction=0.0 if held_out is not None else SITE_TEST_FRACTION,
        extra_metrics={"adaptation": adaptation},
        target_sensitivity=target_sensitivity,
    )
    test = held_out if held_out is not None else outcome.test_samples
    if not test:
        raise DataError("no site images were left to evaluate the adaptation on: give more labelled images")
    before = figures(evaluate_model(base.path, test, None, bootstrap=0, progress=progress))
    after = figures(evaluate_model(outcome.model_dir, test, None, bootstrap=0, progress=progress))
    adaptation.update(
        {
            "site_data_digest": outcome.splits_digest,
            "split_counts": outcome.splits.counts(),
            "evaluated_on": "given evaluation images" if held_out is not None else "held-out site test split",
            "before": before,
            "after": after,
        }
    )
    card = _record(outcome.model_dir, outcome.card, adaptation)
    log.info(
        "adapted",
        base=base.card.version,
        version=card.version,
        n_test=len(test),
        auc_before=before.get("macro_auc"),
        auc_after=after.get("macro_auc"),
    )
    return AdaptOutcome(card, outcome.model_dir, list(test), before, after, outcome)


def _record(model_dir: Path, card: ModelCard, adaptation: dict[str, Any]) -> ModelCard:
    """Write the completed ``metrics.adaptation`` into the card (the card is not among the files its own
    sha256 list covers; the weights and graph are untouched)."""
    from trainer.quantize import _write_card

    metrics = {**card.metrics, "adaptation": json.loads(json.dumps(adaptation, default=str))}
    new = dataclasses.replace(card, metrics=metrics)
    new.validate()
    _write_card(model_dir, new)
    loaded = load_model_dir(model_dir)
    if loaded.card.metrics.get("adaptation", {}).get("after") != adaptation["after"]:
        raise TrainingError(f"{model_dir / CARD_FILE}: the adaptation figures did not reach the card")
    return loaded.card


def summary_line(outcome: AdaptOutcome) -> str:
    """One line for the CLI: the site test figures before and after."""

    def pct(value: Any) -> str:
        return f"{100 * float(value):.1f}%" if isinstance(value, int | float) else "n/a"

    b, a = outcome.before, outcome.after
    covid_b = b.get("sensitivity", {}).get("covid19")
    covid_a = a.get("sensitivity", {}).get("covid19")
    return (
        f"site test split (n={a.get('n')}): macro ROC AUC {pct(b.get('macro_auc'))} -> "
        f"{pct(a.get('macro_auc'))}, "
        f"accuracy {pct(b.get('accuracy'))} -> {pct(a.get('accuracy'))}, ECE {pct(b.get('ece'))} -> "
        f"{pct(a.get('ece'))}, COVID-19 sensitivity {pct(covid_b)} -> {pct(covid_a)}"
    )


__all__ = ["AdaptOutcome", "adapt_model", "figures", "summary_line"]
