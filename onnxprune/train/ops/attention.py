"""Opset-23 fused attention: Attention (grouped-query heads, boolean or additive mask, causal,
past key/value, softcap) and RotaryEmbedding, as the dynamo exporter writes them at opset 23."""

from __future__ import annotations

import math

import torch

from onnxprune.train.ops import Node, torch_op


def _heads(x, heads: int):
    """[B, S, H*D] -> [B, H, S, D]; 4-D inputs pass through."""
    if x.dim() == 4:
        return x
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


@torch_op("Attention")
def attention(node: Node, q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    if nonpad_kv_seqlen is not None:
        raise node.error("nonpad_kv_seqlen has no training rule")
    three_d = q.dim() == 3
    q = _heads(q, node.attr("q_num_heads", 0))
    k, v = _heads(k, node.attr("kv_num_heads", 0)), _heads(v, node.attr("kv_num_heads", 0))
    if past_key is not None:
        k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    present_k, present_v = k, v
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = node.attr("scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    softcap = node.attr("softcap", 0.0)
    if softcap:  # before the mask, so masked positions stay -inf
        scores = softcap * torch.tanh(scores / softcap)
    capped = scores
    bias = _bias(node, mask, scores.shape[-2], scores.shape[-1], 0 if past_key is None else past_key.shape[2],
                 scores.dtype)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores.float(), -1).to(q.dtype)
    if bias is not None:  # a row with no attendable key gives 0, not NaN
        probs = torch.where(torch.isneginf(bias.amax(-1, keepdim=True)), torch.zeros_like(probs), probs)
    y = probs @ v
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    mode = node.attr("qk_matmul_output_mode", 0)
    return y, present_k, present_v, (capped, capped, scores, probs)[mode]


def _bias(node: Node, mask, q_len: int, kv_len: int, past: int, dtype):
    """The additive mask: the given one (boolean: -inf where False; shorter than the keys: padded
    with -inf), combined with the causal frontier j <= i + past."""
    bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
        short = kv_len - mask.shape[-1]
        bias = torch.nn.functional.pad(mask, (0, short), value=float("-inf")) if short > 0 else mask
    if node.attr("is_causal", 0):
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(past)
        causal = torch.zeros(q_len, kv_len, dtype=dtype).masked_fill(~allowed, float("-inf"))
        bias = causal if bias is None else bias + causal
    return bias


@torch_op("RotaryEmbedding")
def rotary_embedding(node: Node, x, cos, sin, position_ids=None):
    three_d = x.dim() == 3
    if three_d:
        x = _heads(x, node.attr("num_heads", 0))
    if position_ids is not None:
        cos, sin = cos[position_ids.long()], sin[position_ids.long()]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, rot/2]: shared by the heads
    rot = node.attr("rotary_embedding_dim", 0) or x.shape[-1]
    turned, kept = x[..., :rot], x[..., rot:]
    if node.attr("interleaved", 0):
        a, b = turned[..., 0::2], turned[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    else:
        a, b = turned[..., :rot // 2], turned[..., rot // 2:]
        out = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
    y = torch.cat([out, kept], -1)
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return y
