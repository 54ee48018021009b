"""Control flow: Loop, Scan and If run their subgraphs with the same interpreter; the body sees
the enclosing scope, so weights read from outer initializers stay the one trainable tensor."""

from __future__ import annotations

import torch

from onnxprune.train.ops import Node, axis_of, torch_op


@torch_op("Loop", scoped=True)
def loop(node: Node, trip_count, cond, *carried, scope):
    body = node.subgraphs["body"]
    limit = None if trip_count is None else int(trip_count)
    going = True if cond is None else bool(cond)
    carried = list(carried)
    scans: list[list[torch.Tensor]] = []
    i = 0
    while going and (limit is None or i < limit):
        outs = body.run(scope, [torch.tensor(i, dtype=torch.int64), torch.tensor(going), *carried])
        going = bool(outs[0])
        carried = outs[1:1 + len(carried)]
        scans.append(outs[1 + len(carried):])
        i += 1
    n_scan = len(body.outputs) - 1 - len(carried)
    stacked = [torch.stack([s[k] for s in scans]) if scans else torch.zeros(0) for k in range(n_scan)]
    return tuple(carried + stacked)


@torch_op("Scan", scoped=True)
def scan(node: Node, *inputs, scope):
    body = node.subgraphs["body"]
    n_scan = node.attr("num_scan_inputs")
    states, xs = list(inputs[:len(inputs) - n_scan]), inputs[len(inputs) - n_scan:]
    in_axes = [axis_of(a, x.dim()) for a, x in zip(node.attr("scan_input_axes") or [0] * n_scan, xs)]
    in_dirs = node.attr("scan_input_directions") or [0] * n_scan
    steps = xs[0].shape[in_axes[0]]
    collected: list[list[torch.Tensor]] = []
    for t in range(steps):
        slices = [x.select(a, steps - 1 - t if r else t) for x, a, r in zip(xs, in_axes, in_dirs)]
        outs = body.run(scope, [*states, *slices])
        states, collected = outs[:len(states)], collected + [outs[len(states):]]
    n_out = len(body.outputs) - len(states)
    out_axes = node.attr("scan_output_axes") or [0] * n_out
    out_dirs = node.attr("scan_output_directions") or [0] * n_out
    results = []
    for k in range(n_out):
        seq = [c[k] for c in collected]
        if out_dirs[k]:
            seq = seq[::-1]
        results.append(torch.stack(seq, axis_of(out_axes[k], seq[0].dim() + 1)))
    return tuple(states + results)


@torch_op("If", scoped=True)
def if_(node: Node, cond, scope):
    branch = node.subgraphs["then_branch" if bool(cond) else "else_branch"]
    return tuple(branch.run(scope, []))
