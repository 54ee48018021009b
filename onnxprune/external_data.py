"""External tensor data: every reference is checked before any byte of any data file is read.

The checks cover the path-traversal and out-of-bounds classes behind onnx's external-data CVEs
(CVE-2022-25882, CVE-2024-27318 and successors): the location must be a plain relative path that
stays inside the model's directory, with no symbolic link on the way and no hard link to the file;
offset and length must be integers inside the file, and the length must equal the tensor's size.
Files are then opened without following links and re-identified (device, inode), so a file swapped
between the check and the read is refused too.
"""

from __future__ import annotations

import os
import stat as stat_mode
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx

from onnxprune.errors import InputError

_BITS_PER_ELEMENT = {
    onnx.TensorProto.FLOAT: 32, onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.FLOAT16: 16,
    onnx.TensorProto.BFLOAT16: 16, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
    onnx.TensorProto.INT16: 16, onnx.TensorProto.UINT16: 16, onnx.TensorProto.INT32: 32,
    onnx.TensorProto.UINT32: 32, onnx.TensorProto.INT64: 64, onnx.TensorProto.UINT64: 64,
    onnx.TensorProto.BOOL: 8, onnx.TensorProto.COMPLEX64: 64, onnx.TensorProto.COMPLEX128: 128,
}
for _name, _bits in (("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8), ("FLOAT8E5M2FNUZ", 8),
                     ("FLOAT8E8M0", 8), ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2)):
    if hasattr(onnx.TensorProto, _name):
        _BITS_PER_ELEMENT[getattr(onnx.TensorProto, _name)] = _bits

_KEYS = {"location", "offset", "length", "checksum", "basepath"}


def payload_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's raw payload must hold (sub-byte types packed); None for variable-size types."""
    bits = _BITS_PER_ELEMENT.get(tensor.data_type)
    if bits is None:
        return None
    numel = 1
    for d in tensor.dims:
        numel *= int(d)
    return (numel * bits + 7) // 8


def all_tensors(model: onnx.ModelProto, initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers (sparse too), node attributes, subgraphs, functions.

    With `initializers=False`, the main graph's dense initializers are left out.
    """
    if initializers:
        yield from model.graph.initializer
    yield from _graph_tensors(model.graph, initializers=False)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto, initializers: bool = True) -> Iterator[onnx.TensorProto]:
    if initializers:
        yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
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
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


@dataclass(frozen=True)
class ExternalRef:
    """A checked reference: which bytes of which file (identified by device and inode) to read."""

    tensor: onnx.TensorProto
    file: Path
    offset: int
    length: int
    device: int
    inode: int


def _entries(tensor: onnx.TensorProto, where: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in _KEYS:
            raise InputError(f"{where}: unknown key {entry.key[:40]!r}")
        if entry.key in entries:
            raise InputError(f"{where}: key {entry.key!r} given twice")
        entries[entry.key] = entry.value
    return entries


def _integer(entries: dict[str, str], key: str, where: str) -> int | None:
    text = entries.get(key)
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise InputError(f"{where}: {key} {text[:40]!r} is not a non-negative integer")
    return int(text)


def _plain_relative(location: str, where: str) -> Path:
    bad = (not location or "\0" in location or "\\" in location or location.startswith("/")
           or Path(location).is_absolute() or ":" in location.split("/")[0])
    parts = Path(location).parts
    if bad or ".." in parts or location in (".", "./"):
        raise InputError(f"{where}: location {location[:200]!r} is not a plain relative path")
    return Path(*parts)


def check_location(base: Path, tensor: onnx.TensorProto) -> ExternalRef:
    """Validate one tensor's external reference without reading the data file."""
    where = f"tensor {tensor.name[:200]!r}: external data"
    entries = _entries(tensor, where)
    location = entries.get("location", "")
    rel = _plain_relative(location, where)
    base = Path(os.path.abspath(base))
    path = base
    for part in rel.parts:  # refuse a link at any step, not only the last
        path = path / part
        if path.is_symlink():
            raise InputError(f"{where}: location {location!r} goes through a symbolic link")
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise InputError(f"{where}: file {location!r} not found next to the model") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot access {location!r} ({exc.strerror})") from None
    if not stat_mode.S_ISREG(info.st_mode):
        raise InputError(f"{where}: location {location!r} is not a regular file")
    if info.st_nlink > 1:
        raise InputError(f"{where}: file {location!r} has {info.st_nlink} hard links")
    offset = _integer(entries, "offset", where) or 0
    if any(d < 0 for d in tensor.dims):
        raise InputError(f"{where}: negative dimension in {list(tensor.dims)}")
    expected = payload_bytes(tensor)
    if expected is None:
        name = onnx.TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in \
            onnx.TensorProto.DataType.values() else str(tensor.data_type)
        raise InputError(f"{where}: data type {name} cannot be stored externally")
    length = _integer(entries, "length", where)
    length = expected if length is None else length
    if offset + length > info.st_size:
        raise InputError(f"{where}: bytes {offset}..{offset + length} lie beyond the end of {location!r} "
                         f"({info.st_size} bytes)")
    if length != expected:
        raise InputError(f"{where}: length {length} does not match the tensor size ({expected} bytes)")
    return ExternalRef(tensor, path, offset, length, info.st_dev, info.st_ino)


def referenced_files(model_path: Path) -> list[Path]:
    """The data files a model file refers to, so an output never overwrites them; [] if unreadable."""
    if not Path(model_path).is_file():  # never open a FIFO or device here; load_model refuses it later
        return []
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # an unreadable model is refused later, with its own message
        return []
    locations = {entry.value for t in all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    return [Path(model_path).parent / loc for loc in sorted(locations) if loc and "\0" not in loc]


def _read(ref: ExternalRef) -> bytes:
    """Read the checked bytes, refusing a file that changed identity since it was checked."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    name = ref.tensor.name
    try:
        fd = os.open(ref.file, flags)
    except OSError as exc:
        raise InputError(f"tensor {name!r}: external data: cannot open {ref.file.name!r} ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (ref.device, ref.inode) or info.st_size < ref.offset + ref.length:
            raise InputError(f"tensor {name!r}: external data: {ref.file.name!r} changed while loading")
        chunks, done = [], 0
        while done < ref.length:
            chunk = os.pread(fd, min(ref.length - done, 1 << 26), ref.offset + done)
            if not chunk:
                raise InputError(f"tensor {name!r}: external data: {ref.file.name!r} ended early")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_external_tensors(model: onnx.ModelProto, base: Path) -> None:
    """Check every external reference of the model first, then read the bytes into the tensors."""
    tensors = [t for t in all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    refs = [check_location(base, t) for t in tensors]
    for ref in refs:
        ref.tensor.raw_data = _read(ref)
        ref.tensor.data_location = onnx.TensorProto.DEFAULT
        del ref.tensor.external_data[:]
