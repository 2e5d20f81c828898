"""A Triton Inference Server model repository entry for a verified model directory.

``screener models export-triton VERSION REPO_DIR`` writes ``REPO_DIR/<model_name>/<n>/`` and
``REPO_DIR/<model_name>/config.pbtxt``. The Triton version number ``n`` is the first 12 hex digits of the
sha256 of the model's ``card.json`` read as an integer (:func:`triton_version`), and ``config.pbtxt``
carries, for every version it serves, the card's full sha256, the ONNX graph's sha256 and the screener's
version name as parameters (``card_sha256:<n>``, ``onnx_sha256:<n>``, ``screener_version:<n>``). A
worker with ``inference.backend = "triton"`` reads them back through the client and serves a registered
version only when they match (:mod:`screener.model.engine.triton_backend`).

Three kinds of entry:

- ``python`` (default): Triton's Python backend runs ``model.py`` (this package's ``triton_model.py``,
  also at ``deploy/triton/model.py``) which runs the same ``model.onnx`` with ONNX Runtime; for CPU nodes
  and any Triton build that has the Python backend.
- ``onnxruntime``: Triton's own ONNX Runtime backend (``platform: "onnxruntime_onnx"``), CPU or GPU.
- ``tensorrt``: a TensorRT plan already built for that GPU by the ``tensorrt`` engine backend (found in
  ``inference.trt_cache_dir`` by the graph's sha256), ``platform: "tensorrt_plan"``.

The versions of one entry are listed explicitly (``version_policy: { specific { ... } }``), so exporting a
new version next to the previous one lets Triton serve both while workers move over; ``keep`` bounds how
many stay. Every file is written to a temporary name and renamed, the version directory last but one and
``config.pbtxt`` last, so a polling Triton never sees half an entry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from screener.core.db.models import ModelVersion
from screener.core.errors import ModelError
from screener.model.modelcard import (
    CARD_FILE,
    ONNX_FILE,
    LoadedModel,
    ModelCard,
    load_model_dir,
    read_card,
    sha256_file,
)
from screener.model.registry import verify_registered

TritonKind = Literal["python", "onnxruntime", "tensorrt"]
KINDS: tuple[TritonKind, ...] = ("python", "onnxruntime", "tensorrt")
INPUT_NAME = "image"
OUTPUT_NAMES: tuple[str, ...] = ("probs", "probs_a", "probs_b")
NOVELTY_OUTPUT = "novelty"
HEATMAP_OUTPUT = "heatmap"
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_model.py")
PLAN_FILE = "model.plan"
CONFIG_FILE = "config.pbtxt"

CARD_SHA_KEY = "card_sha256"
ONNX_SHA_KEY = "onnx_sha256"
VERSION_KEY = "screener_version"


def triton_version(card_sha256: str) -> int:
    """The Triton version number of a model whose ``card.json`` has sha256 ``card_sha256``."""
    if len(card_sha256) != 64:
        raise ModelError(f"card sha256 {card_sha256!r} is not a sha256 hex digest")
    return int(card_sha256[:12], 16)


def parameter_key(key: str, version: int) -> str:
    """The ``config.pbtxt`` parameter naming ``key`` (card_sha256, onnx_sha256, screener_version) of
    Triton version ``version``."""
    return f"{key}:{version}"


def output_names(card: ModelCard) -> tuple[str, ...]:
    """The outputs a model with ``card`` serves, as the local engines read them: the three probability
    tensors, plus ``novelty`` with a gate, plus ``heatmap`` with a heatmap section."""
    return (
        OUTPUT_NAMES
        + ((NOVELTY_OUTPUT,) if card.gate is not None else ())
        + ((HEATMAP_OUTPUT,) if card.heatmap is not None else ())
    )


@dataclass(frozen=True)
class TritonExport:
    """What :func:`export_triton` wrote: the entry, the version directory and the versions now listed."""

    model_dir: Path
    version_dir: Path
    triton_version: int
    card_sha256: str
    kind: TritonKind
    versions: tuple[int, ...]
    removed: tuple[int, ...]

    def summary(self) -> str:
        """What a person needs: where it went, under which Triton version, and what is now served."""
        gone = f"; removed version(s) {', '.join(map(str, self.removed))}" if self.removed else ""
        return (
            f"exported to {self.version_dir} ({self.kind} entry): Triton version {self.triton_version} "
            f"(card sha256 {self.card_sha256[:12]}); config.pbtxt serves version(s) "
            f"{', '.join(map(str, self.versions))}{gone}"
        )


@dataclass(frozen=True)
class _Served:
    version: int
    card: ModelCard
    card_sha256: str
    onnx_sha256: str


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def find_plan(trt_cache_dir: Path, onnx_sha256: str) -> Path:
    """The cached TensorRT plan built from the graph with ``onnx_sha256``, or raise :class:`ModelError`."""
    found: list[Path] = []
    for meta_path in sorted(Path(trt_cache_dir).glob("*.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        plan = meta_path.with_suffix(".plan")
        if (
            isinstance(meta, dict)
            and meta.get("onnx_sha256") == onnx_sha256
            and plan.is_file()
            and meta.get("plan_sha256") == sha256_file(plan)
        ):
            found.append(plan)
    if not found:
        raise ModelError(
            f"no TensorRT plan for model.onnx sha256 {onnx_sha256[:12]} in {trt_cache_dir}: build one on the "
            "GPU host that runs Triton (serve the model once with inference.backend = tensorrt, or run "
            "bench/gpu/run.sh), or export --kind python / onnxruntime"
        )
    if len(found) > 1:
        raise ModelError(
            f"{len(found)} TensorRT plans for model.onnx sha256 {onnx_sha256[:12]} in {trt_cache_dir} "
            f"({', '.join(p.name for p in found)}): they were built for different GPUs; pass --plan PATH"
        )
    return found[0]


def _config_text(
    name: str, kind: TritonKind, served: list[_Served], max_batch: int, queue_delay_us: int
) -> str:
    newest = served[-1].card
    size = newest.input_size
    classes = len(newest.classes)
    lines = [
        f'name: "{name}"',
        _config_kind_line(kind),
        f"max_batch_size: {max_batch}",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {queue_delay_us}",
        "}",
        "version_policy: { specific: { versions: [" + ", ".join(str(s.version) for s in served) + "] } }",
        "input [",
        f'  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [3, {size}, {size}] }}',
        "]",
        "output [",
    ]
    outs = []
    for out in output_names(newest):
        if out == NOVELTY_OUTPUT:
            # The graph's novelty is [N]; Triton batches need a non-empty shape per item.
            reshape = "" if kind == "python" else " reshape: { shape: [] }"
            outs.append(f'  {{ name: "{out}" data_type: TYPE_FP32 dims: [1]{reshape} }}')
        elif out == HEATMAP_OUTPUT:
            side = newest.heatmap.size if newest.heatmap is not None else 0
            outs.append(f'  {{ name: "{out}" data_type: TYPE_FP32 dims: [{side}, {side}] }}')
        else:
            outs.append(f'  {{ name: "{out}" data_type: TYPE_FP32 dims: [{classes}] }}')
    lines.append(",\n".join(outs))
    lines.append("]")
    group = "KIND_CPU" if kind == "python" else "KIND_AUTO"
    lines.append(f"instance_group [ {{ count: 1 kind: {group} }} ]")
    lines.append("parameters [")
    params = []
    for s in served:
        for key, value in (
            (CARD_SHA_KEY, s.card_sha256),
            (ONNX_SHA_KEY, s.onnx_sha256),
            (VERSION_KEY, s.card.version),
        ):
            params.append(
                f'  {{ key: "{parameter_key(key, s.version)}" value: {{ string_value: "{value}" }} }}'
            )
    lines.append(",\n".join(params))
    lines.append("]")
    return "\n".join(lines) + "\n"


def _read_served(entry: Path) -> list[_Served]:
    """Versions already in ``entry`` (directories named by a number holding a readable card.json)."""
    served: list[_Served] = []
    for child in entry.iterdir() if entry.is_dir() else []:
        if not (child.is_dir() and child.name.isdigit() and (child / CARD_FILE).is_file()):
            continue
        card_path = child / CARD_FILE
        try:
            card = ModelCard.from_json(card_path.read_bytes())
        except ModelError as exc:
            raise ModelError(f"{card_path} (already in the Triton repository) is unreadable: {exc}") from exc
        served.append(_Served(int(child.name), card, sha256_file(card_path), card.files[ONNX_FILE]))
    return served


def _same_contract(a: ModelCard, b: ModelCard) -> bool:
    return (
        a.input_size == b.input_size
        and len(a.classes) == len(b.classes)
        and output_names(a) == output_names(b)
        and (a.heatmap.size if a.heatmap else 0) == (b.heatmap.size if b.heatmap else 0)
    )


def export_triton(
    model_dir: Path,
    repo_dir: Path,
    *,
    model_name: str = "cxr-screener",
    kind: TritonKind = "python",
    max_batch: int = 32,
    queue_delay_us: int = 2000,
    keep: int = 2,
    plan: Path | None = None,
    trt_cache_dir: Path = Path("var/trt-cache"),
) -> TritonExport:
    """Verify ``model_dir`` (every sha256) and add it to the Triton repository ``repo_dir`` as ``model_name``.

    Re-exporting the version already there rewrites its files (same number). Versions beyond the newest
    ``keep`` (by export order: the one just written counts as newest) are removed from the config and
    the repository. Raises :class:`ModelError` for a bad model directory, a model whose input size,
    class count or outputs differ from the versions already in the entry (give it another
    ``model_name``), a repository entry of another ``kind``, or, for ``kind="tensorrt"``, no plan.
    """
    if kind not in KINDS:
        raise ModelError(f"unknown Triton entry kind {kind!r}: choose one of {', '.join(KINDS)}")
    if keep < 1:
        raise ModelError(f"keep = {keep}: at least the exported version must stay")
    if not 1 <= max_batch <= 1024:
        raise ModelError(f"max_batch = {max_batch} must be between 1 and 1024")
    loaded: LoadedModel = load_model_dir(Path(model_dir))
    card = loaded.card
    card_sha = sha256_file(loaded.path / CARD_FILE)
    onnx_sha = card.files[ONNX_FILE]
    version = triton_version(card_sha)
    entry = Path(repo_dir) / model_name
    entry.mkdir(parents=True, exist_ok=True)
    config_path = entry / CONFIG_FILE
    if config_path.is_file():
        text = config_path.read_text(encoding="utf-8")
        present = next((k for k in KINDS if _config_kind_line(k) in text), None)
        if present is not None and present != kind:
            raise ModelError(
                f"{config_path} is a {present} entry, not {kind}: export with --kind {present}, or into "
                "another model name (--model-name) or repository"
            )
    previous = [s for s in _read_served(entry) if s.version != version]
    for s in previous:
        if not _same_contract(s.card, card):
            raise ModelError(
                f"model {card.version} (input {card.input_size} px, outputs {list(output_names(card))}) "
                f"differs from version {s.card.version} already in {entry} (input {s.card.input_size} px, "
                f"outputs {list(output_names(s.card))}): export it under another --model-name"
            )
    source = (
        plan if plan is not None else (find_plan(trt_cache_dir, onnx_sha) if kind == "tensorrt" else None)
    )

    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=entry))
    try:
        shutil.copyfile(loaded.path / CARD_FILE, staging / CARD_FILE)
        if kind == "tensorrt":
            assert source is not None
            shutil.copyfile(source, staging / PLAN_FILE)
        else:
            shutil.copyfile(loaded.onnx_path, staging / ONNX_FILE)
            if sha256_file(staging / ONNX_FILE) != onnx_sha:
                raise ModelError(f"{loaded.onnx_path} changed while it was copied to {entry}: export again")
        if kind == "python":
            shutil.copyfile(PYTHON_MODEL_SOURCE, staging / "model.py")
        target = entry / str(version)
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    mtime_order = sorted(previous, key=lambda s: (entry / str(s.version)).stat().st_mtime)
    kept = mtime_order[max(0, len(mtime_order) - (keep - 1)) :] if keep > 1 else []
    removed = [s for s in previous if s not in kept]
    served = [*kept, _Served(version, card, card_sha, onnx_sha)]
    _write_atomic(config_path, _config_text(model_name, kind, served, max_batch, queue_delay_us).encode())
    for s in removed:
        # Out of Triton's sight first (it ignores names that are not numbers), then deleted: a directory
        # half deleted under a polling Triton (its stub writes __pycache__ there) would still count as a
        # version holding a card and no model.
        retired = entry / f".retired.{s.version}.{os.getpid()}"
        (entry / str(s.version)).replace(retired)
        shutil.rmtree(retired, ignore_errors=True)
    return TritonExport(
        model_dir=entry,
        version_dir=target,
        triton_version=version,
        card_sha256=card_sha,
        kind=kind,
        versions=tuple(s.version for s in served),
        removed=tuple(s.version for s in removed),
    )


def _config_kind_line(kind: TritonKind) -> str:
    return {
        "python": 'backend: "python"',
        "onnxruntime": 'platform: "onnxruntime_onnx"',
        "tensorrt": 'platform: "tensorrt_plan"',
    }[kind]


def export_registered(
    session: Session,
    version: str,
    repo_dir: Path,
    *,
    model_name: str = "cxr-screener",
    kind: TritonKind = "python",
    max_batch: int = 32,
    keep: int = 2,
    plan: Path | None = None,
    trt_cache_dir: Path = Path("var/trt-cache"),
) -> TritonExport:
    """Export registered model ``version`` (its directory must still hold exactly the registered card and
    files) with :func:`export_triton`; raises :class:`ModelError` for an unknown version."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise ModelError(
            f"model version {version!r} is not registered: `screener models list` shows the registered "
            "ones, `screener models register DIR` adds one"
        )
    model_dir = Path(row.path)
    verify_registered(row, read_card(model_dir), model_dir)
    return export_triton(
        model_dir,
        repo_dir,
        model_name=model_name,
        kind=kind,
        max_batch=max_batch,
        keep=keep,
        plan=plan,
        trt_cache_dir=trt_cache_dir,
    )
