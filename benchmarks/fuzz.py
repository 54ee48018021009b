"""Long fuzz campaign: random graphs and damaged models through the whole pipeline.

    python benchmarks/fuzz.py --cases 1000            # random (new examples every run)
    python benchmarks/fuzz.py --cases 300 --seed 7    # reproducible campaign
    python benchmarks/fuzz.py --mode damaged --cases 500
    python benchmarks/fuzz.py --mode real --cases 500   # the packaged digits CNN, damaged, via the CLI

Each case either prunes to a model that passes the full ONNX checker and matches its
consumer-masked reference in ONNX Runtime (or the original, in lossless cases), or is refused with a
one-line InputError. Anything else is a finding: the script prints the case (paste it into
tests/test_fuzz.py as an @example) and the error, then a summary row: cases, outcomes, seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz_models import MUTATIONS, build_graph, graph_recipes, mutate, plant_dead_channels, prune_case  # noqa: E402
import onnx  # noqa: E402

from onnxprune.cli import main as cli_main  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "onnxprune" / "data" / "digits_cnn.onnx"

MODES = ("graph", "lossless", "damaged", "real")
OPTIONS = st.fixed_dictionaries({
    "ratio": st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]),
    "scope": st.sampled_from(["local", "global"]),
    "criterion": st.sampled_from(["l1", "l2", "random"]),
    "round_to": st.sampled_from([1, 1, 2, 4]),
    "seed": st.integers(0, 100),
})


def run_case(mode: str, recipe: dict, options: dict, kind: str, seed: int) -> str:
    if mode == "graph":
        return prune_case(build_graph(recipe), **options)
    if mode == "lossless":
        return prune_case(plant_dead_channels(build_graph(recipe), seed), lossless=True)
    if mode == "real":
        return run_cli(mutate(onnx.load(str(DIGITS)), kind, seed))
    damaged = mutate(build_graph(recipe), kind, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "damaged.onnx"
        path.write_bytes(damaged)
        outcome = prune_case(str(path), **options)
        assert path.read_bytes() == damaged, "the input file changed"
        return outcome


def run_cli(damaged: bytes) -> str:
    """The packaged digits CNN, damaged, through `onnxprune prune`: exit 0 with a checked model, or 2."""
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        path.write_bytes(damaged)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli_main(["prune", str(path), "-o", str(out)])
        message = err.getvalue().strip()
        assert code in (0, 2), message
        assert path.read_bytes() == damaged, "the input file changed"
        if code == 0:
            onnx.checker.check_model(onnx.load(out), full_check=True)
            return "pruned"
        assert not out.exists() and len(message.splitlines()) == 1, message
        assert "could not process" not in message, message
        return "refused"


def campaign(cases: int, modes: list[str], seed: int | None) -> tuple[Counter, list[str], float]:
    outcomes: Counter = Counter()
    findings: list[str] = []

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mode=st.sampled_from(modes), recipe=graph_recipes(), options=OPTIONS,
           kind=st.sampled_from(MUTATIONS), case_seed=st.integers(0, 2**16))
    def one(mode, recipe, options, kind, case_seed):
        try:
            outcomes[(mode, run_case(mode, recipe, options, kind, case_seed))] += 1
        except Exception as exc:  # a finding: keep going, report all at the end
            outcomes[(mode, "FAILED")] += 1
            where = traceback.extract_tb(exc.__traceback__)[-1]
            findings.append(f"mode={mode!r} recipe={recipe!r} options={options!r} kind={kind!r} seed={case_seed}\n"
                            f"    {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                            f" (at {Path(where.filename).name}:{where.lineno})")

    if seed is not None:
        one = hypothesis_seed(seed)(one)
    start = time.perf_counter()
    one()
    return outcomes, findings, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--mode", choices=MODES + ("all",), default="all")
    parser.add_argument("--seed", type=int, help="fixed hypothesis seed (default: random)")
    args = parser.parse_args()
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # damaged models make ORT log errors we expect
    modes = list(MODES) if args.mode == "all" else [args.mode]
    outcomes, findings, seconds = campaign(args.cases, modes, args.seed)
    for finding in findings:
        print("FINDING", finding)
    print(f"{'mode':<10} {'pruned':>8} {'refused':>8} {'failed':>8}")
    for mode in modes:
        print(f"{mode:<10} {outcomes[(mode, 'pruned')]:>8} {outcomes[(mode, 'refused')]:>8} "
              f"{outcomes[(mode, 'FAILED')]:>8}")
    total = sum(outcomes.values())
    print(f"cases {total}, findings {len(findings)}, {seconds:.1f} s ({seconds / max(total, 1) * 1000:.0f} ms/case)")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
