"""The torchvision catalogue for the zoo tier and the compatibility sweep, and the checks they run.

Every model is random-init (never downloads weights) and exported at the smallest input its
architecture accepts. `small` marks the one model per family the CI tier uses (a reduced
configuration of the same torchvision class where the smallest published model is heavy); the
sweep runs the published models (`sweep`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

import onnxprune
from onnxprune.heads import group_kind
from onnxprune.verify import random_inputs, session


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    build: Callable[[], "object"]
    size: int
    small: bool = False
    """The smallest member of its family: runs in the CI tier."""
    sweep: bool = True
    """A published torchvision model: part of benchmarks/zoo_sweep.py."""


def _tv(name: str, **kwargs) -> Callable:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)
    return build


def _seg(name: str) -> Callable:
    def build():
        from torchvision.models import segmentation

        return getattr(segmentation, name)(weights=None, weights_backbone=None, aux_loss=True) \
            if not name.startswith("lraspp") else getattr(segmentation, name)(weights=None, weights_backbone=None)
    return build


def _tiny_maxvit() -> "object":
    """MaxViT blocks at a 32x32 input: torchvision's maxvit_t fixes a 7x7 partition, which needs 224."""
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)


def _tiny(kind: str) -> Callable:
    """Reduced configurations of torchvision's own classes, for the CI time budget."""
    def build():
        from torchvision.models import convnext, resnet, swin_transformer, vision_transformer

        if kind == "resnext":
            return resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=10)
        if kind == "wide_resnet":
            return resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=10)
        if kind == "convnext":
            return convnext.ConvNeXt([convnext.CNBlockConfig(32, 64, 2), convnext.CNBlockConfig(64, None, 2)],
                                     num_classes=10)
        if kind == "vit":
            return vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                        hidden_dim=64, mlp_dim=128, num_classes=10)
        return swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                                window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10)
    return build


CATALOGUE: list[ZooModel] = [
    ZooModel("alexnet", "AlexNet", _tv("alexnet"), 224, small=True),
    ZooModel("vgg11", "VGG", _tv("vgg11"), 224),
    ZooModel("vgg11_bn", "VGG", _tv("vgg11_bn"), 224, small=True),
    ZooModel("resnet18", "ResNet", _tv("resnet18"), 32, small=True),
    ZooModel("resnext50_32x4d", "ResNeXt", _tv("resnext50_32x4d"), 32),
    ZooModel("wide_resnet50_2", "Wide-ResNet", _tv("wide_resnet50_2"), 32),
    ZooModel("densenet121", "DenseNet", _tv("densenet121"), 32, small=True),
    ZooModel("squeezenet1_1", "SqueezeNet", _tv("squeezenet1_1"), 64, small=True),
    ZooModel("googlenet", "GoogLeNet", _tv("googlenet", aux_logits=False, init_weights=True), 64, small=True),
    ZooModel("inception_v3", "Inception-v3", _tv("inception_v3", aux_logits=False, init_weights=True), 75,
             small=True),
    ZooModel("mobilenet_v2", "MobileNetV2", _tv("mobilenet_v2"), 32, small=True),
    ZooModel("mobilenet_v3_small", "MobileNetV3", _tv("mobilenet_v3_small"), 32, small=True),
    ZooModel("mnasnet0_5", "MNASNet", _tv("mnasnet0_5"), 32, small=True),
    ZooModel("shufflenet_v2_x0_5", "ShuffleNetV2", _tv("shufflenet_v2_x0_5"), 32, small=True),
    ZooModel("efficientnet_b0", "EfficientNet", _tv("efficientnet_b0"), 32, small=True),
    ZooModel("efficientnet_v2_s", "EfficientNetV2", _tv("efficientnet_v2_s"), 32, small=True),
    ZooModel("regnet_x_400mf", "RegNet", _tv("regnet_x_400mf"), 32, small=True),
    ZooModel("regnet_y_400mf", "RegNet", _tv("regnet_y_400mf"), 32, small=True),
    ZooModel("convnext_tiny", "ConvNeXt", _tv("convnext_tiny"), 32),
    ZooModel("vit_b_16", "ViT", _tv("vit_b_16", image_size=32), 32),
    ZooModel("swin_t", "Swin", _tv("swin_t"), 32),
    ZooModel("maxvit_tiny_config", "MaxViT", _tiny_maxvit, 32, small=True),
    ZooModel("maxvit_t", "MaxViT", _tv("maxvit_t"), 224),
    ZooModel("resnext_tiny_config", "ResNeXt", _tiny("resnext"), 32, small=True, sweep=False),
    ZooModel("wide_resnet_tiny_config", "Wide-ResNet", _tiny("wide_resnet"), 32, small=True, sweep=False),
    ZooModel("convnext_tiny_config", "ConvNeXt", _tiny("convnext"), 32, small=True, sweep=False),
    ZooModel("vit_tiny_config", "ViT", _tiny("vit"), 32, small=True, sweep=False),
    ZooModel("swin_tiny_config", "Swin", _tiny("swin"), 32, small=True, sweep=False),
    ZooModel("fcn_resnet50", "FCN", _seg("fcn_resnet50"), 64, small=True),
    ZooModel("deeplabv3_mobilenet_v3_large", "DeepLabV3", _seg("deeplabv3_mobilenet_v3_large"), 64, small=True),
    ZooModel("lraspp_mobilenet_v3_large", "LR-ASPP", _seg("lraspp_mobilenet_v3_large"), 64, small=True),
]

BY_NAME = {m.name: m for m in CATALOGUE}

CI_VARIANT = {
    "resnet18": "dynamo", "squeezenet1_1": "dynamo", "mobilenet_v3_small": "dynamo", "regnet_x_400mf": "dynamo",
    "vit_tiny_config": "dynamo", "swin_tiny_config": "dynamo", "maxvit_tiny_config": "dynamo",
    "googlenet": "legacy-bn", "mnasnet0_5": "legacy-bn", "efficientnet_b0": "legacy-bn",
    "shufflenet_v2_x0_5": "legacy-bn", "lraspp_mobilenet_v3_large": "legacy-bn", "resnext_tiny_config": "legacy-bn",
    "regnet_y_400mf": "legacy-bn",
}
"""The dynamo exporter is the slowest, so it gets the light models; the others export legacy-folded."""

SKIP_IN_CI = {"vgg11_bn", "alexnet"}
"""Their 60-130M-parameter classifiers cost more CI time than they add coverage (the sweep runs them)."""


def ci_cases(skip: "set[str] | frozenset[str]" = frozenset()) -> list[tuple[str, str]]:
    """(model, exporter variant) for the CI tier: the small model of each family, less SKIP_IN_CI and `skip`."""
    return [(m.name, CI_VARIANT.get(m.name, "legacy-folded"))
            for m in CATALOGUE if m.small and m.name not in SKIP_IN_CI | set(skip)]


def build(entry: ZooModel, seed: int = 0):
    """The torch model with seeded random weights and random BatchNorm statistics (so BN is not an
    identity and folding it actually changes the weights)."""
    import torch

    torch.manual_seed(seed)
    model = entry.build().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                if module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.1, 0.1)
    return model


def example_input(entry: ZooModel, seed: int = 0, batch: int = 1):
    import torch

    return torch.randn(batch, 3, entry.size, entry.size, generator=torch.Generator().manual_seed(seed))


@dataclass
class PruneCheck:
    """Outcome of pruning one exported model at a ratio, checked in ONNX Runtime."""

    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    groups_total: int = 0
    groups_pruned: int = 0
    groups_frozen: int = 0
    frozen_reasons: list[tuple[str, int]] = field(default_factory=list)
    shapes_equal: bool = False
    seconds: float = 0.0
    head_groups_pruned: int = 0
    """Attention-head groups that lost heads."""


def top_reasons(analysis, k: int = 3) -> list[tuple[str, int]]:
    """The most frequent freeze reasons (node names stripped), with their group counts."""
    from collections import Counter

    counts = Counter()
    for group in analysis.groups:
        if group.frozen:
            for reason in {_generic(r) for r in group.frozen}:
                counts[reason] += 1
    return counts.most_common(k)


def _generic(reason: str) -> str:
    """'Conv 'x': msg' -> 'Conv: msg'; 'name is a graph input or output' -> 'graph input/output'."""
    if reason.endswith("is a graph input or output"):
        return "graph input/output"
    head, sep, tail = reason.partition(": ")
    if sep and " '" in head:
        return f"{head.split(' ')[0]}: {tail}"
    return reason


def prune_and_run(model: onnx.ModelProto, ratio: float = 0.5, prune_hidden: bool = False
                  ) -> tuple[onnxprune.PruneResult, PruneCheck]:
    """Prune at `ratio` (l1), then run both models in ORT and compare output shapes (at batch sizes
    1 and 3: the same feeds for a static model, two batches for a dynamic one)."""
    t0 = time.perf_counter()
    analysis = onnxprune.analyze(model, prune_hidden=prune_hidden)
    result = onnxprune.prune(model, ratio=ratio, criterion="l1", prune_hidden=prune_hidden)
    onnx.checker.check_model(result.model, full_check=True)
    before_s, after_s = session(model), session(result.model)
    same = True
    for batch in (1, 3):
        feeds = random_inputs(model, seed=0, batch=batch)
        before, after = before_s.run(None, feeds), after_s.run(None, feeds)
        same = same and [a.shape for a in before] == [b.shape for b in after]
    rep = result.report
    heads = {g.key for g in analysis.prunable if group_kind(analysis, g) == "heads"}
    check = PruneCheck(rep.before.params, rep.after.params, rep.before.macs, rep.after.macs,
                       len(analysis.groups), rep.groups_pruned, sum(1 for g in analysis.groups if g.frozen),
                       top_reasons(analysis), same, time.perf_counter() - t0,
                       sum(1 for e in result.plan.groups if e.key in heads and e.remove))
    return result, check


def lossless_error(model: onnx.ModelProto) -> tuple[onnxprune.PruneResult, float]:
    """Prune losslessly; return the result and the max output difference relative to output scale."""
    result = onnxprune.prune(model, lossless=True)
    onnx.checker.check_model(result.model, full_check=True)
    worst = 0.0
    for seed in (0, 1):
        feeds = random_inputs(model, seed=seed, batch=1 + 2 * seed)  # batch 3 where the batch is dynamic
        for a, b in zip(session(model).run(None, feeds), session(result.model).run(None, feeds)):
            scale = max(float(np.abs(a).max()), 1e-6)
            worst = max(worst, float(np.abs(a - b).max()) / scale)
    return result, worst


SHAPE_MODES = ("static", "dynamic")
"""Export with a fixed batch of 1, or with a run-time batch axis (`dynamic_axes` / `dynamic_shapes`)."""


def export_cached(entry: ZooModel, variant: str, directory: Path, dead: bool = False,
                  shapes: str = "static") -> onnx.ModelProto:
    """Export once per (model, variant, dead, shape mode) into `directory`, reusing an earlier file."""
    from torch_export import export, plant_dead_channels

    dynamic = shapes == "dynamic"
    path = directory / f"{entry.name}-{variant}{'-dead' if dead else ''}{'-dyn' if dynamic else ''}.onnx"
    if path.exists():
        return onnx.load(str(path))
    model = build(entry)
    x = example_input(entry, batch=2 if dynamic else 1)  # torch.export specialises a batch of 1
    if dead:
        plant_dead_channels(model, fraction=0.25, seed=1, args=(x,))
    return export(model, (x,), path, variant, output_names=_output_names(model, x), dynamic=dynamic)


def _output_names(model, x) -> "list[str] | None":
    """Segmentation models return a dict ('out', 'aux'): name the graph outputs after its keys."""
    import torch

    with torch.no_grad():
        y = model(x)
    return list(y) if isinstance(y, dict) else None
