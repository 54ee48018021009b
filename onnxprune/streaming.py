"""Reading and writing ONNX files one tensor at a time, so that no step holds the model twice.

`onnx.load` reads the whole file into a bytes object and then parses it (two copies of every
weight at the peak); `SerializeToString` builds the whole file in memory before writing it. Both
are avoidable because protobuf parsers *merge* repeated occurrences of a message field: a file may
carry the graph as several `graph` fields (one with the nodes, then one per initializer) and every
reader assembles the same model. So we scan the file's field headers and merge it into the model
piece by piece, and write it the same way; the peak is the model plus its largest tensor.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

import onnx

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_LEN = 2
_GRAPH_TAG = bytes([_MODEL_GRAPH << 3 | _LEN])
_INITIALIZER_TAG = bytes([_GRAPH_INITIALIZER << 3 | _LEN])
_RAW_DATA_TAG = bytes([9 << 3 | _LEN])  # TensorProto.raw_data
_BIG = 1 << 16
"""Initializers at least this large are merged one by one; smaller fields are merged in runs."""

EXTERNAL_THRESHOLD = 1024
"""Initializers with at least this many payload bytes go to the external data file."""
_ALIGN = 4096


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | 0x80 if value else low)
        if not value:
            return bytes(out)


def _fields(fd: int, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, header start, payload start, payload end) of each field in [start, end)."""
    pos = start
    while pos < end:
        head = os.pread(fd, 20, pos)
        tag, p = _varint(head, 0)
        wire = tag & 7
        if wire == _LEN:
            size, p = _varint(head, p)
        elif wire == 0:
            size = _varint(head, p)[1] - p
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield tag >> 3, pos, pos + p, pos + p + size
        pos += p + size
    if pos != end:
        raise ValueError("field runs past the end of its message")


def _graph_piece(payload_size: int) -> bytes:
    """Header that wraps graph-field bytes of the given size as a ModelProto `graph` field."""
    return _GRAPH_TAG + _encode_varint(payload_size)


def read_model_file(path: "str | os.PathLike[str]", raw_sizes: "list[int | None] | None" = None
                    ) -> onnx.ModelProto:
    """Parse an ONNX file into a ModelProto (external data not loaded), tensor by tensor.

    Same result as `onnx.load(path, load_external_data=False)`; raises ValueError or a protobuf
    DecodeError on malformed files. With `raw_sizes`, one entry per initializer is appended: the
    raw_data byte count of the large ones, read from the field headers while their bytes are in
    hand (None for the others), so the checker's size check need not copy every payload again.
    """
    model = onnx.ModelProto()
    with open(path, "rb") as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        for field, head, start, end in _fields(fd, 0, size):
            if field != _MODEL_GRAPH:
                model.MergeFromString(os.pread(fd, end - head, head))
                continue
            run: list[int] = []
            for gfield, ghead, gstart, gend in _fields(fd, start, end):
                if gfield == _GRAPH_INITIALIZER and gend - gstart >= _BIG:
                    if run:
                        _merge_run(model, fd, run[0], run[1])
                        run = []
                    raw = _merge_tensor(model, fd, gstart, gend - gstart)
                else:
                    raw = None
                    run = [run[0] if run else ghead, gend]
                if raw_sizes is not None and gfield == _GRAPH_INITIALIZER:
                    raw_sizes.append(raw)
            if run:
                _merge_run(model, fd, run[0], run[1])
            if start == end:
                model.graph.SetInParent()
    return model


def _merge_run(model: onnx.ModelProto, fd: int, start: int, end: int) -> None:
    piece = os.pread(fd, end - start, start)
    if len(piece) != end - start:
        raise ValueError("file is truncated")
    model.MergeFromString(_graph_piece(len(piece)) + piece)


def _merge_tensor(model: onnx.ModelProto, fd: int, start: int, size: int) -> int | None:
    """Append one initializer, parsed from its bytes as read from the file: one copy of the payload
    in flight, and no zero-filled buffer to read into (an extra pass over every weight).
    Returns its raw_data byte count (None without one), taken from the bytes already read."""
    data = os.pread(fd, size, start)
    if len(data) != size:
        raise ValueError("file is truncated")
    model.graph.initializer.add().ParseFromString(data)
    return raw_data_length(data)


def raw_data_length(data: bytes) -> int | None:
    """Byte count of the raw_data field of a serialized TensorProto, from its field headers alone.

    The last occurrence wins, as when protobuf parses the message; None when there is no raw_data
    field or a header is not understood (the caller then measures the parsed tensor instead).
    """
    pos, found = 0, None
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            wire = tag & 7
            if wire == _LEN:
                size, pos = _varint(data, pos)
                if tag >> 3 == 9:
                    found = size
            elif wire == 0:
                size = _varint(data, pos)[1] - pos
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
            else:
                return None
            pos += size
    except ValueError:
        return None
    return found if pos == len(data) else None


def without_fields(message, *names: str):
    """A copy of a protobuf message without the named fields (copies nothing else twice)."""
    out = type(message)()
    for desc in message.DESCRIPTOR.fields:  # not ListFields(): it would copy the skipped payloads
        if desc.name in names:
            continue
        if desc.is_repeated:
            value = getattr(message, desc.name)
            if len(value):
                getattr(out, desc.name).extend(value)
        elif message.HasField(desc.name):
            if desc.message_type is not None:
                getattr(out, desc.name).CopyFrom(getattr(message, desc.name))
            else:
                setattr(out, desc.name, getattr(message, desc.name))
    return out


def payload_size(tensor: onnx.TensorProto) -> int:
    """Bytes in `raw_data`, from dims and type where possible (reading the field copies it)."""
    if not tensor.HasField("raw_data"):
        return 0
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        return len(tensor.raw_data)
    numel = 1
    for dim in tensor.dims:
        numel *= dim
    return (numel * bits + 7) // 8


_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.DOUBLE: 64, onnx.TensorProto.FLOAT16: 16,
         onnx.TensorProto.BFLOAT16: 16, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
         onnx.TensorProto.INT16: 16, onnx.TensorProto.UINT16: 16, onnx.TensorProto.INT32: 32,
         onnx.TensorProto.UINT32: 32, onnx.TensorProto.INT64: 64, onnx.TensorProto.UINT64: 64,
         onnx.TensorProto.BOOL: 8}


def _length_field_size(number: int, size: int) -> int:
    return len(_encode_varint(number << 3 | _LEN)) + len(_encode_varint(size)) + size


def serialized_size(model: onnx.ModelProto) -> int:
    """Exact `model.ByteSize()` without serialising the weights (upb's ByteSize does)."""
    total = without_fields(model, "graph").ByteSize()
    if model.HasField("graph"):
        graph = model.graph
        inner = without_fields(graph, "initializer").ByteSize()
        for tensor in graph.initializer:
            raw = payload_size(tensor)
            size = without_fields(tensor, "raw_data").ByteSize() + (_length_field_size(9, raw) if raw else 0)
            if not raw and tensor.HasField("raw_data"):
                size += 2  # an explicitly empty raw_data field: tag and zero length
            inner += _length_field_size(_GRAPH_INITIALIZER, size)
        total += _length_field_size(_MODEL_GRAPH, inner)
    return total


def write_model_file(model: onnx.ModelProto, fh: BinaryIO, data: BinaryIO | None = None,
                     data_name: str = "") -> None:
    """Write `model` to `fh` one initializer at a time; with `data`, payloads of at least
    EXTERNAL_THRESHOLD bytes go to that (fresh) file, referenced as `data_name`.

    The model is not modified.
    """
    fh.write(without_fields(model, "graph").SerializeToString(deterministic=True))
    if not model.HasField("graph"):
        return
    skeleton = without_fields(model.graph, "initializer").SerializeToString(deterministic=True)
    fh.write(_graph_piece(len(skeleton)) + skeleton)
    for tensor in model.graph.initializer:
        if data is not None and payload_size(tensor) >= EXTERNAL_THRESHOLD:
            tensor = _externalise(tensor, data, data_name)
        if tensor.HasField("raw_data"):  # header fields, then the payload: one copy of it, not two
            payload = tensor.raw_data
            head = without_fields(tensor, "raw_data").SerializeToString(deterministic=True)
            head += _RAW_DATA_TAG + _encode_varint(len(payload))
        else:
            payload, head = b"", tensor.SerializeToString(deterministic=True)
        inner = _INITIALIZER_TAG + _encode_varint(len(head) + len(payload))
        fh.write(_graph_piece(len(inner) + len(head) + len(payload)) + inner + head)
        fh.write(payload)
        del payload


def _externalise(tensor: onnx.TensorProto, data: BinaryIO, data_name: str) -> onnx.TensorProto:
    """Append the payload to `data` (page aligned) and return a reference to it."""
    offset = data.tell()
    pad = (-offset) % _ALIGN
    data.write(b"\0" * pad)
    if isinstance(data, _NullData):
        length = payload_size(tensor)
        data.skip(length)
    else:
        payload = tensor.raw_data
        length = len(payload)
        data.write(payload)
        del payload
    ref = without_fields(tensor, "raw_data", "external_data", "data_location")
    ref.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", str(offset + pad)), ("length", str(length))):
        entry = ref.external_data.add()
        entry.key, entry.value = key, value
    return ref


def check_by_path(model: onnx.ModelProto, full_check: bool = False, payloads: bool = True,
                  raw_sizes: "list[int | None] | None" = None) -> None:
    """Run `onnx.checker.check_model` on a weight-free copy written to a temporary directory.

    Large payloads become references to an empty data file, so the check costs no weight memory
    and works above the 2 GB protobuf limit; it raises what the checker raises. `payloads=False`
    skips the raw_data size check (it reads every payload) for tensors built by onnxprune itself;
    `raw_sizes` (from `read_model_file`) gives the sizes the reader saw, so they are not re-read.
    """
    if payloads:
        _check_payload_sizes(model, raw_sizes)
    with tempfile.TemporaryDirectory(prefix="onnxprune-check-") as tmp:
        directory = Path(tmp)
        (directory / "weights.stub").touch()
        with open(directory / "model.onnx", "wb") as fh:
            write_model_file(model, fh, _NullData(), "weights.stub")
        onnx.checker.check_model(str(directory / "model.onnx"), full_check=full_check)


def _check_payload_sizes(model: onnx.ModelProto, raw_sizes: "list[int | None] | None" = None) -> None:
    """The one check the stand-ins would hide: raw_data must hold exactly dims x type bytes.

    `len(tensor.raw_data)` copies the payload (upb hands out a new bytes object), so sizes the
    reader already measured are used where given; a list that does not line up is ignored.
    """
    initializers = model.graph.initializer
    known = raw_sizes if raw_sizes is not None and len(raw_sizes) == len(initializers) else None
    for index, tensor in enumerate(initializers):
        if tensor.HasField("raw_data") and tensor.data_type in _BITS:
            seen = known[index] if known is not None else None
            actual = seen if seen is not None else len(tensor.raw_data)
            expected = payload_size(tensor)
            if actual != expected:
                raise onnx.checker.ValidationError(
                    f"TensorProto (tensor name: {tensor.name}) raw_data size ({actual} bytes) does not match "
                    f"the declared shape and type ({expected} bytes required).")


class _NullData:
    """A data file that discards payloads but keeps offsets, for weight-free skeletons."""

    def __init__(self) -> None:
        self._offset = 0

    def tell(self) -> int:
        return self._offset

    def write(self, padding: bytes) -> None:
        self._offset += len(padding)

    def skip(self, size: int) -> None:
        self._offset += size
