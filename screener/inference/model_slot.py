"""The model slot: which model the worker serves, loaded only as it was registered, swapped while running.

:meth:`ModelSlot.refresh` asks the registry for the active version. A new one is verified against what was
recorded at registration (card and every file digest, before and after the engine parses the graph), loaded,
and swapped in; the engine it replaces is retired, not closed, because a batch prepared for it may still be
in flight (:meth:`ModelSlot.close_retired` closes retired engines once the caller knows none is). A version
that fails to load is not retried for ``retry_seconds``, unless it is registered again (its recorded card
changes); the previous model keeps serving meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from screener.core.config import InferenceConfig
from screener.core.errors import (
    ModelIntegrityError,
    RemoteEngineError,
    ScreenerError,
    ServedModelMismatchError,
)
from screener.core.logs import get_logger
from screener.core.metrics import Metrics
from screener.imaging.pixels import PreprocessSpec
from screener.model.engine import load_engine
from screener.model.engine.base import Engine as InferenceEngine
from screener.model.modelcard import GateSpec, load_model_dir, read_card
from screener.model.registry import active_version, verify_registered

log = get_logger("screener.worker")

MODEL_RETRY_SECONDS = 60.0


@dataclass
class LoadedModel:
    """A registered model version with its engine open, and what of its card the worker needs."""

    row_id: int
    version: str
    engine: InferenceEngine
    spec: PreprocessSpec
    classes: tuple[str, ...]
    thresholds: dict[str, float]
    gate: GateSpec | None = None  # the card's image-content gate (None: every decoded image is classified)
    findings: tuple[str, ...] = field(default=())  # the card's finding classes, most urgent first


class ModelSlot:
    """Holds the model being served (``current``) and the engines it replaced (``retired``)."""

    def __init__(
        self,
        inference: InferenceConfig,
        sessions: sessionmaker[Session],
        metrics: Metrics | None = None,
        *,
        retry_seconds: float = MODEL_RETRY_SECONDS,
    ) -> None:
        self.inference = inference
        self.sessions = sessions
        self.metrics = metrics or Metrics()
        self.retry_seconds = retry_seconds
        self.current: LoadedModel | None = None
        self.retired: list[InferenceEngine] = []  # replaced engines, closed by close_retired()
        # The version refused last: (model row id, its registered card, monotonic time of the next try).
        self.refused: tuple[int, str, float] | None = None
        self._waiting_logged = False

    def refresh(self) -> LoadedModel | None:
        """The model to serve now: the active one when it loads, else the one already served (or None).

        Never raises for a model that fails its checks (logged as ``model.load_failed``); a database error
        (SQLAlchemyError) propagates."""
        with self.sessions() as session:
            row = active_version(session)
        if row is None:
            if not self._waiting_logged:
                log.warning(
                    "worker.no_active_model",
                    hint="register and activate one: screener models register DIR --activate",
                )
                self._waiting_logged = True
            return self.current
        self._waiting_logged = False
        if self.current is not None and self.current.row_id == row.id:
            return self.current
        refused = self.refused
        if refused is not None and refused[:2] == (row.id, row.card_json) and time.monotonic() < refused[2]:
            return self.current
        inf = self.inference
        model_dir = Path(row.path)
        try:
            # The card must be the one recorded at registration before an engine parses the graph, and
            # again as load_engine verified it (the card could change in between).
            try:
                verify_registered(row, read_card(model_dir), model_dir)
            except ModelIntegrityError:
                load_model_dir(model_dir)  # a file failing its own card's checks is the more precise reason
                raise
            engine, loaded = load_engine(
                model_dir,
                inf.backend,
                threads=inf.threads,
                torch_compile=inf.torch_compile,
                trt_cache_dir=inf.trt_cache_dir,
                max_batch=inf.max_batch,
                precision=inf.precision,
                triton=inf.triton,
            )
            try:
                verify_registered(row, loaded.card, model_dir)
            except ScreenerError:
                engine.close()
                raise
        except ScreenerError as exc:
            # An inference server that is unreachable or serves another version (an export or a load may be
            # on its way) is asked again sooner than a model that failed its own checks.
            remote = isinstance(exc, RemoteEngineError | ServedModelMismatchError)
            retry = inf.triton.max_retry_seconds if remote else self.retry_seconds
            self.refused = (row.id, row.card_json, time.monotonic() + min(retry, self.retry_seconds))
            log.error(
                "model.load_failed",
                version=row.version,
                error=str(exc),
                serving=self.current.version if self.current else None,
            )
            return self.current
        self.refused = None
        previous = self.current
        card = loaded.card
        self.current = LoadedModel(
            row.id,
            row.version,
            engine,
            card.preprocessing,
            tuple(card.classes),
            dict(card.thresholds),
            card.gate,
            card.findings,
        )
        if previous is not None:
            self.retired.append(previous.engine)  # a batch prepared for it may still be pending
        self.metrics.model_loaded(row.version, engine.name)
        log.info(
            "model.loaded",
            version=row.version,
            backend=engine.name,
            previous=previous.version if previous else None,
        )
        return self.current

    def close_retired(self) -> None:
        """Close the engines replaced so far (the caller has no batch left that uses them)."""
        while self.retired:
            self.retired.pop().close()

    def close(self) -> None:
        """Close every engine, the served one too; the slot is empty afterwards."""
        self.close_retired()
        if self.current is not None:
            self.current.engine.close()
            self.current = None
