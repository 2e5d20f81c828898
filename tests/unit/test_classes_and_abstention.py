"""Classes from the model card, operating points and abstention: card validation, the verdict rule, the
threshold picker and the selective accuracy curve."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from screener.core.errors import DataError, ModelError
from screener.imaging.pixels import PreprocessSpec
from screener.model.modelcard import ClassConcept, GateSpec, ModelCard
from screener.model.verdict import INDETERMINATE, ImageOutcome, decide, study_verdict
from trainer.operating_points import (
    accuracy_at_coverage,
    parse_targets,
    pick_thresholds,
    plot_selective,
    selective_curve,
)

FINDINGS = ("covid19", "viral_pneumonia")
CLASSES3 = ("normal", "covid19", "viral_pneumonia")


def _card(classes: tuple[str, ...], **changes: object) -> ModelCard:
    card = ModelCard(
        version="v1",
        classes=classes,
        architectures=("resnet18", "resnet18"),
        input_size=64,
        preprocessing=PreprocessSpec(input_size=64),
        fusion_weight=0.5,
        created_at="2026-12-02T00:00:00+00:00",
        files={"model.onnx": "a" * 64, "weights.safetensors": "b" * 64},
        opset=17,
    )
    return dataclasses.replace(card, **changes)  # type: ignore[arg-type]


def test_a_two_class_card_is_accepted_and_its_findings_come_from_the_concepts() -> None:
    card = _card(("normal", "covid19"))
    card.validate()
    assert card.findings == ("covid19",)
    assert card.concept("covid19").code == "840539006"
    back = ModelCard.from_json(card.to_json())
    assert back.classes == ("normal", "covid19") and back.findings == ("covid19",)


def test_a_card_names_a_new_class_with_its_own_concept_and_round_trips() -> None:
    effusion = ClassConcept("Pleural effusion", "60046008", "SCT", True, "CXRS-P-EFFUSION", 5)
    card = _card(("normal", "covid19", "pleural_effusion"), concepts={"pleural_effusion": effusion})
    card.validate()
    assert card.findings == ("pleural_effusion", "covid19")  # priority 5 before COVID-19's 10
    back = ModelCard.from_json(card.to_json())
    assert back.concept("pleural_effusion") == effusion


@pytest.mark.parametrize(
    ("classes", "changes", "message"),
    [
        (("normal", "effusion"), {}, r"classes = 'effusion': unknown class without a concept"),
        (("normal", "indeterminate"), {}, r"not not_analysed or indeterminate"),
        (("normal", "Covid"), {}, r"lower-case letters"),
        (("normal", "covid19"), {"concepts": {"covid19": ClassConcept("COVID-19", "1", "SCT", False, "P")}},
         r"no class is a finding"),
        (("normal", "covid19"), {"concepts": {"covid19": ClassConcept("COVID-19", "1", "XYZ", True, "P")}},
         r"concepts\.covid19\.scheme = 'XYZ': unknown coding scheme"),
        (("normal", "covid19"),
         {"concepts": {"covid19": ClassConcept("COVID-19", "840539006", "SCT", True, "CXRS-P-NORMAL")}},
         r"share a probability_code"),
        (("normal", "covid19"), {"concepts": {"lung_nodule": ClassConcept("N", "1", "SCT", True, "P")}},
         r"concepts\.lung_nodule = 'lung_nodule': names a class the model does not output"),
    ],
)  # fmt: skip
def test_card_validation_names_what_is_wrong(
    classes: tuple[str, ...], changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        _card(classes, **changes).validate()


def test_card_json_refuses_an_unknown_concept_key() -> None:
    data = json.loads(_card(("normal", "covid19")).to_json())
    data["concepts"] = {"covid19": {"meaning": "COVID-19", "code": "840539006", "scheme": "SCT",
                                    "finding": True, "probability_code": "P", "colour": "red"}}  # fmt: skip
    with pytest.raises(ModelError, match=r"concepts\.covid19\.colour"):
        ModelCard.from_dict(data)


def test_without_thresholds_the_label_is_the_most_probable_class() -> None:
    assert decide([0.2, 0.5, 0.3], CLASSES3, {}, FINDINGS).label == "covid19"
    assert decide([0.6, 0.1, 0.3], CLASSES3, {}, FINDINGS).label == "normal"


def test_the_most_urgent_finding_that_reaches_its_operating_point_wins() -> None:
    thresholds = {"normal": 0.5, "covid19": 0.2, "viral_pneumonia": 0.3}
    # Both findings clear; COVID-19 is more urgent even though viral pneumonia is more probable.
    assert decide([0.1, 0.25, 0.65], CLASSES3, thresholds, FINDINGS).label == "covid19"
    assert decide([0.6, 0.1, 0.3], CLASSES3, thresholds, FINDINGS).label == "viral_pneumonia"
    assert decide([0.7, 0.1, 0.2], CLASSES3, thresholds, FINDINGS).label == "normal"


def test_no_class_reaching_its_operating_point_is_indeterminate_with_the_figures() -> None:
    thresholds = {"normal": 0.6, "covid19": 0.5, "viral_pneumonia": 0.5}
    decision = decide([0.4, 0.35, 0.25], CLASSES3, thresholds, FINDINGS)
    assert decision.label == INDETERMINATE
    assert decision.reason is not None and "normal 0.400 < 0.600" in decision.reason


def test_a_class_without_a_threshold_clears_only_as_the_most_probable() -> None:
    thresholds = {"covid19": 0.9}
    assert decide([0.5, 0.3, 0.2], CLASSES3, thresholds, FINDINGS).label == "normal"
    assert decide([0.2, 0.5, 0.3], CLASSES3, thresholds, FINDINGS).label == INDETERMINATE


def test_a_borderline_image_for_the_content_gate_is_indeterminate() -> None:
    gate = GateSpec(method="mahalanobis", threshold=100.0, feature_dims=(8, 8), borderline=80.0)
    gate.validate()
    assert gate.is_borderline(90.0) and not gate.is_borderline(50.0) and not gate.is_borderline(120.0)
    decision = decide([0.9, 0.05, 0.05], CLASSES3, {}, FINDINGS, borderline=gate.borderline_reason(90.0))
    assert decision.label == INDETERMINATE and "novelty 90.0 in (80.0, 100.0]" in str(decision.reason)
    with pytest.raises(ModelError, match=r"gate\.borderline = 120"):
        dataclasses.replace(gate, borderline=120.0).validate()


def test_study_verdict_finding_first_then_indeterminate_then_normal() -> None:
    covid = ImageOutcome("classified", "covid19", {"normal": 0.3, "covid19": 0.7})
    unsure = ImageOutcome("classified", INDETERMINATE, {"normal": 0.5, "covid19": 0.5}, reason="why")
    normal = ImageOutcome("classified", "normal", {"normal": 0.9, "covid19": 0.1})
    skipped = ImageOutcome("skipped")
    assert study_verdict([normal, unsure, covid], ("covid19",)).label == "covid19"
    verdict = study_verdict([normal, unsure, skipped], ("covid19",))
    assert (verdict.label, verdict.reason, verdict.skipped) == (INDETERMINATE, "why", 1)
    assert study_verdict([normal, skipped], ("covid19",)).label == "normal"
    assert study_verdict([skipped], ("covid19",)).label == "not_analysed"


def test_thresholds_reach_the_target_sensitivity_on_validation() -> None:
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 3, size=n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    points = pick_thresholds(probs, labels, CLASSES3, {"covid19": 0.95})
    assert set(points.thresholds) == set(CLASSES3)
    covid = labels == 1
    caught = float(np.mean(probs[covid, 1] >= points.thresholds["covid19"]))
    assert caught >= 0.95 and points.details["covid19"]["val_sensitivity"] == pytest.approx(caught)
    # The highest such threshold (to six decimals): the next higher COVID-19 score would miss the target.
    ranked = np.sort(probs[covid, 1])[::-1]
    k = math.ceil(0.95 * ranked.size)
    assert 0 <= ranked[k - 1] - points.thresholds["covid19"] < 1e-6
    assert float(np.mean(probs[covid, 1] >= ranked[k - 2])) < 0.95
    assert points.details["normal"]["rule"] == "youden"
    assert pick_thresholds(probs, labels, CLASSES3, {}).thresholds == {}


def test_threshold_picker_refuses_what_it_cannot_do() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(DataError, match="not a class"):
        pick_thresholds(probs, [0, 1], ("normal", "covid19"), {"viral_pneumonia": 0.9})
    with pytest.raises(DataError, match="no covid19 image"):
        pick_thresholds(probs, [0, 0], ("normal", "covid19"), {"covid19": 0.9})
    assert parse_targets(["covid19=0.95"]) == {"covid19": 0.95}
    for bad, message in (
        ("covid19", "CLASS=SENSITIVITY"),
        ("covid19=1.5", r"\(0, 1\]"),
        ("x=0.9", "not a class"),
    ):
        with pytest.raises(DataError, match=message):
            parse_targets([bad], ("normal", "covid19"))


def test_selective_accuracy_keeps_the_most_confident_first(tmp_path: Path) -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array(
        [0, 1, 1, 1]
    )  # right, wrong, right, wrong (by descending confidence 0.9, 0.8, 0.6, 0.55)
    coverage, accuracy = selective_curve(probs, labels)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(accuracy, [1.0, 0.5, 2 / 3, 0.5])
    assert accuracy_at_coverage(probs, labels, 0.5) == 0.5
    assert math.isclose(accuracy_at_coverage(probs, labels, 0.8), 0.5)  # 4 images: 80% rounds up to all
    plot_selective(probs, labels, tmp_path / "selective.png")
    with Image.open(tmp_path / "selective.png") as image:
        assert image.size[0] > 300


def test_a_fine_tuned_model_inherits_its_parents_target_sensitivities() -> None:
    from trainer.operating_points import inherited_targets

    metrics = {
        "operating_points": {
            "split": "validation",
            "classes": {
                "covid19": {"rule": "target_sensitivity", "target": 0.95, "threshold": 0.3},
                "normal": {"rule": "youden", "threshold": 0.5},
            },
        }
    }
    assert inherited_targets(_card(CLASSES3, metrics=metrics)) == {"covid19": 0.95}
    assert inherited_targets(_card(CLASSES3)) == {}
