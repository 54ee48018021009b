"""Zoo tier: attention models exported with a dynamic batch prune as much as their static twins.

Small configurations of torchvision's ViT and Swin and a bare `nn.MultiheadAttention`, each
exported by the TorchScript exporter (`dynamic_axes`) and the dynamo exporter (`dynamic_shapes`),
once with a static batch and once with a dynamic one. By default the attention heads prune; the
dynamic export removes at least the static export's share of params; the pruned dynamic model
passes the full checker and runs at batch 1 and 3 with the original output shapes.
`benchmarks/zoo_sweep.py --shapes` runs the published models the same way.
"""

from __future__ import annotations

import numpy as np
import pytest

from torchvision_zoo import BY_NAME, ZooModel, export_cached, prune_and_run

pytestmark = pytest.mark.zoo

EXPORTERS = ("legacy-folded", "dynamo")
SHARE_TOL = 1e-3
"""Dynamic and static exports count the same weights; their shares differ by a few shape constants."""


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    return tmp_path_factory.mktemp("dynamic_zoo")


def _attention_block() -> "object":
    """nn.MultiheadAttention (packed in-projection, sequence first) between two dense layers."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(8, 32)
            self.attn = torch.nn.MultiheadAttention(32, 4)
            self.head = torch.nn.Linear(32, 5)

        def forward(self, x):  # x: [batch, seq, features]
            h = self.embed(x).transpose(0, 1)
            a, _ = self.attn(h, h, h, need_weights=False)
            return self.head((a + h).mean(0))

    return Block()


MODELS = {"vit_tiny_config": BY_NAME["vit_tiny_config"], "swin_tiny_config": BY_NAME["swin_tiny_config"],
          "multihead_attention": ZooModel("multihead_attention", "nn.MultiheadAttention", _attention_block, 0,
                                          sweep=False)}


def _export(name: str, exporter: str, shapes: str, directory):
    entry = MODELS[name]
    if entry.size:
        return export_cached(entry, exporter, directory, shapes=shapes)
    return _export_block(entry, exporter, shapes, directory)


def _export_block(entry: ZooModel, exporter: str, shapes: str, directory):
    """The attention block on a [batch, 6, 8] input (export_cached builds image inputs)."""
    import torch

    from torch_export import export

    torch.manual_seed(0)
    model = entry.build().eval()
    x = torch.randn(2 if shapes == "dynamic" else 1, 6, 8)
    return export(model, (x,), directory / f"{entry.name}-{exporter}-{shapes}.onnx", exporter,
                  dynamic=shapes == "dynamic")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_dynamic_batch_prunes_heads_as_much_as_the_static_export(name, exporter, zoo_dir):
    dynamic = _export(name, exporter, "dynamic", zoo_dir)
    assert not dynamic.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    _, check = prune_and_run(dynamic, ratio=0.5)  # runs at batch 1 and 3
    assert check.shapes_equal
    assert check.head_groups_pruned > 0, check.frozen_reasons
    _, twin = prune_and_run(_export(name, exporter, "static", zoo_dir), ratio=0.5)
    share, twin_share = (1 - c.params_after / c.params_before for c in (check, twin))
    assert share >= twin_share - SHARE_TOL, (share, twin_share, check.frozen_reasons)
    assert check.head_groups_pruned == twin.head_groups_pruned
    assert np.isfinite(share)
