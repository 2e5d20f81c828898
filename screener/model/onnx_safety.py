"""Refuse ONNX graphs whose tensors would make the inference engine read files outside the model directory.

An ONNX tensor may keep its bytes in a separate file: ``data_location = EXTERNAL`` and an ``external_data``
entry ``location`` naming the file relative to the graph's directory (ONNX IR, ``onnx/onnx.proto``,
``TensorProto.external_data``; docs/ExternalData.md). ONNX Runtime follows that path when it builds a
session, so a graph whose card digests match could still pull ``../../etc/passwd`` or ``/dev/zero`` into
its weights. :func:`check_model_onnx_files` parses every ``*.onnx`` file a card lists WITHOUT loading
external data and demands that every such location is a relative path that resolves inside the model
directory to a regular file the card lists (so its sha256 was checked too).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from screener.core.errors import ModelError


def check_model_onnx_files(model_dir: Path, files: Mapping[str, str]) -> None:
    """Check every ``.onnx`` file named in ``files`` (a card's file -> sha256 map) under ``model_dir``.

    Raises :class:`ModelError` naming the graph, the tensor and the location when a graph is not a valid
    ONNX protobuf or any of its tensors keeps data outside the directory or in a file the card does not list.
    """
    for name in sorted(files):
        if name.endswith(".onnx"):
            check_onnx_external_data(model_dir / name, model_dir, listed=frozenset(files))


def check_onnx_external_data(onnx_path: Path, model_dir: Path, *, listed: frozenset[str]) -> None:
    """Parse ``onnx_path`` (external data NOT loaded) and check each tensor's external-data location.

    A location must be a non-empty relative path without ``..``, resolve (symbolic links followed) to a
    regular file inside ``model_dir``, and be one of the ``listed`` file names. Raises :class:`ModelError`.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"{onnx_path.name} in {model_dir} is not a valid ONNX model ({type(exc).__name__}: {exc}); "
            "restore a trusted copy or train it again (`trainer train`)"
        ) from None
    root = model_dir.resolve()
    for tensor in _all_tensors(model):
        entries = {str(e.key): str(e.value) for e in tensor.external_data}
        if int(tensor.data_location) != onnx.TensorProto.EXTERNAL and not entries:
            continue
        where = f"{onnx_path.name}: tensor {str(tensor.name)!r} keeps its data in external file"
        location = entries.get("location", "")
        problem = _location_problem(location, root, listed)
        if problem:
            raise ModelError(
                f"{where} {location!r}, which {problem}: refused, a model may only read files inside its "
                f"own directory {model_dir} that its card lists; restore a trusted copy or train it again "
                "(`trainer train`)"
            )
        for key in ("offset", "length"):
            value = entries.get(key)
            if value is not None and not value.isdigit():
                raise ModelError(f"{where} {location!r} with {key} {value!r}: must be a non-negative integer")


def _location_problem(location: str, root: Path, listed: frozenset[str]) -> str:
    """Why ``location`` is unacceptable, or "" when it names a listed regular file inside ``root``."""
    if not location:
        return "is empty"
    if "\x00" in location:
        return "contains a NUL character"
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or location.startswith(("/", "\\")):
        return "is an absolute path, outside the model directory"
    if ".." in posix.parts or ".." in windows.parts:
        return "climbs out with '..', outside the model directory"
    target = (root / location).resolve()
    if not target.is_relative_to(root):
        return "resolves (through a symbolic link) outside the model directory"
    if not target.is_file():
        return "is not a regular file in the model directory"
    if target.relative_to(root).as_posix() not in listed:
        return "is not listed on the model card, so its sha256 is not checked"
    return ""


def _all_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of the model: initializers, sparse initializers, constants, subgraphs, functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)
