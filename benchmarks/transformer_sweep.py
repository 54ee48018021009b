"""Compatibility sweep for transformers: tiny random-init HF models through both torch exporters.

    python benchmarks/transformer_sweep.py            # prints the table, rewrites docs/compatibility.md
    python benchmarks/transformer_sweep.py --no-write
    python benchmarks/transformer_sweep.py --only llama   # re-runs those rows; the others stay as written
    python benchmarks/transformer_sweep.py --static       # adds each model's static-shape twin as a row

Per model and exporter (tests/transformer_models.py: one dead head or KV group and three dead MLP
neurons planted per layer, dynamic batch and sequence axes): the head and neuron groups the
analysis finds, ratio 0.5 on heads and neurons (parameters before/after; the pruned model must
pass the full checker and run at two batch/sequence sizes with the original output shapes), and
lossless pruning (units removed vs planted, max output difference). The table replaces the
section between the transformers markers of docs/compatibility.md; other sections stay as they are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- begin: transformers -->", "<!-- end: transformers -->"
SIZES = ((1, 5), (3, 11))


STATIC_SIZE = (2, 8)
"""Batch and sequence of the static exports (`--static`): the only size they run at."""


def sweep_one(family: str, exporter: str, directory: Path, dynamic: bool = True) -> dict:
    import onnxprune
    from onnxprune.heads import group_kind
    from onnxprune.verify import session
    from transformer_models import example_inputs, export_transformer

    row = {"model": family, "exporter": exporter if dynamic else f"{exporter}, static"}
    sizes = SIZES if dynamic else (STATIC_SIZE,)
    try:
        model, planted = export_transformer(family, exporter, directory / f"{family}-{exporter}-{dynamic}.onnx",
                                            dynamic)
    except Exception as exc:  # noqa: BLE001 - an exporter failure is a row, not a crash
        row["error"] = "export failed: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return row
    analysis = onnxprune.analyze(model)
    kinds = [(g, group_kind(analysis, g)) for g in analysis.groups]
    row["heads"] = sorted({g.size for g, k in kinds if k == "heads" and g.prunable})
    row["head_groups"] = sum(1 for g, k in kinds if k == "heads" and g.prunable)
    row["neuron_groups"] = sum(1 for g, k in kinds if k == "channels" and g.prunable)
    frozen = [g.frozen[0] for g, k in kinds if k == "heads" and g.frozen]
    row["note"] = f"heads frozen: {frozen[0]}" if frozen else ""

    def run(m, feeds):
        names = {i.name for i in m.graph.input}
        return session(m).run(None, {k: v for k, v in feeds.items() if k in names})

    result = onnxprune.prune(model, ratio=0.5)
    onnx.checker.check_model(result.model, full_check=True)
    row["params"] = (result.report.before.params, result.report.after.params)
    row["runs"] = all([o.shape for o in run(result.model, example_inputs(family, b, s))]
                      == [o.shape for o in run(model, example_inputs(family, b, s))] for b, s in sizes)
    lossless = onnxprune.prune(model, lossless=True)
    feeds = example_inputs(family, *sizes[-1], seed=5)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(run(lossless.model, feeds), run(model, feeds)))
    row["lossless"] = (lossless.report.channels_removed, planted, diff)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | exporter | head groups (heads) | neuron groups | params at ratio 0.5 | runs at 2 sizes "
             "| lossless removed / planted (max diff) | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | - | - | - | - | - | {r['error']} |")
            continue
        before, after = r["params"]
        removed, planted, diff = r["lossless"]
        lines.append(f"| {r['model']} | {r['exporter']} | {r['head_groups']} ({'/'.join(map(str, r['heads'])) or '-'}) "
                     f"| {r['neuron_groups']} | {before:,} -> {after:,} ({after / before:.2f}) "
                     f"| {'yes' if r['runs'] else 'NO'} | {removed} / {planted} ({diff:.1e}) | {r['note']} |")
    return "\n".join(lines)


def merged_table(table: str) -> str:
    """`table`'s rows in place of the rows of the same model and exporter in the doc's table."""
    old = DOC.read_text().split(BEGIN, 1)[-1].split(END, 1)[0] if DOC.exists() else ""
    lines = [line for line in old.splitlines() if line.startswith("|")]
    new = {_row_key(line): line for line in table.splitlines()[2:]}
    if len(lines) < 2:
        return table
    merged = [new.pop(_row_key(line), line) for line in lines]
    return "\n".join(merged + list(new.values()))


def _row_key(line: str) -> tuple[str, ...]:
    return tuple(cell.strip() for cell in line.strip("|").split("|")[:2])


def write_section(table: str) -> None:
    """Replace (or append) only the transformers section of docs/compatibility.md."""
    body = (f"{BEGIN}\n## Transformers (Hugging Face, random init)\n\n"
            f"Generated by `python benchmarks/transformer_sweep.py`: 2 layers, hidden 64, 4 heads (Llama: 2 KV "
            f"heads, GQA), MLP 128, dynamic batch and sequence (ViT: batch). Rows marked static are the same "
            f"model exported without dynamic axes (batch 2, 8 tokens; `--static`), run at that size only. Heads are "
            f"counted per layer; under GQA a unit is a KV group with its query heads. Lossless: one dead head and 3 "
            f"dead neurons planted per layer. A static row prunes the same groups and units as its dynamic "
            f"twin; it can end smaller because a static export looks up the fixed positions 0..7, which constant "
            f"folding turns into an 8-row slice of the position table, while a dynamic export keeps the whole table "
            f"(frozen with the hidden size).\n\n"
            f"{table}\n{END}")
    text = DOC.read_text() if DOC.exists() else "# Compatibility\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + body + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    from onnxprune.ir import atomic_write_text

    atomic_write_text(DOC, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--only", nargs="+", metavar="MODEL",
                        help="run only these models; the doc keeps the other rows")
    parser.add_argument("--static", action="store_true",
                        help="add each model's static twin (no dynamic axes) as an 'exporter, static' row")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))  # the model builders are shared with the zoo tests
    from transformer_models import EXPORTERS, FAMILIES

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.only or FAMILIES:
            for exporter in EXPORTERS:
                for dynamic in (True, False) if args.static else (True,):
                    rows.append(sweep_one(family, exporter, Path(tmp), dynamic))
                    print(rows[-1], flush=True)
    table = markdown(rows)
    print(table)
    if not args.no_write:
        write_section(merged_table(table) if args.only else table)
        print(f"wrote the transformers section of {DOC}")


if __name__ == "__main__":
    main()
