"""Compatibility sweep: every torchvision model of the catalogue through all three exporters.

    python benchmarks/zoo_sweep.py                    # everything, writes docs/compatibility.md
    python benchmarks/zoo_sweep.py resnet18 swin_t    # a subset (the doc keeps the other rows)
    python benchmarks/zoo_sweep.py --tp-only          # only re-run Torch-Pruning against cached rows
    python benchmarks/zoo_sweep.py --shapes vit_b_16  # static vs dynamic batch rows (own doc section)

Each model runs in its own process (a crash or a timeout costs one row, not the sweep). Per model
and exporter: the model is exported once with dead channels planted in torch (tests/torch_export.py),
pruned at ratio 0.5 (l1) and run in ONNX Runtime next to the original (output shapes must match),
then pruned losslessly (max output difference relative to the output scale must stay <= 1e-4).
When torch-pruning is installed, its MagnitudePruner (L1, ratio 0.5, classifier output layers
ignored, no fine-tuning) runs on the same random-init torch model for comparison; its pruned model
goes through the same three exporters and the same initializer counter, so the remaining params are
compared in one accounting. The table goes
into docs/compatibility.md between the torchvision markers; other sections are left untouched.

`--shapes` produces each row twice, from a static export (batch 1) and from one with a dynamic
batch (`dynamic_axes` / `dynamic_shapes`), by default and with `prune_hidden=True`, on the
TorchScript (legacy-folded) and dynamo exporters; the pruned dynamic model must run at batch 1
and 3 with the original output shapes. Those rows go between the dynamic-batch markers; models
with no cached rows on this machine keep the lines the doc already has.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- begin: torchvision -->", "<!-- end: torchvision -->"
LOSSLESS_TOL = 1e-4
TP_TOL = 1e-3
"""Only for cached rows from before the common accounting (no re-export of Torch-Pruning's model):
their torch-side shares are compared, with 0.1 point for the BN representation difference."""
TIMEOUT_S = 1500

_CHILD = r"""
import json, sys, time, traceback
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torchvision_zoo as zoo
from torch_export import VARIANTS
entry, out = zoo.BY_NAME[sys.argv[2]], Path(sys.argv[3])
rows = []
for variant in VARIANTS:
    row = {"model": entry.name, "family": entry.family, "exporter": variant}
    t0 = time.perf_counter()
    try:
        model = zoo.export_cached(entry, variant, out, dead=True)
    except Exception as exc:
        row["error"] = "export failed: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        rows.append(row); continue
    row["export_s"] = time.perf_counter() - t0
    try:
        result, check = zoo.prune_and_run(model, ratio=0.5)
        row.update(check.__dict__)
    except Exception as exc:
        row["error"] = f"prune failed: {type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row); continue
    try:
        lossless, err = zoo.lossless_error(model)
        row["lossless_removed"] = lossless.report.channels_removed
        row["lossless_err"] = err
    except Exception as exc:
        row["lossless_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    rows.append(row)
print("ROWS " + json.dumps(rows))
"""

_SHAPES_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torchvision_zoo as zoo
entry, out = zoo.BY_NAME[sys.argv[2]], Path(sys.argv[3])
rows = []
for variant in ("legacy-folded", "dynamo"):
    for shapes in zoo.SHAPE_MODES:
        try:
            model = zoo.export_cached(entry, variant, out, shapes=shapes)
        except Exception as exc:
            rows.append({"model": entry.name, "exporter": variant, "shapes": shapes,
                         "error": "export failed: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]})
            continue
        for hidden in (False, True):
            if hidden and not any("hidden size" in k for r in rows[-1:] for k, _ in r.get("frozen_reasons", [])):
                continue  # no residual stream was frozen: prune_hidden changes nothing
            row = {"model": entry.name, "family": entry.family, "exporter": variant, "shapes": shapes, "hidden": hidden}
            try:
                result, check = zoo.prune_and_run(model, ratio=0.5, prune_hidden=hidden)
                row.update(check.__dict__)
            except Exception as exc:
                row["error"] = f"prune failed: {type(exc).__name__}: {str(exc)[:160]}"
            rows.append(row)
print("ROWS " + json.dumps(rows))
"""

_TP_CHILD = r"""
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch, torch_pruning as tp
import torchvision_zoo as zoo
from onnxprune.metrics import count
from torch_export import VARIANTS, export
entry = zoo.BY_NAME[sys.argv[2]]
model = zoo.build(entry)
x = zoo.example_input(entry)
with torch.no_grad():
    y = model(x)
outs = list(y.values()) if isinstance(y, dict) else [y]
classes = {o.shape[1] for o in outs}
ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features in classes
           or isinstance(m, torch.nn.Conv2d) and m.out_channels in classes and m.out_channels != m.in_channels]
before = sum(p.numel() for p in model.parameters())
try:
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=ignored, num_heads=heads)
    pruner.step()
    # torchvision keeps widths in attributes that Torch-Pruning does not update (its ViT example
    # sets them after the step): the ViT stem's hidden_dim and each attention's embed/head dims.
    for m in model.modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            m.embed_dim = m.kdim = m.vdim = m.out_proj.out_features
            m.head_dim = m.embed_dim // m.num_heads
    if hasattr(model, "hidden_dim") and hasattr(model, "conv_proj"):
        model.hidden_dim = model.conv_proj.out_channels
    with torch.no_grad():
        y2 = model(x)
    outs2 = list(y2.values()) if isinstance(y2, dict) else [y2]
    if [o.shape for o in outs2] != [o.shape for o in outs]:
        raise RuntimeError("output shape changed")
    after = sum(p.numel() for p in model.parameters())
except Exception as exc:
    print("TP " + json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}))
    sys.exit(0)
# The common accounting: the pruned torch model through each exporter, counted like onnxprune's rows.
onnx_after = {}
names = list(y) if isinstance(y, dict) else None
with tempfile.TemporaryDirectory() as tmp:
    for variant in VARIANTS:
        try:
            exported = export(model, (x,), Path(tmp) / f"{variant}.onnx", variant, output_names=names)
            onnx_after[variant] = count(exported).params
        except Exception as exc:
            onnx_after[variant] = {"error": f"export failed: {type(exc).__name__}"}
print("TP " + json.dumps({"before": before, "after": after, "onnx_after": onnx_after}))
"""


def run_model(name: str, directory: Path, child: str = _CHILD) -> list[dict]:
    tests = str(ROOT / "tests")
    try:
        proc = subprocess.run([sys.executable, "-c", child, tests, name, str(directory)], capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [{"model": name, "exporter": "all", "error": f"timed out after {TIMEOUT_S} s"}]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")), None)
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return [{"model": name, "exporter": "all", "error": f"process failed: {tail}"}]
    return json.loads(line[5:])


def run_torch_pruning(name: str) -> dict:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return {"error": "torch-pruning not installed"}
    try:
        proc = subprocess.run([sys.executable, "-c", _TP_CHILD, str(ROOT / "tests"), name], capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("TP ")), None)
    if line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["crashed"])[-1][:120]}
    return json.loads(line[3:])


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _best_share(rows: list[dict], model: str) -> float:
    """The largest share of params onnxprune removes from any export of the model."""
    shares = [1 - r["params_after"] / r["params_before"] for r in rows if r["model"] == model and "error" not in r]
    return max(shares, default=0.0)


def _row(r: dict, tp: dict, best: float = 1.0) -> str:
    head = f"| {r['model']} | {r['exporter']} "
    if "error" in r:
        return head + f"| – | – | – | – | **{r['error']}** | – |"
    removed = 1 - r["params_after"] / r["params_before"]
    lossless = (f"exact ({r['lossless_err']:.1e}), {r['lossless_removed']} ch" if "lossless_err" in r
                and r["lossless_err"] <= LOSSLESS_TOL else
                f"**{r.get('lossless_error') or 'inexact ' + format(r.get('lossless_err', float('nan')), '.1e')}**")
    reasons = "; ".join(f"{k} ×{n}" for k, n in r["frozen_reasons"][:3])
    status = "ok" if r["shapes_equal"] else "**output shapes differ**"
    return (head + f"| {_millions(r['params_before'])} → {_millions(r['params_after'])} ({removed:.1%}) "
            f"| {r['macs_before'] / 1e6:.1f}M → {r['macs_after'] / 1e6:.1f}M "
            f"| {r['groups_pruned']} / {r['groups_frozen']} | {reasons} | {status}; lossless {lossless} "
            f"| {_versus(r, tp, best)} |")


def _tp_failure(tp: dict) -> str | None:
    """The Torch-Pruning cell when it has no figures: skipped (--no-torch-pruning) or failed."""
    if tp.get("error") == "skipped":
        return "not run"
    return f"fails ({tp['error'][:60]})" if "error" in tp else None


def _versus(r: dict, tp: dict, best: float) -> str:
    """Torch-Pruning's pruned model in the row's own accounting: exported by the same exporter and
    counted by the same counter, so BN folding and running statistics weigh the same on both sides."""
    failed = _tp_failure(tp)
    if failed:
        return failed
    torch_side = f"torch: {_millions(tp['before'] - tp['after'])} removed ({1 - tp['after'] / tp['before']:.1%})"
    same = tp.get("onnx_after", {}).get(r["exporter"])
    if isinstance(same, int):
        delta = r["params_after"] - same
        verdict = "same" if delta == 0 else f"onnxprune {delta:+,}" + (" **(more)**" if delta > 0 else "")
        return f"{_millions(same)} ({verdict}); {torch_side}"
    if isinstance(same, dict):
        torch_side += f"; {same['error']}"
    share = 1 - tp["after"] / tp["before"]
    return torch_side + ("" if best >= share - TP_TOL else " **(more)**")


def table(rows: list[dict], tp: dict[str, dict]) -> str:
    lines = [
        "Generated by `python benchmarks/zoo_sweep.py` (random-init weights, ratio 0.5, l1, local scope).",
        "Params are the elements of the ONNX initializers and Constant nodes (BN folded or not, as",
        "exported); \"removed\" is the fraction of params gone. Groups: pruned / frozen, with the most",
        "frequent freeze reasons. Lossless: channels planted dead in torch removed with outputs within",
        f"{LOSSLESS_TOL:g} of the output scale.",
        "Torch-Pruning: its MagnitudePruner (L1, ratio 0.5, classifier ignored) prunes the same random-init",
        "architecture; the pruned torch model is then exported by the row's exporter and counted by the",
        "same counter as onnxprune's rows, so both sides are in one accounting (a folded BN is one bias per",
        "channel, a kept BN brings its running statistics). The column gives Torch-Pruning's params after,",
        "then onnxprune's params after minus that (negative: onnxprune removes more; **(more)** marks a",
        "row where Torch-Pruning removes more), then Torch-Pruning's own torch-side figure (parameters only,",
        "buffers excluded), which is not comparable with the ONNX counts.",
        "",
        "| model | exporter | params before → after (removed) | MACs before → after | groups pruned / frozen "
        "| top freeze reasons | status | Torch-Pruning, same export: params after (onnxprune − TP) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r, tp.get(r["model"], {"error": "not run"}), _best_share(rows, r["model"])) for r in rows]
    return "\n".join(lines)


NOTES = """
### How the hard patterns are handled

- **Channel shuffle** (ShuffleNetV2: Reshape → Transpose → Reshape): the reshape rule ties each
  channel to its position in the split axes; the walk defers the ambiguous side of the shuffle until
  the other side has chosen its axis, so both branches before the shuffle lose the same positions
  and the shuffle stays a valid permutation. `chunk` (Slice bounds computed from `Shape` by the
  TorchScript exporter) is constant-folded first, and its bounds are rewritten.
- **Squeeze-and-excitation** (MobileNetV3, EfficientNet, RegNetY): the SE hidden width is its own
  group; the gate's output channels couple with the main path through the broadcast Mul.
- **Grouped convolutions** (ResNeXt, RegNet): per-group-uniform removal, `group` unchanged.
- **Concat chains and channel slicing** (DenseNet, Inception, ShuffleNet): element-level ties
  through every Concat / Split / Slice, constants rewritten.
- **LayerNorm over channels behind permutes** (ConvNeXt, ViT, Swin, MaxViT): removing a channel
  changes the normalisation statistics, so these groups prune in lossy mode only; `--lossless`
  freezes them with the reason "normalises over the channel axis: removing channels changes the
  statistics (lossy mode only)".
- **Attention** (ViT, Swin, MaxViT): MLP hidden widths prune; heads prune where the attention rules
  prove it safe; the residual stream freezes where a run-time `Expand` (ViT's class token) or
  relative-position tables pin it, with the reason listed above.
- **Segmentation heads** (FCN, DeepLabV3, LR-ASPP): Resize keeps channels apart; the TorchScript
  exporter's run-time `sizes` (`Concat(Shape(x)[0:2], hw)`) read the input's own channel count,
  which follows the pruning; both graph outputs (`out`, `aux`) keep their classes.
- **Dynamo `as_strided`** (a Gather of a flattened tensor by constant indices): the indices are
  rewritten to the kept positions.

### Torch-Pruning in the same accounting

- DenseNet-121 once showed Torch-Pruning 0.2 points ahead (71.5% vs 71.3% removed). That was the
  accounting: torch counts parameters only, while the ONNX rows also count the running statistics
  of BatchNorms that cannot fold (DenseNet's pre-activation BNs) and the biases folding creates.
  Exported and counted alike, Torch-Pruning's pruned DenseNet-121 has exactly onnxprune's param
  count on every exporter (2,305,320 on legacy-folded), and every Conv keeps the same channel count.
- The common accounting exposed two counting artefacts on onnxprune's side, both fixed: copies of
  a zero bias the exporter had shared between layers each stayed separate after pruning (they now
  share again where still equal), and the values the TorchScript exporter writes as `Constant`
  nodes were counted only once onnxprune had turned them into initializers (both forms count now).
- ConvNeXt-T, dynamo: Torch-Pruning's model is 6,144 params smaller, with the same channel counts.
  The dynamo exporter merges equal initializers of at most 1,024 elements: re-exported after
  pruning, the nine zero biases (1,536 → 768) of stage 3's first MLP layers become one, while
  onnxprune keeps the nine biases of the original export (above that size there, so distinct).
  Only random-init zero biases are equal; the TorchScript rows of the same model are equal.
- DeepLabV3 / LR-ASPP, TorchScript: these rows were 62,848-78,332 params behind Torch-Pruning
  because their Resize `sizes` are computed at run time and froze the channels reaching them.
  Sizes whose channel entry is the Resize input's own dim (read by `Shape`) now follow the pruning;
  the rows are equal to Torch-Pruning's or a few params smaller.

### Known gaps (last run)

- Swin-T: its rows were re-run on 2026-12-03 with `--no-torch-pruning` (Torch-Pruning "not run":
  it did not finish within 14 minutes on Swin-T, see the dynamic-batch section). All three exports
  now remove 45–46% (24 groups pruned, 12 of them head groups; before the import rewrites of
  `passes/batch_shapes.py` and `passes/static_values.py`, the TorchScript rows froze 39 groups and
  removed 30%).
- ViT-B/16: re-run on 2026-12-03 with Torch-Pruning given `num_heads` (its ViT example's way):
  58.0M params after against onnxprune's 43.9M at the same ratio, on every export.
- MaxViT: `Einsum` has a channel rule now, so no group freezes at it and its attention is
  recognised (heads prune); as for every transformer, the residual stream then stays frozen
  unless `prune_hidden=True` / `--prune-hidden` is given. MaxViT-T, legacy-folded: 51.2% of params
  removed by default, 74.2% with `prune_hidden=True` (67.6% before the rule, Einsum groups frozen).
- Torch-Pruning fails on ShuffleNetV2 (channel shuffle), on torchvision's ViT unless given
  `num_heads`, and does not finish on Swin-T; onnxprune prunes all three. It was not run on
  MaxViT (no result within 10 minutes on the reduced config).
"""


SHAPES_BEGIN, SHAPES_END = "<!-- begin: dynamic-batch -->", "<!-- end: dynamic-batch -->"
SHAPES_TITLE = "torchvision with a dynamic batch (static twin side by side)"


def _share(after: int, before: int) -> str:
    return f"{1 - after / before:.1%}"


def shapes_table(rows: list[dict], tp: dict[str, dict]) -> str:
    """One line per (model, exporter, prune_hidden): the static and the dynamic row side by side."""
    lines = [
        "Generated by `python benchmarks/zoo_sweep.py --shapes` (random-init weights, ratio 0.5, l1). Each",
        "model is exported twice per exporter: batch 1 (static) and a dynamic batch (`dynamic_axes={..: {0:",
        "'batch'}}` for TorchScript, `dynamic_shapes` with `torch.export.Dim` for dynamo). \"removed\" is",
        "the share of params gone; heads: attention-head groups that lost heads; runs: the pruned dynamic",
        "model passes the full checker and runs at batch 1 and 3 with the original output shapes.",
        "Torch-Pruning: the share its MagnitudePruner (ratio 0.5) removes, its pruned model exported",
        "statically by the same exporter and counted by the same counter.",
        "",
        "| model | exporter | prune_hidden | static: removed (heads) | dynamic: removed (heads) | runs | "
        "top freeze reasons (dynamic) | Torch-Pruning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keyed = {(r["model"], r["exporter"], r.get("hidden"), r["shapes"]): r for r in rows}
    for (model, exporter, hidden, shapes), r in keyed.items():
        if shapes != "static":
            continue
        d = keyed.get((model, exporter, hidden, "dynamic"), {"error": "not run"})
        cells = []
        for x in (r, d):
            cells.append(f"**{x['error'][:80]}**" if "error" in x else
                         f"{_share(x['params_after'], x['params_before'])} ({x.get('head_groups_pruned', 0)})")
        runs = "–" if "error" in d else ("ok" if d["shapes_equal"] else "**output shapes differ**")
        reasons = "; ".join(f"{k} ×{n}" for k, n in d.get("frozen_reasons", [])[:2])
        lines.append(f"| {model} | {exporter} | {'yes' if hidden else 'no'} | {cells[0]} | {cells[1]} | {runs} "
                     f"| {reasons} | {_tp_share(tp.get(model, {}), exporter, r)} |")
    return "\n".join(lines)


def _tp_share(tp: dict, exporter: str, row: dict) -> str:
    failed = _tp_failure(tp)
    if failed:
        return failed
    same = tp.get("onnx_after", {}).get(exporter)
    if isinstance(same, int) and "params_before" in row:
        return _share(same, row["params_before"])
    return f"{1 - tp['after'] / tp['before']:.1%} (torch side)" if "after" in tp else "not run"


def write_section(body: str, notes: str = NOTES, markers: tuple[str, str] = (BEGIN, END),
                  title: str = "torchvision (classification and segmentation)") -> None:
    """Replace only one section of docs/compatibility.md (create the file if absent)."""
    begin, end = markers
    text = DOC.read_text() if DOC.exists() else "# Compatibility\n\n"
    section = f"{begin}\n## {title}\n\n{body}\n{notes}{end}"
    if begin in text and end in text:
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + section + text[stop:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    from onnxprune.ir import atomic_write_text

    atomic_write_text(DOC, text)


CACHE = Path(tempfile.gettempdir()) / "onnxprune_zoo_sweep"
"""One JSON file of rows per model from earlier runs, so a subset run (or several runs at once)
rewrites the doc with every model."""


def _cached_rows(folder: Path = CACHE) -> list[dict]:
    return [r for path in sorted(folder.glob("*.json")) for r in json.loads(path.read_text())]


def _torch_pruning(name: str, earlier: list[dict], skip: bool) -> dict:
    """Torch-Pruning's result for the model: run now, or with `skip` (--no-torch-pruning) its last
    cached result, if any."""
    if not skip:
        return run_torch_pruning(name)
    return earlier[0].get("tp", {"error": "skipped"}) if earlier else {"error": "skipped"}


SHAPE_MODELS = ["vit_b_16", "swin_t"]
"""Default of `--shapes`: the transformers whose dynamic exports used to under-prune."""


def sweep_shapes(names: list[str], no_torch_pruning: bool, render: bool, tp_only: bool = False) -> int:
    """Static vs dynamic batch rows per model (see the module doc), cached per model like the rest;
    `tp_only` re-runs only Torch-Pruning and keeps the model's cached rows."""
    from torchvision_zoo import CATALOGUE

    cache = CACHE / "shapes"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in [] if render else names:
            t0 = time.perf_counter()
            path = cache / f"{name}.json"
            earlier = json.loads(path.read_text()) if path.exists() else []
            rows = earlier if tp_only and earlier else run_model(name, Path(tmp), _SHAPES_CHILD)
            tp = _torch_pruning(name, earlier, no_torch_pruning)
            for r in rows:
                r["tp"] = tp
            path.write_text(json.dumps(rows))
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    order = {m.name: k for k, m in enumerate(CATALOGUE)}
    rows = sorted(_cached_rows(cache),
                  key=lambda r: (order.get(r["model"], 999), r["exporter"], r.get("hidden", False)))
    body = _with_doc_lines(shapes_table(rows, {r["model"]: r.get("tp", {}) for r in rows}),
                           {r["model"] for r in rows}, order)
    print(body)
    write_section(body, SHAPES_NOTES, (SHAPES_BEGIN, SHAPES_END), SHAPES_TITLE)
    return 0


def _with_doc_lines(body: str, cached: set[str], order: dict[str, int],
                    markers: tuple[str, str] = (SHAPES_BEGIN, SHAPES_END)) -> str:
    """The table with the doc's current lines (in the section between `markers`) for models that
    have no cached rows here (an earlier run on another machine), so a subset run adds rows instead
    of dropping the others; catalogue order."""
    def model(line: str) -> str:
        return line[2:].split(" | ")[0]

    def is_row(line: str) -> bool:
        return line.startswith("| ") and not line.startswith("| model |")

    text = DOC.read_text() if DOC.exists() else ""
    section = text[text.find(markers[0]):text.find(markers[1])] if markers[0] in text else ""
    kept = [line for line in section.splitlines() if is_row(line) and model(line) not in cached]
    lines = body.splitlines()
    new = [line for line in lines if is_row(line)]
    head = [line for line in lines if not is_row(line)]
    return "\n".join(head + sorted(kept + new, key=lambda line: order.get(model(line), 999)))


SHAPES_NOTES = """
Exports with a dynamic batch compute reshape targets at run time and, in `nn.MultiheadAttention`,
merge the batch with the heads (`[S, B·H, D]`); docs/transformers.md ("Dynamic batch and sequence")
says how the import rewrites both so the dynamic row prunes as its static twin.

- Last run (2-core shared machine): every dynamic export prunes the same groups (and heads) as its
  static twin, and the shares are equal up to the exporters' shape constants, which count as params
  (MaxViT's TorchScript dynamic export holds 48 more constant elements: 52.03% vs 52.06%, hence its
  52.0% / 52.1% row). ViT-B/16 and Swin-T prune their 12 head groups, MaxViT-T its 22, by default
  on both exporters and both shape modes.
- The rows of AlexNet, VGG, ResNeXt, Wide-ResNet, SqueezeNet, GoogLeNet, Inception-v3, MobileNetV2,
  MNASNet, EfficientNetV2, RegNetX, ConvNeXt, MaxViT, FCN, DeepLabV3 and LR-ASPP were added in a
  later run with `--no-torch-pruning` (Torch-Pruning "not run" here); the torchvision section above
  has its figures for all of them but the two MaxViT models.
- The segmentation models' TorchScript dynamic exports (FCN, DeepLabV3, LR-ASPP) declare the
  outputs' channel dims symbolic, so the final Resizes' output channel counts are unknown and they
  are the freeze reasons shown; those groups are the class outputs, frozen in both modes, so
  nothing prunes less.
- Torch-Pruning on ViT-B/16 is given `num_heads` and torchvision's width attributes are updated
  after its step (as its ViT example does); it then removes 32.8% in this accounting. On Swin-T it
  did not finish within 14 minutes (stopped; its last message was the recursion warning shown).
  On ShuffleNetV2 it fails (channel shuffle).
- ShuffleNetV2's TorchScript export with a dynamic batch computes `chunk`'s Slice bounds from the
  channel count; they are static and pinned to constants at import (`passes/static_values.py`).
"""


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from torchvision_zoo import CATALOGUE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="catalogue names (default: all)")
    parser.add_argument("--no-torch-pruning", action="store_true",
                        help="do not run Torch-Pruning; keep its cached result for the model")
    parser.add_argument("--render", action="store_true", help="only rewrite the doc from earlier runs")
    parser.add_argument("--tp-only", action="store_true",
                        help="re-run only Torch-Pruning, keeping the cached onnxprune rows of each model")
    parser.add_argument("--shapes", action="store_true",
                        help="static vs dynamic batch rows, with and without prune_hidden (own doc section)")
    args = parser.parse_args()
    if args.shapes:
        return sweep_shapes(args.models or SHAPE_MODELS, args.no_torch_pruning, args.render, args.tp_only)
    names = [] if args.render else (args.models or [m.name for m in CATALOGUE if m.sweep])
    CACHE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            cached = CACHE / f"{name}.json"
            earlier = json.loads(cached.read_text()) if cached.exists() else []
            rows = earlier if args.tp_only and earlier else run_model(name, Path(tmp))
            tp = _torch_pruning(name, earlier, args.no_torch_pruning)
            for r in rows:
                r["tp"] = tp
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for r in rows:
                print("  " + _row(r, tp), file=sys.stderr)
            (CACHE / f"{name}.json").write_text(json.dumps(rows))
            for leftover in Path(tmp).glob(f"{name}-*.onnx"):
                leftover.unlink()
    saved = _cached_rows()
    order = {m.name: k for k, m in enumerate(CATALOGUE)}
    exporters = {"legacy-folded": 0, "legacy-bn": 1, "dynamo": 2}
    rows = sorted(saved, key=lambda r: (order.get(r["model"], 999), exporters.get(r["exporter"], 3)))
    write_section(_with_doc_lines(table(rows, {r["model"]: r["tp"] for r in rows}), {r["model"] for r in rows},
                                  order, (BEGIN, END)))
    failures = [r for r in rows if "error" in r or not r.get("shapes_equal") or r.get("lossless_err", 1) > LOSSLESS_TOL]
    print(f"{len(rows)} rows, {len(failures)} with problems; wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
