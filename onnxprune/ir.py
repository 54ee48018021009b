"""Loading a model into the onnx-graphsurgeon IR and writing it back, unchanged where untouched.

Only this module converts between `onnx.ModelProto` and `gs.Graph`. It keeps the model-level
fields (ir_version, opset imports, producer, metadata) so that a prune touches nothing but the
channels it removes, and it writes files atomically so a failed run never leaves a partial file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxprune.errors import InputError

ModelSource = "str | os.PathLike[str] | onnx.ModelProto"
PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class ModelMeta:
    """Model-level fields that `gs.export_onnx` would otherwise reset."""

    ir_version: int
    opset_import: list[onnx.OperatorSetIdProto]
    producer_name: str
    producer_version: str
    domain: str
    model_version: int
    doc_string: str
    metadata_props: list[onnx.StringStringEntryProto] = field(default_factory=list)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "ModelMeta":
        return cls(
            ir_version=model.ir_version,
            opset_import=[_copy(o) for o in model.opset_import],
            producer_name=model.producer_name,
            producer_version=model.producer_version,
            domain=model.domain,
            model_version=model.model_version,
            doc_string=model.doc_string,
            metadata_props=[_copy(p) for p in model.metadata_props],
        )

    def apply(self, model: onnx.ModelProto) -> None:
        model.ir_version = self.ir_version
        del model.opset_import[:]
        model.opset_import.extend(self.opset_import)
        model.producer_name = self.producer_name
        model.producer_version = self.producer_version
        model.domain = self.domain
        model.model_version = self.model_version
        model.doc_string = self.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(self.metadata_props)


def _copy(msg):
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def load_model(source: "str | os.PathLike[str] | onnx.ModelProto") -> onnx.ModelProto:
    """Read a model from a path (external data included) or pass a ModelProto through.

    Every failure becomes a one-line `InputError` naming the file.
    """
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise InputError(f"{path}: not an ONNX model (no graph)")
    from onnxprune.external_data import load_external_tensors

    load_external_tensors(model, path.parent)
    return model


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InputError("model imports no default-domain (ai.onnx) opset")


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, tuple]]:
    """Shape inference on a weight-free skeleton: {tensor name: (elem_type, dims)}.

    Large initializer payloads are left out of the copy so inference costs no extra weight memory.
    Dims are ints, or strings for symbolic dims, or None when unknown.
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        graph.initializer.append(_shape_only(init))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton)
        except Exception:
            inferred = skeleton
    shapes: dict[str, tuple[int, tuple]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        shapes[vi.name] = (tt.elem_type, dims)
    return shapes


def _shape_only(init: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of an initializer; payloads above 1 KiB become zeros-free stubs of the right dims."""
    numel = int(np.prod(init.dims)) if len(init.dims) else 1
    if numel <= 256 or init.data_type not in _STRIPPABLE:
        return init
    stub = onnx.TensorProto()
    stub.name = init.name
    stub.data_type = init.data_type
    stub.dims.extend(init.dims)
    stub.raw_data = b""  # inference reads dims and type only
    return stub


_STRIPPABLE = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
}


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into graphsurgeon with inferred shapes; Constant nodes become initializers."""
    shapes = infer_shapes(model)
    graph = gs.import_onnx(model)
    _constant_nodes_to_initializers(graph)
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and name in shapes:
            elem, dims = shapes[name]
            if tensor.shape is None or any(d is None or isinstance(d, str) for d in tensor.shape):
                if tensor not in graph.inputs and tensor not in graph.outputs:
                    tensor.shape = list(dims)
            if tensor.dtype is None and elem:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    return graph


def _constant_nodes_to_initializers(graph: gs.Graph) -> None:
    """Turn `Constant` nodes with a tensor value into initializers so rules can slice them."""
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.outputs) != 1 or "value" not in node.attrs:
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        value = node.attrs["value"]
        const = gs.Constant(out.name, value.values if hasattr(value, "values") else value)
        for consumer in list(out.outputs):
            for i, inp in enumerate(consumer.inputs):
                if inp is out:
                    consumer.inputs[i] = const
        node.outputs.clear()
    graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)


def from_graph(graph: gs.Graph, meta: ModelMeta) -> onnx.ModelProto:
    """Export with the original model-level fields restored."""
    model = gs.export_onnx(graph, do_type_check=False)
    meta.apply(model)
    return model


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """Exact numpy view of an initializer (fp16 stays fp16, bf16 stays bf16)."""
    return numpy_helper.to_array(tensor)


def array_to_tensor(array: np.ndarray, name: str, like: onnx.TensorProto | None = None) -> onnx.TensorProto:
    """Inverse of `tensor_to_array`, keeping the data type of `like`."""
    tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
    if like is not None and tensor.data_type != like.data_type:
        raise InputError(f"initializer {name}: data type changed while slicing")
    return tensor


def save_model(model: onnx.ModelProto, path: "str | os.PathLike[str]", external_data: "bool | str" = False) -> None:
    """Write `model` atomically: temp files in the destination directory, fsync, rename.

    With external data, the data file is renamed into place first and the model last, so a reader
    never sees a model pointing at a missing or partial data file.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"{path}: output directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise InputError(f"{path}: output directory {directory} is not writable")
    use_external = bool(external_data) or model.ByteSize() > PROTOBUF_LIMIT - (64 << 20)
    data_name = external_data if isinstance(external_data, str) and external_data else path.name + ".data"
    if use_external and (Path(data_name).is_absolute() or ".." in Path(data_name).parts):
        raise InputError(f"{data_name}: external data path must be a plain file name next to the model")
    fd, tmp_model = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp_data = None
    try:
        if use_external:
            tmp_data = _write_with_external_data(model, Path(tmp_model), directory, data_name)
        else:
            with open(tmp_model, "wb") as fh:
                fh.write(model.SerializeToString(deterministic=True))
                fh.flush()
                os.fsync(fh.fileno())
        if tmp_data is not None:
            os.replace(tmp_data, directory / data_name)
        os.replace(tmp_model, path)
        _fsync_dir(directory)
    except OSError as exc:
        raise InputError(f"{path}: cannot write output ({exc.strerror or exc})") from None
    finally:
        for leftover in (tmp_model, tmp_data):
            if leftover is not None and os.path.exists(leftover):
                os.unlink(leftover)


def _write_with_external_data(model: onnx.ModelProto, tmp_model: Path, directory: Path, data_name: str) -> str:
    """Serialise weights into a fresh temp data file; the model refers to its final name."""
    from onnxprune.external_data import write_external

    fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    write_external(model, tmp_model, Path(tmp_data), data_name)
    return tmp_data


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (report, plan) through a temp file and a rename."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"{path}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
