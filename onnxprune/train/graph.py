"""`TrainableGraph`: an ONNX graph run by a small interpreter on torch functional ops.

Every float initializer becomes one `torch.nn.Parameter` keyed by its initializer name, so a tensor
read by several nodes (a bias shared through `Identity`) is one trainable tensor, and `to_onnx()`
writes values back into a copy of the very same graph: only initializer payloads change. Nodes run
in graph order through the op registry in `onnxprune.train.ops`; a node without a training rule is
refused at construction, never treated as a constant.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, numpy_helper

from onnxprune.errors import InputError
from onnxprune.train.ops import TORCH_OPS, Node, torch_dtype

_FLOATS = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_DEFAULT_DOMAINS = ("", "ai.onnx")
ROLES = ("param", "bn_param", "bn_stat", "constant")
"""`constant`: a float initializer of at most one element (an epsilon, the 0.5 of a decomposed
Gelu, an attention scale); trained only when asked for by name."""


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every graph nested in its nodes' attributes, outermost first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraphs(g)


def _untrainable(graph: onnx.GraphProto) -> list[str]:
    """'node (op)' for every node, nested ones included, that has no training rule."""
    missing = []
    for g in _subgraphs(graph):
        for node in g.node:
            if node.domain not in _DEFAULT_DOMAINS:
                missing.append(f"{node.name or node.output[0]} ({node.domain}::{node.op_type})")
            elif node.op_type not in TORCH_OPS:
                missing.append(f"{node.name or node.output[0]} ({node.op_type})")
    return missing


def _tensor(proto: TensorProto) -> torch.Tensor:
    if proto.data_type == TensorProto.BFLOAT16:
        bits = numpy_helper.to_array(proto).view(np.uint16).astype(np.int32) << 16
        return torch.from_numpy(bits.view(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(numpy_helper.to_array(proto)))


def _attr(attr: AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(attr)
    if attr.type == AttributeProto.TENSOR:
        return _tensor(value)
    if attr.type == AttributeProto.STRING:
        return value.decode()
    if attr.type == AttributeProto.STRINGS:
        return [v.decode() for v in value]
    return value


class _Program:
    """The nodes of one graph (or subgraph), ready to run in order."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.inputs = [v.name for v in graph.input]
        self.outputs = [v.name for v in graph.output]
        self.steps: list[tuple[Node, Any, list[str], list[str]]] = []
        self.fixed: dict[str, torch.Tensor] = {}
        for i, proto in enumerate(graph.node):
            attrs, subgraphs = {}, {}
            for a in proto.attribute:
                if a.type == AttributeProto.GRAPH:
                    subgraphs[a.name] = _Program(a.g, opset)
                else:
                    attrs[a.name] = _attr(a)
            node = Node(proto.name or f"{proto.op_type}_{i}", proto.op_type, opset, attrs,
                        len([o for o in proto.output if o]), subgraphs)
            if proto.op_type == "Constant":  # no inputs, never trainable: evaluated once, here
                self.fixed[proto.output[0]] = TORCH_OPS["Constant"].fn(node)
            else:
                self.steps.append((node, TORCH_OPS[proto.op_type], list(proto.input), list(proto.output)))

    def execute(self, env: dict[str, torch.Tensor]) -> None:
        """Run every node, adding its outputs to `env`."""
        env.update(self.fixed)
        for node, rule, input_names, output_names in self.steps:
            args = [env[n] if n else None for n in input_names]
            try:
                result = rule.fn(node, *args, scope=env) if rule.scoped else rule.fn(node, *args)
            except InputError:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
                message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise node.error(f"failed in torch: {message}") from exc
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(output_names, results):
                if name:
                    env[name] = value

    def run(self, scope: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run as a subgraph: outer-scope values visible, `inputs` bound to the graph inputs."""
        env = dict(scope)
        env.update(zip(self.inputs, inputs))
        self.execute(env)
        return [env[name] for name in self.outputs]


class TrainableGraph:
    """An ONNX model as a differentiable torch function of its float initializers.

    `g(feeds, capture=())` returns the graph outputs (and the captured intermediate tensors) by
    name; `parameters()` yields the tensors that currently require gradients, for an optimizer;
    `to_onnx()` returns the model with the trained values written back.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        if any(t.data_location == TensorProto.EXTERNAL for g in _subgraphs(model.graph) for t in g.initializer):
            raise InputError("the model refers to external data: load it with onnxprune.ir.load_model first")
        missing = _untrainable(model.graph)
        if missing:
            ops = sorted({m[m.rindex("(") + 1:-1] for m in missing})
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise InputError(f"no training rule for op(s) {', '.join(ops)}: nodes {shown}")
        self._model = onnx.ModelProto()
        self._model.CopyFrom(model)
        opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)
        self.parameters_by_name: dict[str, torch.nn.Parameter] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._constants: dict[str, torch.Tensor] = {}
        for g in _subgraphs(model.graph):
            for init in g.initializer:
                self._add_initializer(init)
        self.roles = self._roles(model.graph)
        self._program = _Program(model.graph, opset)
        self.inputs = [n for n in self._program.inputs if n not in self.parameters_by_name and n not in self._constants]
        self.outputs = list(self._program.outputs)
        self.set_trainable(n for n, role in self.roles.items() if role in ("param", "bn_param"))

    def _add_initializer(self, init: TensorProto) -> None:
        value = _tensor(init)
        if init.data_type in _FLOATS:
            self._dtypes[init.name] = value.dtype
            master = value.double() if value.dtype == torch.float64 else value.float()  # fp16/bf16: fp32 master copy
            self.parameters_by_name[init.name] = torch.nn.Parameter(master.clone())
        else:
            self._constants[init.name] = value

    def _roles(self, graph: onnx.GraphProto) -> dict[str, str]:
        roles = {n: ("constant" if p.numel() <= 1 else "param") for n, p in self.parameters_by_name.items()}
        for g in _subgraphs(graph):
            for node in g.node:
                if node.op_type == "BatchNormalization":
                    for i, name in enumerate(node.input[1:5], start=1):
                        if name in roles:
                            roles[name] = "bn_param" if i <= 2 else "bn_stat"
        return roles

    def set_trainable(self, names: Iterable[str]) -> None:
        """Gradients only for these initializers (by name); every other one is held constant."""
        chosen = set(names)
        unknown = sorted(chosen - set(self.parameters_by_name))
        if unknown:
            raise InputError(f"not float initializers of the model: {', '.join(unknown[:5])}")
        for name, param in self.parameters_by_name.items():
            param.requires_grad_(name in chosen)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The tensors that currently require gradients."""
        return (p for p in self.parameters_by_name.values() if p.requires_grad)

    def __call__(self, feeds: Mapping[str, Any], capture: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self._constants)
        for name, param in self.parameters_by_name.items():
            env[name] = param.to(self._dtypes[name])
        for name, value in feeds.items():
            env[name] = value if isinstance(value, torch.Tensor) else _feed_tensor(value)
        absent = [n for n in self.inputs if n not in feeds]
        if absent:
            raise InputError(f"missing model input(s): {', '.join(absent)}")
        self._program.execute(env)
        unknown = [n for n in capture if n not in env]
        if unknown:
            raise InputError(f"no tensor named {', '.join(unknown)} in the graph")
        return {name: env[name] for name in [*self.outputs, *capture]}

    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the input model whose float initializers hold the current values, stored in the
        same form (raw bytes or typed field) and dtype as before; nothing else differs."""
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        for g in _subgraphs(model.graph):
            for init in g.initializer:
                if init.name in self.parameters_by_name:
                    _write_back(init, self.parameters_by_name[init.name].detach().to(self._dtypes[init.name]))
        return model


def _write_back(init: TensorProto, value: torch.Tensor) -> None:
    value = value.cpu().contiguous()
    if value.dtype in (torch.float16, torch.bfloat16):
        bits = value.view(torch.int16).numpy().view(np.uint16)
        if init.HasField("raw_data"):
            init.raw_data = bits.tobytes()
        else:
            del init.int32_data[:]
            init.int32_data.extend(bits.ravel().astype(np.int32).tolist())
        return
    array = value.numpy()
    if init.HasField("raw_data"):
        init.raw_data = array.astype(array.dtype.newbyteorder("<")).tobytes()
    elif init.data_type == TensorProto.DOUBLE:
        del init.double_data[:]
        init.double_data.extend(array.ravel().tolist())
    else:
        del init.float_data[:]
        init.float_data.extend(array.ravel().tolist())


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def max_relative_error(model: "onnx.ModelProto | TrainableGraph", feeds: Mapping[str, Any]) -> float:
    """Largest difference between torch and ONNX Runtime outputs (optimisations off), relative to the
    largest magnitude of the ONNX Runtime output, over all outputs. A `TrainableGraph` is compared
    with ONNX Runtime running its `to_onnx()` model."""
    from onnxprune.verify import session

    graph = model if isinstance(model, TrainableGraph) else TrainableGraph(model)
    proto = graph.to_onnx() if isinstance(model, TrainableGraph) else model
    arrays = {k: _numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        ours = graph(arrays)
    expected = session(proto).run(graph.outputs, arrays)
    worst = 0.0
    for name, ref in zip(graph.outputs, expected):
        got = _numpy(ours[name]).astype(np.float64)
        ref = np.asarray(ref).astype(np.float64)
        if got.shape != ref.shape:
            return float("inf")
        if ref.size:
            scale = max(float(np.max(np.abs(ref))), 1e-12)
            worst = max(worst, float(np.max(np.abs(got - ref))) / scale)
    return worst


def _feed_tensor(value: Any) -> "torch.Tensor":
    """A feed as a tensor sharing its memory, copied only when read-only (Parquet and memory-mapped
    batches): torch would otherwise warn that writing through the tensor is undefined."""
    array = np.asarray(value)
    return torch.from_numpy(array if array.flags.writeable else array.copy())
