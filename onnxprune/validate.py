"""Input validation at load time: refuse what the passes cannot handle safely, with one clear line.

`load_model` calls `check_source_file` before it reads a byte (so a FIFO or device cannot block or
flood the reader) and `check_loaded` on the parsed proto, before any pass sees it. Graph-level
validity (dangling inputs, cycles, SSA) is left to the ONNX checker in `api`.
"""

from __future__ import annotations

import os
import stat as stat_mode
from pathlib import Path

import onnx

from onnxprune.errors import InputError
from onnxprune.external_data import all_tensors, payload_bytes


def check_source_file(path: Path) -> None:
    """The model path must name a non-empty regular file we can stat."""
    if "\0" in str(path):
        raise InputError(f"{str(path)[:200]!r}: file name contains a NUL byte")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot access ({exc.strerror})") from None
    if stat_mode.S_ISDIR(info.st_mode):
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if not stat_mode.S_ISREG(info.st_mode):
        raise InputError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise InputError(f"{path}: empty file")


def check_loaded(model: onnx.ModelProto, label: str) -> None:
    """Refuse parsed models the IR round trip would damage."""
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise InputError(f"{label}: not an ONNX model (no graph)")
    if model.graph.sparse_initializer:
        name = model.graph.sparse_initializer[0].values.name
        raise InputError(f"{label}: sparse initializer {name!r} is not supported (store it dense)")
    _check_text(model, label)
    for tensor in model.graph.initializer:  # raw payloads here are sized by the checker (streaming)
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
            _check_payload(tensor, label)
    for tensor in all_tensors(model, initializers=False):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            _check_payload(tensor, label)


def _check_text(message, label: str) -> None:
    """Every string field must be valid UTF-8: protobuf hands invalid ones over as bytes, which
    break the IR round trip far from the cause. Tensors are read field by field (never their
    payload, which would be copied)."""
    if isinstance(message, onnx.TensorProto):
        texts = [message.name, message.doc_string] + [t for e in message.external_data for t in (e.key, e.value)]
        for text in texts:
            _utf8(text, "tensor name or external data entry", label)
        return
    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = value if repeated else [value]
        if field.type == field.TYPE_STRING:
            for text in values:
                _utf8(text, f"{type(message).__name__}.{field.name}", label)
        elif field.type == field.TYPE_MESSAGE:
            for sub in values:
                _check_text(sub, label)


def _utf8(text, what: str, label: str) -> None:
    if not isinstance(text, str):
        raise InputError(f"{label}: {what} {bytes(text)[:40]!r} is not valid UTF-8")


_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1), onnx.TensorProto.STRING: ("string_data", 1),
}


def _check_payload(tensor: onnx.TensorProto, label: str) -> None:
    """A payload must hold exactly the elements its dims and type declare: slicing a short one
    would read past its end, and the checker's weight-free copy cannot see payloads."""
    where = f"{label}: tensor {tensor.name!r}"
    if any(d < 0 for d in tensor.dims):
        raise InputError(f"{where} has a negative dimension {list(tensor.dims)}")
    expected = payload_bytes(tensor)
    if tensor.HasField("raw_data"):
        if expected is not None and len(tensor.raw_data) != expected:
            raise InputError(f"{where} holds {len(tensor.raw_data)} bytes, its dims and type need {expected}")
        return
    numel = 1
    for d in tensor.dims:
        numel *= int(d)
    field, per = _TYPED_FIELDS.get(tensor.data_type, ("int32_data", 1))
    if field == "int32_data" and expected is not None and expected < numel:  # 4- and 2-bit types pack
        numel = expected
    stored = len(getattr(tensor, field))
    if stored != numel * per and not (stored == 0 and numel == 0):
        raise InputError(f"{where} holds {stored} values in {field}, its dims need {numel * per}")


def check_shapes_fit(model: onnx.ModelProto, label: str = "invalid model") -> None:
    """Strict shape inference with data propagation on a weight-free copy of the model.

    The checker's full check does not propagate shape values, so a weight that does not fit its
    layer behind a run-time Reshape passes it; a pruned model, carrying the inferred shapes, would
    then fail. `api` runs this when its output check fails, to tell a damaged input (InputError)
    from a bug of ours.
    """
    skeleton = onnx.ModelProto()
    if model.ByteSize() < (64 << 20):
        skeleton.CopyFrom(model)
    else:
        _weight_free(model, skeleton)
    try:
        onnx.shape_inference.infer_shapes(skeleton, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "shape inference failed"
        raise InputError(f"{label}: shapes do not fit together: {first[:300]}") from None


def _weight_free(model: onnx.ModelProto, skeleton: onnx.ModelProto) -> None:
    """Copy everything but large payloads (their dims and types stay; inference needs no values)."""
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    skeleton.graph.node.extend(model.graph.node)
    skeleton.graph.input.extend(model.graph.input)
    skeleton.graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if len(init.raw_data) > 2048:
            stub = skeleton.graph.initializer.add()
            stub.name, stub.data_type = init.name, init.data_type
            stub.dims.extend(init.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", "unused"
        else:
            skeleton.graph.initializer.append(init)


def check_no_external_refs(model: onnx.ModelProto, label: str = "model") -> None:
    """A ModelProto given in memory has no directory to check its external references against:
    reading them would resolve paths against the working directory, unchecked."""
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise InputError(f"{label}: tensor {tensor.name!r} refers to external data; pass the model's file "
                             f"path (its references are checked there) or load the data first")
