"""Normalisations. BatchNormalization always runs in inference form: its running statistics are
constants of the graph, never updated (an exported model is an inference model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onnxprune.train.ops import Node, axis_of, torch_op


def _channel(v, rank: int):
    return v.reshape(1, -1, *([1] * (rank - 2)))


@torch_op("BatchNormalization")
def batch_norm(node: Node, x, scale, bias, mean, var):
    if node.attr("training_mode", 0):
        raise node.error("training_mode=1 has no training rule (export the model in eval mode)")
    eps = node.attr("epsilon", 1e-5)
    if mean.requires_grad or var.requires_grad:  # F.batch_norm gives running statistics no gradient
        r = x.dim()
        return (x - _channel(mean, r)) / torch.sqrt(_channel(var, r) + eps) * _channel(scale, r) + _channel(bias, r)
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


@torch_op("InstanceNormalization")
def instance_norm(node: Node, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=node.attr("epsilon", 1e-5))


def _stash(node: Node, x):
    """Statistics in float32 when `stash_type` says so (the default), as ONNX Runtime computes them."""
    return x.float() if node.attr("stash_type", 1) == 1 and x.dtype in (torch.float16, torch.bfloat16) else x


@torch_op("LayerNormalization")
def layer_norm(node: Node, x, scale, bias=None):
    axis = axis_of(node.attr("axis", -1), x.dim())
    eps = node.attr("epsilon", 1e-5)
    dims = list(range(axis, x.dim()))
    xs = _stash(node, x)
    mean = xs.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(((xs - mean) ** 2).mean(dims, keepdim=True) + eps)
    normalized_shape = list(x.shape[axis:])
    if node.num_outputs == 1 and list(scale.shape) == normalized_shape and xs is x and (
            bias is None or list(bias.shape) == normalized_shape):
        return F.layer_norm(x, normalized_shape, scale, bias, eps)
    y = ((xs - mean) * inv_std).to(x.dtype) * scale
    return (y if bias is None else y + bias), mean, inv_std


@torch_op("GroupNormalization")
def group_norm(node: Node, x, scale, bias):
    groups = node.attr("num_groups")
    channels = x.shape[1]
    if scale.numel() == groups != channels:  # opset 18: one scale and bias per group
        scale, bias = scale.repeat_interleave(channels // groups), bias.repeat_interleave(channels // groups)
    xs = _stash(node, x)
    y = F.group_norm(xs, groups, None, None, node.attr("epsilon", 1e-5)).to(x.dtype)
    return y * _channel(scale, x.dim()) + _channel(bias, x.dim())


@torch_op("RMSNormalization")
def rms_norm(node: Node, x, scale):
    axis = axis_of(node.attr("axis", -1), x.dim())
    xs = _stash(node, x)
    ms = (xs * xs).mean(list(range(axis, x.dim())), keepdim=True)
    return (xs * torch.rsqrt(ms + node.attr("epsilon", 1e-5))).to(x.dtype) * scale


@torch_op("LpNormalization")
def lp_norm(node: Node, x):
    return x / torch.linalg.vector_norm(x, node.attr("p", 2), dim=node.attr("axis", -1), keepdim=True)
