"""External tensor data: checked before any byte is read, written to a fresh file.

The checks cover the path-traversal and out-of-bounds classes behind onnx's external-data CVEs:
the location must be a plain relative path inside the model's directory, not a symlink or hard
link, and offset/length must lie inside the file and match the tensor's declared size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo

from onnxprune.errors import InputError

_FIXED_SIZE_BYTES = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1,
}


def _external_tensors(model: onnx.ModelProto):
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t


def check_location(base: Path, tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    """Validate one tensor's external reference; returns (file, offset, length)."""
    info = ExternalDataInfo(tensor)
    where = f"tensor {tensor.name}: external data"
    location = info.location or ""
    rel = Path(location)
    if not location or rel.is_absolute() or location.startswith(("/", "\\")) or ".." in rel.parts:
        raise InputError(f"{where} location {location!r} is not a plain relative path")
    file = base / rel
    if file.is_symlink() or any(p.is_symlink() for p in file.parents if p != base and base in p.parents):
        raise InputError(f"{where} location {location!r} is a symbolic link")
    try:
        resolved = file.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise InputError(f"{where} file {location!r} not found") from None
    if base.resolve() not in resolved.parents:
        raise InputError(f"{where} location {location!r} points outside the model directory")
    stat = resolved.stat()
    if not resolved.is_file():
        raise InputError(f"{where} location {location!r} is not a regular file")
    if stat.st_nlink > 1:
        raise InputError(f"{where} file {location!r} has hard links")
    offset = int(info.offset or 0)
    numel = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    expected = numel * _FIXED_SIZE_BYTES.get(tensor.data_type, 0)
    length = int(info.length) if info.length is not None else expected
    if offset < 0 or length < 0 or offset + length > stat.st_size:
        raise InputError(f"{where} offset/length ({offset}+{length}) beyond the end of {location!r}")
    if expected and length != expected:
        raise InputError(f"{where} length {length} does not match the tensor size ({expected} bytes)")
    return resolved, offset, length


def load_external_tensors(model: onnx.ModelProto, base: Path) -> None:
    """Check every external reference first, then read the bytes into the tensors."""
    tensors = list(_external_tensors(model))
    checked = [(t, *check_location(base, t)) for t in tensors]
    for tensor, file, offset, length in checked:
        with open(file, "rb") as fh:
            fh.seek(offset)
            tensor.raw_data = fh.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def write_external(model: onnx.ModelProto, model_path: Path, data_path: Path, data_name: str) -> None:
    """Write initializers above 1 KiB to `data_path` (referenced as `data_name`), then the model.

    The model proto is modified in place only for the duration of the write.
    """
    moved: list[tuple[onnx.TensorProto, bytes]] = []
    try:
        with open(data_path, "wb") as data:
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
                    continue
                offset = data.tell()
                pad = (-offset) % 4096
                data.write(b"\0" * pad)
                offset += pad
                payload = tensor.raw_data
                data.write(payload)
                moved.append((tensor, payload))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(payload)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
            data.flush()
            os.fsync(data.fileno())
        with open(model_path, "wb") as fh:
            fh.write(model.SerializeToString(deterministic=True))
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        for tensor, payload in moved:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = payload
