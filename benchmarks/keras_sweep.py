"""Keras compatibility sweep: every Keras model of the zoo tier through both export paths.

For each model (random init) and path: zero channels in Keras, export to ONNX, prune at ratio 0.5
(full checker, ORT output shapes) and losslessly (verified in ORT), then print one table row and
write all rows into docs/compatibility.md between `<!-- begin: keras -->` and `<!-- end: keras -->`.

    python benchmarks/keras_sweep.py                 # all models, both paths
    python benchmarks/keras_sweep.py VGG16 ResNet50  # a subset (rows of other models are kept)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from keras_export import PATH_KINDS, export  # noqa: E402
from keras_models import MODELS, build, prune_checks, zero_channels  # noqa: E402

DOC = ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- begin: keras -->", "<!-- end: keras -->"
HEADER = ("| model | export path | params before → after | MACs before → after | groups pruned / total "
          "| frozen (reasons) | lossless: zeroed → removed, max abs diff | verification |\n"
          "|---|---|---|---|---|---|---|---|")


PREFACE = ("Random-init `keras.applications` models (10 classes, the smallest input each accepts) and two "
           "hand-built CNNs, exported by Keras 3's `model.export` and by `tf2onnx.convert.from_function`; "
           "pruned at ratio 0.5 (local, L1); lossless: channels zeroed in Keras before export, removed by "
           "`--lossless` and verified in ORT. Regenerate with `python benchmarks/keras_sweep.py`.\n")


def _short(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _reasons(frozen: list[dict]) -> str:
    if not frozen:
        return "none"
    reasons = sorted({r.split(": ", 1)[-1] for g in frozen for r in g["reasons"]})
    return f"{len(frozen)}: " + "; ".join(reasons).replace("|", "/")


def sweep_one(name: str, path_kind: str, workdir: Path) -> str:
    """One table row; an export or prune failure becomes a row saying so."""
    start = time.perf_counter()
    model, shape = build(name)
    zeroed = zero_channels(model)
    try:
        path = export(model, shape, workdir / f"{name}_{path_kind}.onnx", path_kind)
    except Exception as exc:  # an exporter failure is a documented exception, not ours to hide
        return f"| {name} | {path_kind} | | | | | | export failed: {type(exc).__name__}: {str(exc)[:120]} |"
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:140]
        return f"| {name} | {path_kind} | | | | | | exporter wrote an invalid model: {first} |"
    try:
        r = prune_checks(path)
    except Exception as exc:
        return f"| {name} | {path_kind} | | | | | | FAILED: {type(exc).__name__}: {str(exc)[:160]} |"
    ok = "full checker ✓, ORT shapes ✓" if r["same_shapes"] else "ORT output shapes differ ✗"
    return (f"| {name} | {path_kind} | {_short(r['params_before'])} → {_short(r['params_after'])} "
            f"| {_short(r['macs_before'])} → {_short(r['macs_after'])} | {r['groups_pruned']} / {r['groups_total']} "
            f"| {_reasons(r['groups_frozen'])} | {zeroed} → {r['lossless_removed']}, {r['lossless_max_abs_diff']:.1e} "
            f"| {ok} ({time.perf_counter() - start:.0f} s) |")


def write_rows(rows: dict[tuple[str, str], str]) -> None:
    """Replace the Keras section of docs/compatibility.md, keeping rows of models not re-run."""
    text = DOC.read_text() if DOC.exists() else "# Compatibility\n"
    if BEGIN not in text:
        text = text.rstrip() + f"\n\n## Keras / TensorFlow (NHWC exports)\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    old, tail = rest.split(END, 1)
    for line in old.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1] in MODELS and cells[2] in PATH_KINDS:
            rows.setdefault((cells[1], cells[2]), line)
    order = sorted(rows, key=lambda k: (MODELS.index(k[0]), PATH_KINDS.index(k[1])))
    body = "\n".join([PREFACE, HEADER] + [rows[k] for k in order])
    DOC.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=MODELS, help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--paths", nargs="+", default=list(PATH_KINDS), choices=PATH_KINDS)
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:  # one row in this process (the parent runs each in a fresh one: TF keeps memory)
        with tempfile.TemporaryDirectory() as tmp:
            print(ROW_MARK + sweep_one(*args.row, Path(tmp)))
        return 0
    print(HEADER)
    for name in args.models:
        for path_kind in args.paths:
            row = _row_in_subprocess(name, path_kind)
            print(row, flush=True)
            write_rows({(name, path_kind): row})  # after each row, so a long sweep keeps its progress
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


ROW_MARK = "ROW "


def _row_in_subprocess(name: str, path_kind: str) -> str:
    done = subprocess.run([sys.executable, __file__, "--row", name, path_kind], capture_output=True, text=True)
    rows = [line[len(ROW_MARK):] for line in done.stdout.splitlines() if line.startswith(ROW_MARK)]
    if rows:
        return rows[-1]
    why = f"exit code {done.returncode}" + (" (killed: out of memory?)" if done.returncode < 0 else "")
    return f"| {name} | {path_kind} | | | | | | FAILED: sweep process ended with {why} |"


if __name__ == "__main__":
    sys.exit(main())
