"""Distillation of a real transformer export (tiny random-init BERT, TorchScript exporter): integer
token inputs (`--augment` leaves them alone; `token_swap` alters a share), an embedding-like rank-3
output (MSE by default) and feature matching at layer outputs that pruning left at full size."""

import onnx
import pytest

import onnxprune
from builders import structure

pytest.importorskip("transformers")
pytestmark = pytest.mark.zoo


def test_pruned_bert_distils_with_default_losses_and_layer_matching(tmp_path):
    from transformer_models import example_inputs, export_transformer

    teacher, _ = export_transformer("bert", "legacy", tmp_path / "bert.onnx")
    student = onnxprune.prune(teacher, ratio=0.5, recover="none").model
    teacher_tensors = {o for n in teacher.graph.node for o in n.output}
    layer_outputs = [n.output[0] for n in student.graph.node
                     if n.op_type == "LayerNormalization" and n.output[0] in teacher_tensors][:2]
    assert layer_outputs, "the export has no LayerNormalization output in both graphs"
    data = example_inputs("bert", 48, 10, seed=1)
    result = onnxprune.distill(student, teacher, data, epochs=2, lr=1e-4, augment=True, token_swap=0.15,
                               match=layer_outputs, quiet=True)
    h = result.history
    assert h.losses["y"] == "mse" and all(h.losses[t] == "mse (matched tensor)" for t in layer_outputs)
    assert all(f"match:{t}" in h.epochs[0].parts for t in layer_outputs)
    assert h.after["loss"] <= h.before["loss"]
    assert h.torch_vs_ort_max_rel <= 1e-4
    assert structure(result.model) == structure(student)
    onnx.checker.check_model(result.model, full_check=True)
