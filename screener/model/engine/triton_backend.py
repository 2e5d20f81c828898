"""Triton backend: the model runs on an NVIDIA Triton Inference Server that many workers share.

The engine never assumes which model Triton serves. Before the first batch, and again after every fault,
it checks through the client that the entry ``inference.triton.model_name`` has the Triton version
derived from this model's card (:func:`screener.model.triton_repo.triton_version`) ready, that
``config.pbtxt`` lists this card's sha256, graph sha256 and version name for it, and that the served
inputs and outputs are the card's. Every request names that version, so a Triton that also serves the
next version (a roll in progress) answers with the one the worker verified.

Each batch goes as one request with binary tensors (gRPC raw contents, HTTP binary extension), or through
system shared memory with ``inference.triton.shared_memory`` when Triton runs on the worker's host.
Outputs come back under the graph's names and are mapped exactly as the local engines map them.

Faults (Triton unreachable, the model not loaded, a request past ``request_timeout_seconds``) raise
:class:`~screener.core.errors.RemoteEngineError`: the worker releases the batch and backs off. A Triton
that serves another model raises :class:`~screener.core.errors.ServedModelMismatchError` at load.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

import numpy as np

from screener.core.config import TritonConfig
from screener.core.errors import EngineUnavailableError, RemoteEngineError, ServedModelMismatchError
from screener.core.logs import get_logger
from screener.model.engine.base import EngineOutput, FloatArray, as_output, check_batch, concat_outputs
from screener.model.modelcard import CARD_FILE, ONNX_FILE, LoadedModel, sha256_file
from screener.model.triton_repo import (
    CARD_SHA_KEY,
    INPUT_NAME,
    ONNX_SHA_KEY,
    VERSION_KEY,
    output_names,
    parameter_key,
    triton_version,
)

log = get_logger("screener.engine.triton")


def _client_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a client call raises for a fault of the server or the network."""
    from tritonclient.utils import InferenceServerException

    errors: list[type[BaseException]] = [InferenceServerException, OSError, TimeoutError]
    try:
        import gevent

        errors.append(gevent.Timeout)  # a BaseException: the HTTP client's network timeout
    except ImportError:
        pass
    return tuple(errors)


class _Client:
    """The few calls the engine makes, the same for gRPC and HTTP; answers as plain JSON-like dicts."""

    def __init__(self, settings: TritonConfig) -> None:
        self.protocol = settings.protocol
        self._connect = settings.connect_timeout_seconds
        self._request = settings.request_timeout_seconds
        self.lib: Any
        if settings.protocol == "grpc":
            import tritonclient.grpc as lib

            self.lib = lib
            self.client: Any = lib.InferenceServerClient(url=settings.url)
        else:
            import tritonclient.http as lib

            self.lib = lib
            self.client = lib.InferenceServerClient(
                url=settings.url,
                connection_timeout=settings.connect_timeout_seconds,
                network_timeout=settings.request_timeout_seconds,
            )

    def _check_kwargs(self) -> dict[str, Any]:
        return {"client_timeout": self._connect} if self.protocol == "grpc" else {}

    def live(self) -> bool:
        return bool(self.client.is_server_live(**self._check_kwargs()))

    def ready(self, name: str, version: int) -> bool:
        return bool(self.client.is_model_ready(name, str(version), **self._check_kwargs()))

    def metadata(self, name: str, version: int | None = None) -> dict[str, Any]:
        ver = "" if version is None else str(version)
        if self.protocol == "grpc":
            return dict(self.client.get_model_metadata(name, ver, as_json=True, **self._check_kwargs()))
        return dict(self.client.get_model_metadata(name, ver))

    def config(self, name: str) -> dict[str, Any]:
        if self.protocol == "grpc":
            answer = self.client.get_model_config(name, as_json=True, **self._check_kwargs())
            return dict(answer.get("config", {}))
        return dict(self.client.get_model_config(name))

    def register_shm(self, region: str, key: str, size: int) -> None:
        with contextlib.suppress(*_client_errors()):  # not registered (a fresh or restarted Triton)
            self.client.unregister_system_shared_memory(region)
        self.client.register_system_shared_memory(region, key, size)

    def unregister_shm(self, region: str) -> None:
        self.client.unregister_system_shared_memory(region)

    def infer(
        self,
        name: str,
        version: int,
        batch: FloatArray,
        outputs: tuple[str, ...],
        shm: tuple[str, int] | None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        lib = self.lib
        inp = lib.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        if shm is not None:
            inp.set_shared_memory(shm[0], shm[1])
        elif self.protocol == "grpc":
            inp.set_data_from_numpy(batch)
        else:
            inp.set_data_from_numpy(batch, binary_data=True)
        if self.protocol == "grpc":
            wanted = [lib.InferRequestedOutput(o) for o in outputs]
            result = self.client.infer(
                name, [inp], model_version=str(version), outputs=wanted, client_timeout=self._request
            )
        else:
            wanted = [lib.InferRequestedOutput(o, binary_data=True) for o in outputs]
            result = self.client.infer(name, [inp], model_version=str(version), outputs=wanted)
        return {o: result.as_numpy(o) for o in outputs}

    def close(self) -> None:
        self.client.close()


class TritonEngine:
    """Sends batches to Triton's ``settings.model_name`` at the version derived from ``model``'s card.

    ``max_batch`` bounds one request (and the shared-memory region); a batch larger than the served
    entry's ``max_batch_size`` is split into requests Triton accepts. Construction verifies the served
    model (see the module docstring): it raises :class:`ServedModelMismatchError` when Triton serves
    another model, :class:`RemoteEngineError` when Triton cannot be reached or has not loaded the model,
    and :class:`EngineUnavailableError` when ``tritonclient`` is not installed.
    """

    name = "triton"

    def __init__(self, model: LoadedModel, settings: TritonConfig, *, max_batch: int = 32) -> None:
        try:
            import tritonclient.utils  # noqa: F401
        except ImportError as exc:
            raise EngineUnavailableError(
                "inference.backend = triton needs tritonclient: pip install 'cxr-screener[triton]'"
            ) from exc
        self.settings = settings
        self.card = model.card
        self.card_sha256 = sha256_file(model.path / CARD_FILE)
        self.version = triton_version(self.card_sha256)
        self.model_name = settings.model_name
        self.where = f"Triton at {settings.url} ({settings.protocol})"
        self._outputs = output_names(model.card)
        self._size = model.card.input_size
        self._max_batch = max_batch
        self._served_max_batch = max_batch
        self._errors = _client_errors()
        self._client = _Client(settings)
        self._verified = False
        self._shm: tuple[str, str, Any] | None = None  # (region name, key, handle)
        try:
            self.verify()
        except BaseException:
            self.close()
            raise

    # --- checks ---

    def _fault(self, what: str, exc: BaseException) -> RemoteEngineError:
        self._verified = False
        detail = str(exc).strip() or type(exc).__name__
        return RemoteEngineError(
            f"{self.where}: {what} failed ({detail[:300]}); start Triton or fix inference.triton.url; the "
            "batch stays queued and the worker retries after a back-off"
        )

    def verify(self) -> None:
        """Check that Triton serves exactly this model (see the module docstring); raises as documented."""
        name, version = self.model_name, self.version
        try:
            if not self._client.live():
                raise RemoteEngineError(f"{self.where} is not live yet; the worker retries after a back-off")
            ready = self._client.ready(name, version)
        except self._errors as exc:
            raise self._fault("the readiness check", exc) from exc
        if not ready:
            try:
                served = [str(v) for v in self._client.metadata(name).get("versions", [])]
            except self._errors:
                served = []
            if served:
                raise ServedModelMismatchError(
                    f"{self.where} serves {name} version(s) {', '.join(served)}, not version {version} "
                    f"(card sha256 {self.card_sha256[:12]}) of the registered model {self.card.version}: "
                    f"export it with `screener models export-triton {self.card.version} REPO_DIR` into "
                    "Triton's model repository and let Triton load it"
                )
            raise RemoteEngineError(
                f"{self.where} has no ready version of model {name} (not in its repository, unloaded or "
                f"still loading); expected version {version} for model {self.card.version}; the worker "
                "retries after a back-off"
            )
        try:
            config = self._client.config(name)
            meta = self._client.metadata(name, version)
        except self._errors as exc:
            raise self._fault("reading the model config", exc) from exc
        self._check_config(config)
        self._check_metadata(meta)
        served_max = int(config.get("max_batch_size", 0) or 0)
        if served_max < 1:
            raise ServedModelMismatchError(
                f"{self.where}: {name} has max_batch_size {served_max}; export it with "
                "`screener models export-triton` (batched, dynamic batching)"
            )
        self._served_max_batch = min(self._max_batch, served_max)
        if self.settings.shared_memory:
            self._register_shm()
        self._verified = True
        log.info(
            "triton.verified",
            url=self.settings.url,
            model_name=name,
            triton_version=version,
            version=self.card.version,
            card_sha256=self.card_sha256[:12],
            max_batch=self._served_max_batch,
            shared_memory=self.settings.shared_memory,
        )

    def _check_config(self, config: dict[str, Any]) -> None:
        params = config.get("parameters", {}) or {}

        def param(key: str) -> str | None:
            value = params.get(parameter_key(key, self.version))
            return None if not isinstance(value, dict) else str(value.get("string_value", ""))

        wanted = {
            CARD_SHA_KEY: self.card_sha256,
            ONNX_SHA_KEY: self.card.files[ONNX_FILE],
            VERSION_KEY: self.card.version,
        }
        wrong = {key: param(key) for key, value in wanted.items() if param(key) != value}
        if wrong:
            found = ", ".join(f"{parameter_key(k, self.version)} = {str(v)[:16]!r}" for k, v in wrong.items())
            raise ServedModelMismatchError(
                f"{self.where}: {self.model_name} version {self.version} is not the registered model "
                f"{self.card.version} (card sha256 {self.card_sha256[:12]}): its config.pbtxt has {found}; "
                f"export the registered model with `screener models export-triton {self.card.version} "
                "REPO_DIR` and let Triton reload it"
            )

    def _check_metadata(self, meta: dict[str, Any]) -> None:
        def tensors(key: str) -> dict[str, tuple[str, list[int]]]:
            return {
                str(t["name"]): (str(t.get("datatype", "")), [int(d) for d in t.get("shape", [])])
                for t in meta.get(key, [])
            }

        inputs = tensors("inputs")
        outputs = tensors("outputs")
        size = self._size
        problems = []
        if (
            list(inputs) != [INPUT_NAME]
            or inputs[INPUT_NAME][0] != "FP32"
            or inputs[INPUT_NAME][1][1:]
            != [
                3,
                size,
                size,
            ]
        ):
            problems.append(f"inputs {inputs} are not {INPUT_NAME} FP32 [-1, 3, {size}, {size}]")
        if sorted(outputs) != sorted(self._outputs) or any(t[0] != "FP32" for t in outputs.values()):
            problems.append(f"outputs {sorted(outputs)} are not FP32 {list(self._outputs)}")
        if problems:
            raise ServedModelMismatchError(
                f"{self.where}: {self.model_name} version {self.version} does not match the card of "
                f"{self.card.version}: {'; '.join(problems)}"
            )

    # --- shared memory ---

    def _register_shm(self) -> None:
        import tritonclient.utils.shared_memory as shm

        size = self._served_max_batch * 3 * self._size * self._size * 4
        if self._shm is None:
            region = f"cxr-screener-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            key = "/" + region
            self._shm = (region, key, shm.create_shared_memory_region(region, key, size))
        region, key, _ = self._shm
        try:
            self._client.register_shm(region, key, size)
        except self._errors as exc:
            raise self._fault("registering system shared memory", exc) from exc

    # --- Engine protocol ---

    def infer(self, batch: FloatArray) -> EngineOutput:
        """Classify a float32 ``[N, 3, S, S]`` batch on Triton; raises ``ValueError`` for a malformed batch
        and :class:`RemoteEngineError` for any Triton fault (including, after a fault, a Triton that now
        serves another model)."""
        x = check_batch(batch, self._size)
        if not self._verified:
            try:
                self.verify()
            except ServedModelMismatchError as exc:
                raise RemoteEngineError(str(exc)) from exc
        step = self._served_max_batch
        return concat_outputs([self._infer_chunk(x[i : i + step]) for i in range(0, x.shape[0], step)])

    def _infer_chunk(self, x: FloatArray) -> EngineOutput:
        shm_arg: tuple[str, int] | None = None
        if self._shm is not None:
            import tritonclient.utils.shared_memory as shm

            shm.set_shared_memory_region(self._shm[2], [x])
            shm_arg = (self._shm[0], int(x.nbytes))
        try:
            out = self._client.infer(self.model_name, self.version, x, self._outputs, shm_arg)
        except self._errors as exc:
            raise self._fault(f"inference of a batch of {x.shape[0]}", exc) from exc
        n = x.shape[0]
        classes = len(self.card.classes)
        side = self.card.heatmap.size if self.card.heatmap is not None else 0
        for name, value in out.items():
            expected = {"novelty": (n, 1), "heatmap": (n, side, side)}.get(name, (n, classes))
            allowed = (expected, (n,)) if name == "novelty" else (expected,)
            if value is None or tuple(value.shape) not in allowed:
                self._verified = False
                got = None if value is None else tuple(value.shape)
                raise RemoteEngineError(
                    f"{self.where} answered output {name} with shape {got}, not {expected}"
                )
        return as_output(
            out["probs"], out["probs_a"], out["probs_b"], out.get("novelty"), heatmap=out.get("heatmap")
        )

    def close(self) -> None:
        """Unregister and free the shared-memory region (Triton may be gone), close the client."""
        if self._shm is not None:
            import tritonclient.utils.shared_memory as shm

            region, _, handle = self._shm
            self._shm = None
            with contextlib.suppress(*self._errors):  # Triton gone or restarted: nothing registered there
                self._client.unregister_shm(region)
            shm.destroy_shared_memory_region(handle)
        self._client.close()
