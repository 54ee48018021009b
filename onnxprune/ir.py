"""Loading a model into the onnx-graphsurgeon IR and writing it back, unchanged where untouched.

Only this module converts between `onnx.ModelProto` and `gs.Graph`. It keeps the model-level
fields (ir_version, opset imports, producer, metadata) so that a prune touches nothing but the
channels it removes, and it writes files atomically so a failed run never leaves a partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxprune.errors import InputError
from onnxprune.streaming import read_model_file, serialized_size, without_fields, write_model_file

if TYPE_CHECKING:
    from onnxprune.static_shapes import ProbeRuns

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


def load_model(source: "str | os.PathLike[str] | onnx.ModelProto",
               raw_sizes: "list[int | None] | None" = None) -> onnx.ModelProto:
    """Read a model from a path (external data included) or pass a ModelProto through.

    Every failure becomes a one-line `InputError` naming the file. `raw_sizes` collects the payload
    sizes the file reader saw (see `read_model_file`), for `check_model` to use instead of
    copying every payload again; it stays empty for a ModelProto.
    """
    from onnxprune.validate import check_loaded, check_no_external_refs, check_source_file

    if isinstance(source, onnx.ModelProto):
        check_loaded(source, "model")
        check_no_external_refs(source)
        return source
    path = Path(source)
    check_source_file(path)
    try:
        model = read_model_file(path, raw_sizes)  # tensor by tensor: never the file bytes and the model at once
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    check_loaded(model, str(path))
    from onnxprune.external_data import load_external_tensors

    if raw_sizes is not None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raw_sizes.clear()  # payloads read from data files replace what the reader measured
    try:
        load_external_tensors(model, path.parent)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return model


def check_model(model: onnx.ModelProto, full_check: bool = False, payloads: bool = True,
                raw_sizes: "list[int | None] | None" = None) -> None:
    """`onnx.checker.check_model`, run by path on a weight-free copy of the model.

    Checking a proto in memory serialises it (a full copy of the weights) and fails above 2 GB;
    the copy written here has its payloads replaced by references to an empty data file.
    Raises what the checker raises; `payloads=False` skips checking raw_data sizes (for models
    whose tensors were all read from a checked input or built by onnxprune); `raw_sizes` are the
    sizes `load_model` collected for this model, used instead of re-reading the payloads.
    """
    from onnxprune.streaming import check_by_path

    check_by_path(model, full_check, payloads, raw_sizes)


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise InputError("model imports no default-domain (ai.onnx) opset")


def infer_shapes(model: onnx.ModelProto, resolve: bool = False, probes: "ProbeRuns | None" = None
                 ) -> dict[str, tuple[int, tuple]]:
    """Shape inference on a weight-free skeleton: {tensor name: (elem_type, dims)}.

    Large initializer payloads are left out of the copy so inference costs no extra weight memory.
    Dims are ints, or strings for symbolic dims, or None when unknown. With `resolve`, dims are
    pinned by probe runs (`static_shapes`); `probes` lets a later call reuse the executed ones.
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
    inferred, propagated = _infer(skeleton)
    from onnxprune.ops.control_flow import loop_output_infos

    shaped = {v.name for v in inferred.graph.value_info if v.type.tensor_type.HasField("shape")}
    loop_outputs = loop_output_infos(inferred.graph, shaped)
    if loop_outputs:  # once more, seeded with the Loop outputs inference left shapeless
        skeleton.graph.value_info.extend(loop_outputs)
        inferred, propagated = _infer(skeleton)
    shapes: dict[str, tuple[int, tuple]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output) \
            + _subgraph_value_info(inferred.graph):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        shapes[vi.name] = (tt.elem_type, dims)
    if resolve:  # pin dims that run-time shape arithmetic hides from symbolic inference
        from onnxprune.static_shapes import resolve_dims

        shapes = resolve_dims(skeleton, shapes, model, probes, propagated)
    return shapes


def _infer(skeleton: onnx.ModelProto) -> tuple[onnx.ModelProto, "onnx.ModelProto | None"]:
    """(inferred model, the same if data propagation worked else None); the skeleton itself when
    inference fails altogether."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
        return inferred, inferred
    except Exception:
        try:
            return onnx.shape_inference.infer_shapes(skeleton), None
        except Exception:
            return skeleton, None


def _subgraph_value_info(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Inferred shapes inside Loop/Scan/If bodies (the analysis walks Loop and Scan bodies)."""
    # inference refines body I/O too
    return [vi for sub in nested_graphs(graph) for vi in (*sub.value_info, *sub.input, *sub.output)]


def nested_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every graph held by a node attribute of `graph` (Loop/Scan bodies, If branches), at any
    depth, each before the graphs nested in it."""
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                yield sub
                yield from nested_graphs(sub)


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


def to_graph(model: onnx.ModelProto, probes: "ProbeRuns | None" = None) -> gs.Graph:
    """Import into graphsurgeon with inferred shapes; Constant nodes become initializers.

    `probes` keeps the shape probe's executed runs for the caller's next inference (`folded_graph`).
    """
    shapes = infer_shapes(model, resolve=True, probes=probes)
    graph = gs.import_onnx(model)
    _keep_overridable_initializers(graph, model)
    _constant_nodes_to_initializers(graph)
    from onnxprune.ops.control_flow import all_tensors, bodies

    for _, body in list(bodies(graph)):  # a Loop/Scan body's weights may be Constant nodes
        _constant_nodes_to_initializers(body)

    for name, tensor in all_tensors(graph).items():
        if isinstance(tensor, gs.Variable) and name in shapes:
            elem, dims = shapes[name]
            if tensor.shape is None or any(d is None or isinstance(d, str) for d in tensor.shape):
                if tensor not in graph.inputs and tensor not in graph.outputs:
                    tensor.shape = list(dims)
            if tensor.dtype is None and elem:
                tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    _name_nodes(graph)
    from onnxprune.passes.canonical import canonicalize

    return canonicalize(graph, opset_version(model))


def _name_nodes(graph: gs.Graph) -> None:
    """Give unnamed or duplicate-named nodes a unique "<op>_<index>" name (deterministic).

    ONNX allows empty and repeated node names, but the passes key per-node state (ties, Gram
    matrices, fits) by name; a shared key would crash or silently use another node's data.
    """
    taken = {node.name for node in graph.nodes if node.name}
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        name, k = f"{node.op}_{index}", 0
        while name in taken:
            k += 1
            name = f"{node.op}_{index}_{k}"
        node.name = name
        taken.add(name)
        seen.add(name)


def _keep_overridable_initializers(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Keep initializers that are also graph inputs (defaults a caller may override) among the inputs.

    graphsurgeon drops them from `graph.inputs`; the analysis must see them as inputs (and freeze
    them) and the export must keep the model's interface unchanged.
    """
    inits = {t.name for t in model.graph.initializer}
    if not any(i.name in inits for i in model.graph.input):
        return
    tensors = graph.tensors()
    graph.inputs = [tensors[i.name] for i in model.graph.input if i.name in tensors]


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


def from_graph(graph: gs.Graph, meta: ModelMeta, into: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export with the original model-level fields restored.

    With `into` (the model the graph was imported from, which the caller gives up), the export is
    written into that proto: weights the graph left untouched stay where they are and only sliced
    or new ones are copied, so the weights are never held twice. Without it, a new proto is built.
    """
    from onnxprune.passes.canonical import rejoin_copies

    from onnxprune.ops.control_flow import hoist_shared_initializers

    rejoin_copies(graph)
    if into is None:
        model = gs.export_onnx(graph, do_type_check=False)
    else:
        _export_into(graph, into)
        model = into
    hoist_shared_initializers(model.graph)
    meta.apply(model)
    return model


def _lazy_constants(graph: gs.Graph) -> dict[str, gs.Constant]:
    """Constants whose value is still the (undecoded) TensorProto they were imported from."""
    from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

    return {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)
            and isinstance(t._values, LazyValues) and not isinstance(t._values, SparseValues)}


def export_structure(graph: gs.Graph) -> onnx.ModelProto:
    """`gs.export_onnx` with initializers above 256 elements exported as payload-free stand-ins.

    Enough for shape inference and the checker's structural checks, at no weight memory. The
    stand-ins have no data: do not run or save the result.
    """
    from onnx_graphsurgeon.ir.tensor import LazyValues

    lazy = {name: c for name, c in _lazy_constants(graph).items() if _numel(c._values.tensor) > 256}
    full = {name: c._values for name, c in lazy.items()}
    try:
        for name, const in lazy.items():
            const._values = LazyValues(without_fields(full[name].tensor, "raw_data"))
        return gs.export_onnx(graph, do_type_check=False)
    finally:
        for name, const in lazy.items():
            const._values = full[name]


def _numel(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1


def _place(slot: onnx.TensorProto, name: str, lazy: dict[str, gs.Constant], built: dict) -> None:
    """Copy a new or sliced initializer into the model; the graph then reads the copy, so the
    sliced proto is freed at once instead of living alongside it."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    slot.CopyFrom(lazy[name]._values.tensor if name in lazy else built[name])
    slot.name = name
    if name in lazy:
        lazy[name]._values = LazyValues(slot)


def _export_into(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Replace `model`'s graph by `graph`, reusing the initializers the graph still shares with it."""
    lazy = _lazy_constants(graph)
    exported = export_structure(graph)
    built = {t.name: t for t in exported.graph.initializer if t.name not in lazy}
    order = [t.name for t in exported.graph.initializer]
    inits = model.graph.initializer
    placed: set[str] = set()
    for i in reversed(range(len(inits))):
        name = inits[i].name
        if name in lazy and lazy[name]._values.tensor is inits[i] and name not in placed:
            placed.add(name)  # untouched: stays where it is
        elif name in built or name in lazy and name not in placed:
            _place(inits[i], name, lazy, built)
            placed.add(name)
        else:
            del inits[i]
    for name in order:
        if name not in placed:
            _place(inits.add(), name, lazy, built)
    for desc in onnx.GraphProto.DESCRIPTOR.fields:
        if desc.name != "initializer":
            model.graph.ClearField(desc.name)
    model.graph.MergeFrom(without_fields(exported.graph, "initializer"))
    del model.functions[:]
    model.functions.extend(exported.functions)
    model.ClearField("training_info")  # refers to the old graph; the copying export drops it too


def constant_array(const: gs.Constant) -> np.ndarray:
    """The value of a constant without caching it on the graph (`Constant.values` keeps the
    decoded array alive, which would hold every weight twice once all have been read)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

    values = const._values
    if isinstance(values, LazyValues) and not isinstance(values, SparseValues):
        return tensor_to_array(values.tensor)
    return np.asarray(const.values)


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
    # Above the protobuf limit a single file cannot be written: weights go to a data file anyway.
    use_external = bool(external_data) or serialized_size(model) > PROTOBUF_LIMIT - (64 << 20)
    data_name = external_data if isinstance(external_data, str) and external_data else path.name + ".data"
    if use_external and (Path(data_name).name != data_name or data_name in (".", "..", path.name)):
        raise InputError(f"{data_name}: external data path must be a plain file name next to the model")
    tmp_model = tmp_data = backup = None
    try:
        fd, tmp_model = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        _usual_mode(fd)
        os.close(fd)
        if use_external:
            tmp_data = _write_with_external_data(model, Path(tmp_model), directory, data_name)
        else:
            with open(tmp_model, "wb") as fh:
                write_model_file(model, fh)  # tensor by tensor: no second copy of the weights
                fh.flush()
                os.fsync(fh.fileno())
        if tmp_data is not None:
            backup = _link_previous(directory / data_name)
            os.replace(tmp_data, directory / data_name)
        try:
            os.replace(tmp_model, path)
        except OSError:
            if tmp_data is not None:  # the previous model must keep its previous data file
                _restore(directory / data_name, backup)
                backup = None
            raise
        _fsync_dir(directory)
    except OSError as exc:
        raise InputError(f"{path}: cannot write output ({exc.strerror or exc})") from None
    finally:
        for leftover in (tmp_model, tmp_data, backup):
            if leftover is not None and os.path.exists(leftover):
                os.unlink(leftover)


def _read_umask() -> int:
    """The process umask. POSIX can only read it by setting it, which is process-wide: done once,
    at import (single-threaded), never per write where it would race with other threads' files."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _usual_mode(fd: int) -> None:
    """Give a temp file the mode a plain `open` would (0o666 minus the umask): mkstemp's 0o600
    would otherwise make every output private, which breaks CI artifacts and shared volumes."""
    os.fchmod(fd, 0o666 & ~_UMASK)


def _write_with_external_data(model: onnx.ModelProto, tmp_model: Path, directory: Path, data_name: str) -> str:
    """Serialise weights into a fresh temp data file (never appended to an existing one); the model
    refers to the data file's final name. The model proto is not modified."""
    fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=directory)
    _usual_mode(fd)
    try:
        with os.fdopen(fd, "wb") as data, open(tmp_model, "wb") as fh:
            write_model_file(model, fh, data, data_name)
            for handle in (data, fh):
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp_data)
        raise
    return tmp_data


def _link_previous(target: Path) -> str | None:
    """A hard link to the data file about to be replaced, so a failed model rename can put it back."""
    if not target.exists():
        return None
    fd, backup = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
    os.close(fd)
    os.unlink(backup)
    try:
        os.link(target, backup)
    except OSError:  # no hard links on this file system: the old data cannot be kept
        return None
    return backup


def _restore(target: Path, backup: str | None) -> None:
    """Undo a data-file rename: the backup returns, or the new file goes when there was none."""
    try:
        if backup is not None:
            os.replace(backup, target)
        else:
            os.unlink(target)
    except OSError:
        pass


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


def atomic_write_text(path: "str | os.PathLike[str]", text: str) -> None:
    """Write a small text file (report, plan) atomically, UTF-8 encoded; see `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: "str | os.PathLike[str]", data: object) -> None:
    """Write a JSON document (report, plan, table) atomically, indented for people to read."""
    atomic_write_text(path, json.dumps(data, indent=1))


def read_json(path: "str | os.PathLike[str]", what: str) -> object:
    """A JSON file's content, or one line saying why the `what` (plan, latency table) is unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read {what} ({getattr(exc, 'strerror', None) or exc})") from None


def check_document(data: object, fmt: str, version: int, what: str) -> None:
    """Refuse JSON that is not the onnxprune document expected, or of another version, in one line."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise InputError(f"not an onnxprune {what} (missing format field)")
    if data.get("version") != version:
        raise InputError(f"{what} version {data.get('version')} is not supported (expected {version})")


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    """Write a small file (report, statistics, plot) so that readers see the old file or the whole
    new one, never a partial one: temp file in the destination directory (so the rename stays on
    one file system), the mode a plain `open` gives, fsync, rename. A failure leaves no temp file."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"{path}: directory {directory} does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        _usual_mode(fd)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
