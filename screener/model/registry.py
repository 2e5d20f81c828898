"""The ``model_versions`` table: register model directories, activate one, find the active one.

Registration records the model card as it was verified (``card_json``, with the sha256 of every file,
``model.int8.onnx`` included when the card has an INT8 section) and ``model.onnx``'s digest. A worker
serves a registered version only while its directory still holds exactly that card
(:func:`verify_registered`): the card's own digests protect the files against corruption, the registry
protects the card against someone who rewrites card and files together.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from screener.core.db.models import ModelStatus, ModelVersion, utcnow
from screener.core.errors import ModelError, ModelIntegrityError
from screener.core.logs import get_logger
from screener.model.modelcard import ONNX_FILE, WEIGHTS_FILE, ModelCard, load_model_dir, sha256_file

log = get_logger("screener.registry")

MODEL_DEFINING_FILES: tuple[str, ...] = (ONNX_FILE, WEIGHTS_FILE)
"""Files that are the model itself: a registered version never changes them (a new version does)."""


def register(session: Session, model_dir: Path, *, activate: bool = False) -> ModelVersion:
    """Verify ``model_dir`` (every sha256) and record it as a candidate (idempotent per version).

    Registering a version again records its card as it is now when only the card or its derived files
    changed (``trainer export --int8`` adds ``model.int8.onnx`` and the card's ``int8`` section in place);
    ``model.onnx`` and ``weights.safetensors`` of a registered version never change.

    Raises:
        ModelError / ModelIntegrityError: the directory is incomplete, a file was altered, it holds
        another model under an already registered version, or its graph's ``probs`` output has another
        number of classes than the card names (the card validates its classes and their concepts).
    """
    loaded = load_model_dir(model_dir)
    card = loaded.card
    check_class_outputs(loaded.onnx_path, card.classes)
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == card.version))
    onnx_sha = card.files["model.onnx"]
    if row is None:
        row = ModelVersion(
            version=card.version,
            path=str(model_dir.resolve()),
            status=ModelStatus.CANDIDATE,
            architectures="+".join(card.architectures),
            fusion_weight=card.fusion_weight,
            onnx_sha256=onnx_sha,
            card_json=card.to_json(),
        )
        session.add(row)
        session.flush()
    elif row.onnx_sha256 != onnx_sha:
        raise ModelError(
            f"model version {card.version} is already registered with a different model.onnx "
            f"({row.onnx_sha256[:12]} != {onnx_sha[:12]}): give the new model a new version"
        )
    elif row.card_json != card.to_json():
        recorded = _recorded_card(row)
        for name in MODEL_DEFINING_FILES:
            if recorded.files.get(name) != card.files.get(name):
                raise ModelError(
                    f"model version {card.version} is already registered with a different {name} "
                    f"({str(recorded.files.get(name))[:12]} != {str(card.files.get(name))[:12]}): "
                    "give the new model a new version"
                )
        changed = _card_differences(recorded, card)
        row.card_json = card.to_json()
        row.path = str(model_dir.resolve())
        log.info("model.card_updated", version=card.version, changed=changed)
    if activate:
        activate_version(session, card.version)
    return row


def check_class_outputs(onnx_path: Path, classes: tuple[str, ...]) -> None:
    """Raise :class:`ModelError` unless the graph's ``probs`` output has one column per card class (the
    graph was checked already; external data is not loaded)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    output = next((o for o in graph.output if o.name == "probs"), None)
    if output is None:
        raise ModelError(f"{onnx_path.name} has no output named probs: not a screener model graph")
    dims = output.type.tensor_type.shape.dim
    width = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else None
    if width != len(classes):
        raise ModelError(
            f"{onnx_path.name} outputs {width} class probabilities but the card names {len(classes)} classes "
            f"({', '.join(classes)}): the card does not describe this graph; export the model again"
        )


def activate_version(session: Session, version: str) -> ModelVersion:
    """Make ``version`` the one active model; the previously active one is retired."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version).with_for_update())
    if row is None:
        known = ", ".join(session.scalars(select(ModelVersion.version))) or "none"
        raise ModelError(
            f"no model version {version!r} is registered (known: {known}); run `screener models register DIR`"
        )
    now = utcnow()
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == ModelStatus.ACTIVE, ModelVersion.id != row.id)
        .values(status=ModelStatus.RETIRED, retired_at=now)
    )
    row.status = ModelStatus.ACTIVE
    row.activated_at = now
    row.retired_at = None
    return row


def active_version(session: Session) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion)
        .where(ModelVersion.status == ModelStatus.ACTIVE)
        .order_by(ModelVersion.activated_at.desc())
    )


def list_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at)))


def verify_registered(row: ModelVersion, card: ModelCard, model_dir: Path) -> None:
    """Refuse to serve ``row`` unless ``card`` (read from ``model_dir``) is the card it was registered with.

    Compares ``model.onnx``'s digest with ``row.onnx_sha256``, then every file digest and every other
    field with the recorded card, so a directory whose card and files were rewritten together (a
    replacement model under a registered name) is not served. Files are compared first; a file's
    message gives the recorded digest and the one found on disk (12-digit prefixes).

    Raises:
        ModelIntegrityError: naming the version, the file or card field, and what to do.
        ModelError: the recorded card cannot be read back (a row not written by :func:`register`).
    """
    recorded = _recorded_card(row)
    expected_files = dict(recorded.files)
    expected_files[ONNX_FILE] = row.onnx_sha256
    names = sorted(
        set(expected_files) | set(card.files), key=lambda n: (n != ONNX_FILE, n != WEIGHTS_FILE, n)
    )
    for name in names:
        expected = expected_files.get(name)
        listed = card.files.get(name)
        if listed == expected:
            continue
        path = model_dir / name
        found = sha256_file(path)[:12] if path.is_file() else "no such file"
        if expected is None:
            problem = f"{name} (sha256 {found}) was not part of it when it was registered"
        else:
            problem = f"{name} sha256 was {expected[:12]} at registration, found {found}"
        if name in MODEL_DEFINING_FILES:
            remedy = (
                f"restore the registered {name}, or give the changed model a new version and register "
                "it (`screener models register DIR --activate`)"
            )
        else:
            remedy = f"if the change is intended, re-register it: `screener models register {model_dir}`"
        raise ModelIntegrityError(
            f"model version {row.version} in {model_dir}: {problem}: the directory no longer holds the "
            f"registered model; {remedy}"
        )
    changed = _card_differences(recorded, card)
    if changed:
        raise ModelIntegrityError(
            f"model version {row.version} in {model_dir}: {', '.join(changed)} on the card differ from the "
            f"card recorded at registration; if the change is intended, re-register it: "
            f"`screener models register {model_dir}`, otherwise restore the registered card.json"
        )


def _recorded_card(row: ModelVersion) -> ModelCard:
    try:
        return ModelCard.from_json(row.card_json)
    except ModelError as exc:
        raise ModelError(
            f"model version {row.version}: the card recorded at registration cannot be read ({exc}); "
            "register the model directory again (`screener models register DIR`)"
        ) from None


def _card_differences(recorded: ModelCard, card: ModelCard) -> list[str]:
    """Names of the card fields (``files`` aside) whose values differ, in card order."""
    return [
        f.name
        for f in dataclasses.fields(ModelCard)
        if f.name != "files" and getattr(recorded, f.name) != getattr(card, f.name)
    ]
