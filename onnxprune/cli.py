"""Command line: analyze, prune, verify, demo. Exit 0 ok, 1 failed verification, 2 bad input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onnxprune.errors import InputError, OnnxPruneError, VerificationError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise InputError(f"usage: {message} (see onnxprune {self.prog.split()[-1]} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune", description="Structured pruning of ONNX models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("analyze", help="list channel groups and why some are frozen")
    a.add_argument("model")
    a.add_argument("--json", metavar="FILE", help="write the analysis as JSON")
    a.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="node names or globs to protect")

    r = sub.add_parser("prune", help="remove channels and write the smaller model")
    r.add_argument("model")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to remove (default 0.5)")
    r.add_argument("--criterion", default="l1", help="l1, l2, bn_scale, random, or module:function")
    r.add_argument("--scope", choices=["local", "global"], default="local")
    r.add_argument("--round-to", type=int, default=1, metavar="N", help="keep a multiple of N channels")
    r.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="node names or globs to protect")
    r.add_argument("--lossless", action="store_true", help="remove only provably constant channels")
    r.add_argument("--plan", metavar="FILE", help="replay a saved plan")
    r.add_argument("--save-plan", metavar="FILE", help="write the plan used as JSON")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--verify", action="store_true", help="compare outputs with ONNX Runtime")
    r.add_argument("--bench", action="store_true", help="measure latency before/after")
    r.add_argument("--data", metavar="FILE.npz", help="inputs for --verify/--bench (default: seeded random)")
    r.add_argument("--atol", type=float)
    r.add_argument("--rtol", type=float)
    r.add_argument("--report", metavar="FILE.json", help="write the JSON report")
    r.add_argument("--save-external-data", nargs="?", const=True, default=False, metavar="NAME",
                   help="store weights in a separate data file")

    v = sub.add_parser("verify", help="compare two models' outputs in ONNX Runtime")
    v.add_argument("original")
    v.add_argument("pruned")
    v.add_argument("--data", metavar="FILE.npz")
    v.add_argument("--atol", type=float, default=1e-4)
    v.add_argument("--rtol", type=float, default=1e-3)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--bench", action="store_true")

    d = sub.add_parser("demo", help="prune the built-in digits CNN and show the result")
    d.add_argument("--ratio", type=float, default=0.5)
    d.add_argument("-o", "--output", help="where to write the pruned demo model")
    return p


def _cmd_analyze(args) -> int:
    from onnxprune.api import analyze
    from onnxprune.ir import atomic_write_text
    from onnxprune.report import analysis_json, analysis_listing

    analysis = analyze(args.model, exclude=args.exclude)
    print(analysis_listing(analysis))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(analysis_json(analysis), indent=1))
    return 0


def _same_file(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        return pa.resolve() == pb.resolve() or (pb.exists() and pa.exists() and pa.samefile(pb))
    except OSError:
        return False


def prune_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `onnxprune.prune` taken from parsed flags.

    A `prune` flag's dest is the keyword's name, so adding an option means adding one
    `add_argument` and one keyword; config files use the same names.
    """
    import inspect

    from onnxprune.api import prune

    names = [n for n, p in inspect.signature(prune).parameters.items() if p.kind is p.KEYWORD_ONLY]
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def _cmd_prune(args) -> int:
    from onnxprune.api import prune
    from onnxprune.ir import atomic_write_text
    from onnxprune.report import table

    if _same_file(args.model, args.output):
        raise InputError(f"{args.output}: output would overwrite the input model")
    try:
        result = prune(args.model, **prune_kwargs(args))
    except VerificationError as exc:
        if exc.result is not None:
            print(table(exc.result.report))
            if args.report:
                atomic_write_text(Path(args.report), json.dumps(exc.result.report.to_dict(), indent=1))
        raise
    result.save(args.output, external_data=args.save_external_data)
    if args.save_plan:
        result.plan.save(args.save_plan)
    if args.report:
        atomic_write_text(Path(args.report), json.dumps(result.report.to_dict(), indent=1))
    print(table(result.report))
    print(f"wrote {args.output}")
    return 0


def _cmd_verify(args) -> int:
    from onnxprune.api import load_feeds, load_model
    from onnxprune.verify import benchmark, compare

    a, b = load_model(args.original), load_model(args.pruned)
    feeds = load_feeds(args.data, a, args.seed)
    report = compare(a, b, feeds, args.atol, args.rtol)
    for o in report.outputs:
        top1 = f"  top1 agreement {o.top1_agreement:.3f}" if o.top1_agreement is not None else ""
        print(f"{o.name}: max abs {o.max_abs_diff:.3g}  max rel {o.max_rel_diff:.3g}  cosine {o.cosine:.6f}"
              f"{top1}  {'PASSED' if o.passed else 'FAILED'} (would pass with atol >= {o.min_atol:.3g})")
    if args.bench:
        lat = benchmark(a, b, feeds[0])
        print(f"latency median {lat.before_ms['median']:.3f} ms -> {lat.after_ms['median']:.3f} ms "
              f"(ratio {lat.ratio:.3f}, {lat.threads} thread(s), {lat.provider})")
    if not report.passed:
        raise VerificationError(f"outputs differ beyond atol {args.atol:g} / rtol {args.rtol:g}")
    return 0


def _cmd_demo(args) -> int:
    from onnxprune.demo import run_demo

    return run_demo(ratio=args.ratio, output=args.output)


_COMMANDS = {"analyze": _cmd_analyze, "prune": _cmd_prune, "verify": _cmd_verify, "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except VerificationError as exc:
        print(f"onnxprune: verification failed: {exc}", file=sys.stderr)
        return 1
    except OnnxPruneError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 2
    except MemoryError:
        print("onnxprune: error: out of memory", file=sys.stderr)
        return 2
    except Exception as exc:  # an internal bug must still not spill a traceback into a pipeline log
        print(f"onnxprune: error: could not process the input ({type(exc).__name__}: {str(exc)[:200]})",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
