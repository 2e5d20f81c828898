"""The body of ``trainer train``: split, train the candidate backbones, keep the best two, fuse, fit the
image-content gate (:mod:`trainer.gate`), export.

Paper recipe (Wang, Liu & Xu 2020): transfer-learn several ResNets, choose the two best by validation
accuracy (ties: lower validation loss), freeze them, learn the output weight of each from validation
accuracy, and ship one fused model. The test split is never used for a choice; it is evaluated once at
the end and returned so ``trainer evaluate`` can be run on the same images.

DDP-safe: under ``torchrun`` every rank runs :func:`train_and_export` with the same arguments; the split is
deterministic, each backbone trains with DistributedDataParallel, every rank computes the (cheap, identical)
fusion and test metrics, and only rank 0 writes the model directory. Other ranks then read its card.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from screener.core.errors import TrainingError
from screener.core.logs import get_logger
from screener.imaging.pixels import PreprocessSpec
from screener.model.export import export_model_dir
from screener.model.fused import ARCHITECTURES, FusedResNet
from screener.model.lungs import LungCrop, load_lung_crop
from screener.model.modelcard import (
    CLASSES,
    LoadedModel,
    LungCropSpec,
    ModelCard,
    OutputCalibration,
    network_temperatures,
    read_card,
)
from trainer.augment import Augmenter, Chain, SiteAugmenter
from trainer.calibrate import apply_graph_calibration, choose_calibration, compare_methods, ece_noise_floor
from trainer.data import (
    ImageDataset,
    Sample,
    Splits,
    balanced_sampler,
    dataset_classes,
    format_source_table,
    limit_per_class,
    load_samples,
    single_source_classes,
    source_table,
    split_samples,
)
from trainer.evaluate import calibration_bins
from trainer.fuse import (
    FusionResult,
    accuracy,
    apply_temperature,
    fit_temperature,
    freeze,
    fuse_probs,
    log_loss,
    predict_probs,
)
from trainer.operating_points import inherited_targets, pick_thresholds
from trainer.train import (
    BackboneResult,
    TrainConfig,
    barrier,
    distributed_rank_world,
    load_backbone_weights,
    resolve_device,
    train_backbone,
)

log = get_logger("trainer.pipeline")


@dataclass(frozen=True)
class Preset:
    """A training recipe. ``samples_per_epoch`` bounds the balanced sampler's draws per epoch (None: one
    draw per training image); ``limit_per_class`` caps the dataset before splitting (None: all)."""

    archs: tuple[str, ...]
    input_size: int
    epochs: int
    batch_size: int
    limit_per_class: int | None = None
    samples_per_epoch: int | None = None
    fusion_rounds: int = 10
    working_size: int = 0
    site_augment: bool = False
    source_power: float | None = None
    lung_crop: LungCropSpec | None = None
    crop_jitter: float = 0.0
    segmenter_epochs: int = 25
    calibrate: bool = False
    gate: bool = True


PRESETS: dict[str, Preset] = {
    # Full cxr3 (3,612 images) on the 2-core dev CPU, from scratch: 431 s end to end (resnet18 ~34 img/s,
    # resnet34 ~22 img/s at 128 px); 1,024 balanced draws per epoch keep it well under 15 minutes.
    # Against shortcut learning (MODEL_RESULTS.md has the leave-one-source-out figures and every variant
    # tried): one canonical working size, a lung-field crop learned on jsrt-lungs inside the graph, site
    # and processing augmentations, draws spread over the sources of each class, temperature scaling.
    # cxr3 + cxrx (3,905 images) on the 2-core dev CPU: see MODEL_RESULTS.md for the time it takes.
    "robust": Preset(
        archs=("resnet18", "resnet34"),
        input_size=256,
        epochs=4,
        batch_size=32,
        samples_per_epoch=1536,
        working_size=256,
        site_augment=True,
        source_power=0.5,
        lung_crop=LungCropSpec(seg_size=128, crop_size=128),
        crop_jitter=0.1,
        calibrate=True,
    ),
    "quick": Preset(
        archs=("resnet18", "resnet34"),
        input_size=128,
        epochs=3,
        batch_size=32,
        limit_per_class=None,
        samples_per_epoch=1024,
    ),
    # The paper: ResNet-50/101/152 candidates at 224 px, batch 64; the best two are fused. With the robust
    # preset's data handling and augmentations (the lungs cropped to 224 px from a 320 px input).
    "paper": Preset(
        archs=("resnet50", "resnet101", "resnet152"),
        input_size=320,
        epochs=30,
        batch_size=64,
        limit_per_class=None,
        samples_per_epoch=None,
        working_size=320,
        site_augment=True,
        source_power=0.5,
        lung_crop=LungCropSpec(seg_size=128, crop_size=224),
        crop_jitter=0.1,
        calibrate=True,
    ),
}


@dataclass(frozen=True)
class TrainOutcome:
    """What ``trainer train`` produced: the exported model directory and its card, the split (its digest
    and the untouched test samples), every candidate's result, the fusion, and the test-split metrics."""

    card: ModelCard
    model_dir: Path
    splits_digest: str
    splits: Splits
    backbones: list[BackboneResult]
    chosen: tuple[str, str]
    fusion: FusionResult
    test_metrics: dict[str, Any]

    @property
    def test_samples(self) -> list[Sample]:
        """The held-out test split, for ``trainer evaluate``."""
        return self.splits.test


def choose_two(results: list[BackboneResult]) -> tuple[BackboneResult, BackboneResult]:
    """The two best candidates by validation accuracy, ties broken by lower validation loss (then order).

    Raises :class:`TrainingError` with fewer than two candidates.
    """
    if len(results) < 2:
        raise TrainingError(f"fusion needs at least two trained backbones, got {len(results)}")
    ranked = sorted(enumerate(results), key=lambda ir: (-ir[1].val_accuracy, ir[1].val_loss, ir[0]))
    return ranked[0][1], ranked[1][1]


def parent_backbone_states(parent: LoadedModel) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """``[(arch_a, net_a state), (arch_b, net_b state)]`` from a verified model directory's safetensors.

    Raises :class:`TrainingError` when the weights cannot be read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(parent.weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise TrainingError(f"cannot read parent weights {parent.weights_path}: {exc}") from None
    out = []
    for prefix, arch in zip(("net_a.", "net_b."), parent.card.architectures, strict=True):
        out.append((arch, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}))
    return out


MIN_CALIBRATION_IMAGES = 100
"""Validation images from which every preset fits its calibration (trainer.calibrate)."""


REFERENCE_EDGES: tuple[float, ...] = tuple(round(i / 10, 1) for i in range(11))
"""Bin edges of the mean grey level ([0, 1] decoded image) in the card's drift reference."""


def _reference(val_ds: ImageDataset, probs: np.ndarray) -> dict[str, Any]:
    """The card's ``metrics.reference`` for ``screener report drift``: the validation split's prediction
    mix (share of each predicted class) and the histogram of its images' mean grey level (decoded
    ``[0, 1]`` image, before contrast enhancement, as the worker records it)."""
    predicted = probs.argmax(axis=1)
    means = [float(val_ds.load(i).mean()) for i in range(len(val_ds))]
    counts, _ = np.histogram(np.clip(means, 0.0, 1.0), bins=np.array(REFERENCE_EDGES))
    return {
        "source": "validation split",
        "n": len(means),
        "prediction_mix": {c: float(np.mean(predicted == i)) for i, c in enumerate(val_ds.classes)},
        "intensity_histogram": {"edges": list(REFERENCE_EDGES), "counts": [int(c) for c in counts]},
    }


def _loader(ds: ImageDataset, batch_size: int, workers: int) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)  # type: ignore[arg-type]


def _test_metrics(
    net_a: torch.nn.Module,
    net_b: torch.nn.Module,
    weight: float,
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    calibration: Mapping[str, Any] | None = None,
    classes: Sequence[str] = CLASSES,
) -> dict[str, Any]:
    """Figures on the test split, with the card ``calibration`` the graph will run."""
    params = dict(calibration or {})
    raw_a, raw_b, labels = predict_probs(net_a, net_b, loader, device)
    temperature_a, temperature_b = network_temperatures(params)
    probs_a = apply_temperature(raw_a, temperature_a)
    probs_b = apply_temperature(raw_b, temperature_b)
    fused = apply_graph_calibration(params, raw_a, raw_b, weight)
    predicted = fused.argmax(axis=1)
    per_class = {}
    for index, name in enumerate(classes):
        positives = labels == index
        per_class[name] = {
            "n": int(positives.sum()),
            "sensitivity": float(np.mean(predicted[positives] == index)) if positives.any() else None,
        }
    return {
        "n": int(labels.shape[0]),
        "accuracy": accuracy(fused, labels),
        "logloss": log_loss(fused, labels),
        "accuracy_a": accuracy(probs_a, labels),
        "accuracy_b": accuracy(probs_b, labels),
        "per_class": per_class,
    }


def train_and_export(
    *,
    preset: str,
    data: list[Sample] | Path,
    out: Path,
    epochs: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    pretrained_dir: Path | None = None,
    fusion_method: str = "accuracy",
    version: str | None = None,
    parent: LoadedModel | None = None,
    workdir: Path | None = None,
    archs: tuple[str, ...] | None = None,
    input_size: int | None = None,
    batch_size: int | None = None,
    samples_per_epoch: int | None = None,
    limit_batches: int | None = None,
    device: str | None = None,
    workers: int = 0,
    progress: bool = True,
    segmentation_data: Path | None = None,
    segmenter: LungCrop | None = None,
    segmenter_epochs: int | None = None,
    out_of_source: Mapping[str, Any] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    extra_metrics: Mapping[str, Any] | None = None,
    target_sensitivity: Mapping[str, float] | None = None,
) -> TrainOutcome:
    """Train the preset's candidate backbones on ``data``, fuse the best two, export to ``out``.

    ``data`` is a list of samples or a source for :func:`trainer.data.load_samples`. ``epochs``,
    ``limit`` (images per class), ``archs``, ``input_size``, ``batch_size`` and ``samples_per_epoch``
    override the preset (``samples_per_epoch=0``: one draw per training image). With ``parent`` (a
    verified model directory: the active model) this is fine-tuning: the candidates default to the
    parent's two architectures, each initialised from the parent's weights, the parent's preprocessing
    is kept, and the card records ``parent_version``. ``val_fraction`` and ``test_fraction`` are the
    split's (:func:`trainer.data.split_samples`); ``extra_metrics`` are added to the card's metrics
    (``trainer adapt`` records the adaptation there). The model's classes are those the data holds
    (:func:`trainer.data.dataset_classes`; a parent's, when fine-tuning). ``target_sensitivity``
    (``{class: sensitivity}``) sets the card's operating points on the validation split
    (:func:`trainer.operating_points.pick_thresholds`); without it a parent's targets are re-applied
    (fine-tuning), else the card has none (argmax).
    Backbones train in ``workdir/<index>-<arch>/`` (default ``out``'s sibling ``.<out name>.work``) and
    resume from their checkpoints when re-run. The card's metrics hold each candidate's validation
    accuracy/loss, the chosen pair, the fusion summary and trajectory, the pretrained flags, the test
    metrics and the training time.

    Raises :class:`TrainingError` for an unknown preset or architecture, fewer than two candidates, or a
    failed training; :class:`screener.core.errors.DataError` for unusable data; :class:`ModelError` when
    ``out`` exists or the export fails.
    """
    started = time.perf_counter()
    try:
        recipe = PRESETS[preset]
    except KeyError:
        raise TrainingError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}") from None
    if out.exists():
        raise TrainingError(f"{out} already exists: model directories are immutable; choose a new one")
    parent_states = parent_backbone_states(parent) if parent is not None else []
    candidates = archs or (tuple(a for a, _ in parent_states) if parent_states else recipe.archs)
    unknown = [a for a in candidates if a not in ARCHITECTURES]
    if unknown:
        raise TrainingError(f"unknown backbone {unknown[0]!r}: choose from {', '.join(ARCHITECTURES)}")
    if len(candidates) < 2:
        raise TrainingError(f"need at least two candidate backbones to fuse, got {list(candidates)}")
    if parent is not None and input_size is None:
        spec = parent.card.preprocessing
        crop_spec = parent.card.lung_crop
    else:
        spec = PreprocessSpec(input_size=input_size or recipe.input_size, working_size=recipe.working_size)
        crop_spec = recipe.lung_crop
    if crop_spec is not None and segmenter is None and parent is None and segmentation_data is None:
        raise TrainingError(
            f"preset {preset} crops each radiograph to its lungs and trains the lung segmenter itself: "
            "give --segmentation-data DIR (a folder of radiographs with lung masks, e.g. "
            "../shared/data/jsrt-lungs)"
        )
    n_epochs = epochs or recipe.epochs
    batch = batch_size or recipe.batch_size
    budget = samples_per_epoch if samples_per_epoch is not None else recipe.samples_per_epoch
    budget = budget or None  # 0: one draw per training image
    rank, world = distributed_rank_world()

    samples = load_samples(data) if isinstance(data, (str, Path)) else list(data)
    per_class = limit if limit is not None else recipe.limit_per_class
    if per_class is not None:
        samples = limit_per_class(samples, per_class, seed=seed)
    sources = source_table(samples)
    log.info("sources", table="\n" + format_source_table(sources))
    for label, only in single_source_classes(sources).items():
        log.warning(
            "single_source_class",
            label=label,
            source=only,
            advice="every image of this class comes from one source: the model may learn the source, not "
            "the disease; add images of it from other sources and check with trainer crossval",
        )
    classes = parent.card.classes if parent is not None else dataset_classes(samples)
    strays = sorted({s.label for s in samples} - set(classes))
    if strays:
        raise TrainingError(
            f"labels {strays} are not classes of parent model {parent.card.version if parent else ''} "
            f"({', '.join(classes)}): fine-tuning keeps the parent's classes; train a new model instead"
        )
    splits = split_samples(
        samples, spec=spec, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )
    digest = splits.digest()
    log.info("split_done", counts=splits.counts(), digest=digest[:12], preset=preset, world_size=world)

    work = workdir if workdir is not None else out.parent / f".{out.name}.work"
    crop = segmenter
    if crop is None and parent is not None and crop_spec is not None:
        crop = load_lung_crop(parent.weights_path, crop_spec)
    if crop is None and crop_spec is not None and segmentation_data is not None:
        from trainer.segment import train_segmenter

        trained = train_segmenter(
            segmentation_data,
            spec,
            crop_spec,
            epochs=segmenter_epochs or recipe.segmenter_epochs,
            seed=seed,
            progress=progress,
        )
        crop = trained.crop
        crop.spec = dataclasses.replace(crop_spec, segmenter=trained.summary)
    if crop is not None:
        crop.eval()
        for parameter in crop.parameters():
            parameter.requires_grad_(False)
    augment = Chain((Augmenter(), SiteAugmenter())) if recipe.site_augment else Augmenter()
    train_ds = ImageDataset(
        splits.train,
        spec,
        augment=augment,
        seed=seed,
        cache=True,
        crop=crop,
        crop_jitter=recipe.crop_jitter,
        classes=classes,
    )
    val_ds = ImageDataset(splits.val, spec, seed=seed, cache=True, crop=crop, classes=classes)
    results: list[BackboneResult] = []
    unused_parent = list(parent_states)
    for index, arch in enumerate(candidates):
        init = next((state for a, state in unused_parent if a == arch), None)
        unused_parent = [(a, s) for a, s in unused_parent if s is not init]
        cfg = TrainConfig(
            arch=arch,
            input_size=spec.input_size,
            epochs=n_epochs,
            batch_size=batch,
            seed=seed + index,
            workers=workers,
            pretrained_dir=pretrained_dir,
            device=device,
            limit_batches=limit_batches,
            num_classes=len(classes),
        )
        sampler = balanced_sampler(
            splits.train, seed=seed + index, num_samples=budget, source_power=recipe.source_power
        )
        results.append(
            train_backbone(
                cfg,
                train_ds,
                val_ds,
                work / f"{index}-{arch}",
                sampler=sampler,
                progress=progress,
                init_state=init,
            )
        )
    first, second = choose_two(results)
    log.info("backbones_chosen", arch_a=first.arch, arch_b=second.arch)

    target = resolve_device(device)
    net_a = freeze(load_backbone_weights(first.arch, first.weights_path).to(target))
    net_b = freeze(load_backbone_weights(second.arch, second.weights_path).to(target))
    val_loader = _loader(val_ds, batch, workers)
    probs_a, probs_b, labels = predict_probs(net_a, net_b, val_loader, target)
    in_graph: dict[str, Any] = {}  # the card's `calibration`: what the graph runs
    calibration: dict[str, Any] = {}
    raw_a, raw_b = probs_a, probs_b
    # Every preset calibrates once the validation split is big enough to fit on (the robust and paper
    # presets always do); a handful of validation images would only add noise.
    calibrate = recipe.calibrate or labels.size >= MIN_CALIBRATION_IMAGES
    if calibrate:
        probs_a = apply_temperature(raw_a, fit_temperature(raw_a, labels))
        probs_b = apply_temperature(raw_b, fit_temperature(raw_b, labels))
    fusion = fuse_probs(
        probs_a, probs_b, labels, method=fusion_method, rounds=recipe.fusion_rounds, seed=seed
    )
    if calibrate:
        # The fusion weight is chosen on per-network calibrated outputs; then every calibration method is
        # measured with that weight and the in-graph one with the lowest cross-fitted log-loss is kept.
        table = compare_methods(raw_a, raw_b, labels, fusion.weight, seed=seed)
        method, in_graph = choose_calibration(table)
    calibrated = apply_graph_calibration(in_graph, raw_a, raw_b, fusion.weight)  # the graph's `probs`
    if calibrate:
        calibration = {
            "method": f"{method} on the validation split (trainer.calibrate)",
            **in_graph,
            "val_ece_before": table["none"]["val_ece"],
            "val_ece_after": calibration_bins(labels, calibrated)[0],
            "chosen_by": "lowest two-fold cross-fitted log-loss among the methods the graph runs",
            # What a perfectly calibrated model with these confidences would show on this many images.
            "val_ece_noise_floor": dict(
                zip(("mean", "p95"), (round(v, 4) for v in ece_noise_floor(calibrated)), strict=True)
            ),
            "alternatives": table,
        }
        log.info("calibrated", method=method, params=in_graph, val_ece=calibration["val_ece_after"])
    test_loader = _loader(
        ImageDataset(splits.test, spec, seed=seed, crop=crop, classes=classes), batch, workers
    )
    test = (
        _test_metrics(net_a, net_b, fusion.weight, test_loader, target, in_graph, classes)
        if splits.test
        else {}
    )
    targets = dict(target_sensitivity or {})
    if target_sensitivity is None and parent is not None:
        # retrain/adapt keep the parent's operating-point policy, for the classes validation can set
        present = {classes[int(i)] for i in np.unique(labels)}
        targets = {c: t for c, t in inherited_targets(parent.card).items() if c in present}
    points = pick_thresholds(calibrated, labels, classes, targets)
    if points.thresholds:
        log.info("operating_points", thresholds=points.thresholds)

    model = FusedResNet(
        first.arch,
        second.arch,
        fusion_weight=fusion.weight,
        lung_crop=crop.spec if crop is not None else None,
        temperatures=network_temperatures(in_graph),
        output_calibration=OutputCalibration.of(in_graph, len(classes)),
        num_classes=len(classes),
    )
    model.net_a.load_state_dict(net_a.state_dict())
    model.net_b.load_state_dict(net_b.state_dict())
    if crop is not None and model.lung_crop is not None:
        model.lung_crop.load_state_dict(crop.state_dict())
    model.eval()
    gate = None
    if recipe.gate:
        from trainer.gate import fit_gate

        gate = fit_gate(model, splits, spec, device=target, classes=classes)
        model.to("cpu")
    metrics = _card_metrics(
        preset, results, (first, second), fusion, test, splits, time.perf_counter() - started
    )
    # How the data was split, so that `trainer gate fit` and `export --int8` can re-make the same split.
    metrics["split_fractions"] = {"val": val_fraction, "test": test_fraction}
    if calibration:
        metrics["calibration"] = calibration
    if points.details:
        metrics["operating_points"] = {"split": "validation", "classes": points.details}
    if out_of_source:
        metrics["out_of_source"] = dict(out_of_source)
    metrics.update(extra_metrics or {})
    metrics["reference"] = _reference(val_ds, calibrated)
    if version is None:
        version = f"{preset}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-seed{seed}"
    if rank == 0:
        card = export_model_dir(
            model,
            out,
            version=version,
            preprocessing=spec,
            metrics=metrics,
            training_data_digest=digest,
            parent_version=parent.card.version if parent is not None else None,
            notes=f"trainer preset {preset}: {first.arch}+{second.arch}, fusion {fusion_method}",
            sources=sources,
            gate=gate,
            classes=classes,
            thresholds=points.thresholds,
        )
        log.info(
            "model_exported",
            out=str(out),
            version=version,
            val_acc_fused=fusion.acc_fused,
            test_acc=test.get("accuracy"),
            seconds=round(time.perf_counter() - started, 1),
        )
    barrier()
    if rank != 0:
        card = read_card(out)
    return TrainOutcome(
        card=card,
        model_dir=out,
        splits_digest=digest,
        splits=splits,
        backbones=results,
        chosen=(first.arch, second.arch),
        fusion=fusion,
        test_metrics=test,
    )


def _card_metrics(
    preset: str,
    results: list[BackboneResult],
    chosen: tuple[BackboneResult, BackboneResult],
    fusion: FusionResult,
    test: Mapping[str, Any],
    splits: Splits,
    seconds: float,
) -> dict[str, Any]:
    return {
        "preset": preset,
        "candidates": [
            {
                "arch": r.arch,
                "val_accuracy": r.val_accuracy,
                "val_loss": r.val_loss,
                "pretrained": r.pretrained,
                "epochs": len(r.history),
                "train_images_per_s": round(r.images_per_s, 2),
            }
            for r in results
        ],
        "chosen": [chosen[0].arch, chosen[1].arch],
        "pretrained": all(r.pretrained for r in chosen),
        "val_accuracy_a": fusion.acc_a,
        "val_accuracy_b": fusion.acc_b,
        "val_accuracy": fusion.acc_fused,
        "val_logloss": fusion.logloss_fused,
        "fusion": fusion.summary(),
        "fusion_trajectory": fusion.trajectory,
        "test": dict(test),
        "split_counts": splits.counts(),
        "training_seconds": round(seconds, 1),
    }
