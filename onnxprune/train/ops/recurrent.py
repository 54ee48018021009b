"""LSTM, GRU and RNN as the ONNX specification defines them: gate orders iofc / zrh, every
direction, `layout` 0/1, `linear_before_reset`, initial states, `sequence_lens`, peepholes,
`clip`, `input_forget` and the activation list with its alpha/beta values."""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from onnxprune.train.ops import Node, torch_op

_ACTIVATIONS: dict[str, tuple[int, Callable]] = {  # name -> (how many of alpha, beta it reads, fn)
    "sigmoid": (0, lambda x, a, b: torch.sigmoid(x)),
    "tanh": (0, lambda x, a, b: torch.tanh(x)),
    "relu": (0, lambda x, a, b: torch.relu(x)),
    "softsign": (0, lambda x, a, b: F.softsign(x)),
    "softplus": (0, lambda x, a, b: F.softplus(x)),
    "leakyrelu": (1, lambda x, a, b: F.leaky_relu(x, 0.01 if a is None else a)),
    "thresholdedrelu": (1, lambda x, a, b: torch.where(x > (1.0 if a is None else a), x, torch.zeros_like(x))),
    "elu": (1, lambda x, a, b: F.elu(x, 1.0 if a is None else a)),
    "hardsigmoid": (2, lambda x, a, b: torch.clamp((0.2 if a is None else a) * x + (0.5 if b is None else b), 0, 1)),
    "affine": (2, lambda x, a, b: (1.0 if a is None else a) * x + (0.0 if b is None else b)),
    "scaledtanh": (2, lambda x, a, b: (1.0 if a is None else a) * torch.tanh((1.0 if b is None else b) * x)),
}
_DEFAULTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _activations(node: Node, directions: int) -> list[list[Callable]]:
    """Per direction, the activation functions with their alpha/beta bound (consumed in order)."""
    names = node.attr("activations") or _DEFAULTS[node.op] * directions
    alphas, betas = list(node.attr("activation_alpha") or []), list(node.attr("activation_beta") or [])
    out = []
    for name in names:
        key = name.lower()
        if key not in _ACTIVATIONS:
            raise node.error(f"activation {name} has no training rule")
        reads, fn = _ACTIVATIONS[key]
        a = alphas.pop(0) if reads >= 1 and alphas else None
        b = betas.pop(0) if reads >= 2 and betas else None
        out.append(lambda x, fn=fn, a=a, b=b: fn(x, a, b))
    per = len(names) // directions
    return [out[d * per:(d + 1) * per] for d in range(directions)]


def _recur(node: Node, x, w, r, bias, lengths, initial: list, cell) -> tuple:
    """Run `cell(node, gates_x, state, r_d, rb_d, acts) -> state` over time in every direction.

    `x` is [seq, batch, input]; each entry of `initial` is [dirs, batch, hidden] or None. Returns
    Y [seq, dirs, batch, hidden] and the final states, each [dirs, batch, hidden]."""
    direction = node.attr("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    hidden = node.attr("hidden_size") or r.shape[-1]
    steps, batch = x.shape[0], x.shape[1]
    gates = w.shape[1] // hidden
    acts = _activations(node, dirs)
    clip = node.attr("clip")
    ys, finals = [], []
    for d in range(dirs):
        wb, rb = (bias[d, :gates * hidden], bias[d, gates * hidden:]) if bias is not None else (None, None)
        xw = torch.matmul(x, w[d].t())
        if wb is not None:
            xw = xw + wb
        state = tuple(s[d] if s is not None else torch.zeros(batch, hidden, dtype=x.dtype) for s in initial)
        outputs: list = [None] * steps
        reverse = direction == "reverse" or d == 1
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            new = cell(node, xw[t], state, r[d], rb, acts[d], clip, d)
            if lengths is not None:
                valid = (t < lengths).unsqueeze(1)
                new = tuple(torch.where(valid, n, s) for n, s in zip(new, state))
                outputs[t] = torch.where(valid, new[0], torch.zeros_like(new[0]))
            else:
                outputs[t] = new[0]
            state = new
        ys.append(torch.stack(outputs) if steps else x.new_zeros(0, batch, hidden))
        finals.append(state)
    y = torch.stack(ys, 1)
    return (y, *(torch.stack([f[i] for f in finals]) for i in range(len(initial))))


def _clipped(gates, clip):
    return gates if clip is None else torch.clamp(gates, -clip, clip)


def _lstm_cell(node: Node, xw, state, r, rb, acts, clip, d, peep=None):
    h, c = state
    g = xw + h @ r.t()
    if rb is not None:
        g = g + rb
    g = _clipped(g, clip)
    gi, go, gf, gc = g.chunk(4, -1)
    if peep is not None:
        pi, po, pf = peep[d].chunk(3)
        gi, gf = gi + pi * c, gf + pf * c
    f, g_, h_ = acts
    i = f(gi)
    forget = 1 - i if node.attr("input_forget", 0) else f(gf)
    c_new = forget * c + i * g_(gc)
    if peep is not None:
        go = go + po * c_new
    return f(go) * h_(c_new), c_new


def _gru_cell(node: Node, xw, state, r, rb, acts, clip, d):
    (h,) = state
    f, g = acts
    xz, xr, xh = xw.chunk(3, -1)
    rz, rr, rh = r.chunk(3, 0)
    bz, br, bh = rb.chunk(3) if rb is not None else (0, 0, 0)
    z = f(_clipped(xz + h @ rz.t() + bz, clip))
    reset = f(_clipped(xr + h @ rr.t() + br, clip))
    if node.attr("linear_before_reset", 0):
        candidate = g(_clipped(xh + reset * (h @ rh.t() + bh), clip))
    else:
        candidate = g(_clipped(xh + (reset * h) @ rh.t() + bh, clip))
    return ((1 - z) * candidate + z * h,)


def _rnn_cell(node: Node, xw, state, r, rb, acts, clip, d):
    (h,) = state
    g = xw + h @ r.t()
    return (acts[0](_clipped(g if rb is None else g + rb, clip)),)


def _run(node: Node, cell, x, w, r, b, lengths, initial: list):
    layout = node.attr("layout", 0)
    if layout:  # batch-major: X [batch, seq, in], states [batch, dirs, hidden]
        x = x.transpose(0, 1)
        initial = [None if s is None else s.transpose(0, 1) for s in initial]
    y, *finals = _recur(node, x, w, r, b, lengths, initial, cell)
    if layout:
        return (y.permute(2, 0, 1, 3), *(f.transpose(0, 1) for f in finals))
    return (y, *finals)


@torch_op("LSTM")
def lstm(node: Node, x, w, r, b=None, lengths=None, h0=None, c0=None, peepholes=None):
    return _run(node, functools.partial(_lstm_cell, peep=peepholes), x, w, r, b, lengths, [h0, c0])


@torch_op("GRU")
def gru(node: Node, x, w, r, b=None, lengths=None, h0=None):
    return _run(node, _gru_cell, x, w, r, b, lengths, [h0])


@torch_op("RNN")
def rnn(node: Node, x, w, r, b=None, lengths=None, h0=None):
    return _run(node, _rnn_cell, x, w, r, b, lengths, [h0])
