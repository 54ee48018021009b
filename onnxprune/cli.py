"""Command line: analyze, prune, verify, demo. Exit 0 ok, 1 failed verification, 2 bad input."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from onnxprune.cli_data import COMMANDS as DATA_COMMANDS
from onnxprune.cli_data import add_commands, add_data_argument
from onnxprune.cli_train import COMMANDS as TRAIN_COMMANDS
from onnxprune.cli_train import add_commands as add_train_commands
from onnxprune.cli_train import add_prune_options as add_distill_options
from onnxprune.errors import InputError, OnnxPruneError, VerificationError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sub = " ".join(self.prog.split()[1:])  # "onnxprune" at the root, "onnxprune prune" below it
        raise InputError(f"usage: {message} (see onnxprune {sub + ' ' if sub else ''}--help)")


def _parser() -> argparse.ArgumentParser:
    from onnxprune.passes.recover import RECOVER_METHODS  # here, not at module level: keeps `import cli` light
    from onnxprune.verify import DEFAULT_ATOL, DEFAULT_RTOL

    p = _Parser(prog="onnxprune", description="Structured pruning of ONNX models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    a = sub.add_parser("analyze", help="list channel groups and why some are frozen")
    a.add_argument("model")
    a.add_argument("--json", metavar="FILE", help="write the analysis as JSON")
    a.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="node names or globs to protect")
    a.add_argument("--prune-hidden", dest="prune_hidden", action="store_true",
                   help="also list the hidden size of transformers (residual stream) as prunable")

    r = sub.add_parser("prune", help="remove channels and write the smaller model")
    r.add_argument("model")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to remove (default 0.5)")
    r.add_argument("--criterion", default="l1", help="l1, l2, bn_scale, random, fpgm, activation, apoz, wanda, "
                   "taylor, fisher, or module:function (taylor and fisher with --data and no --gradients: "
                   "gradients computed here, needs the train extra)")
    r.add_argument("--steps", type=int, default=1, metavar="N",
                   help="reach the ratio or target in N rounds, re-scoring (and with --distill distilling from "
                   "the original) between them (default 1)")
    r.add_argument("--scope", choices=["local", "global"], default="local")
    r.add_argument("--round-to", type=_round_to, default=None, metavar="N|auto",
                   help="keep a multiple of N channels (1: exact counts); auto: the count just below a measured "
                   "latency step. Default: latency-friendly, Conv groups keep multiples of ONNX Runtime's NCHWc "
                   "block on this machine (the latency steps with --latency-table)")
    r.add_argument("--target-latency", dest="target_latency", type=float, metavar="F",
                   help="plan on measured ORT latency: keep about F of the model's latency")
    r.add_argument("--latency-table", dest="latency_table", metavar="FILE.json",
                   help="table from 'onnxprune latency-table' for --round-to auto / --target-latency "
                   "(default: measure now)")
    r.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="node names or globs to protect")
    r.add_argument("--lossless", action="store_true", help="remove only provably constant channels")
    r.add_argument("--plan", metavar="FILE|auto", help="replay a saved plan, or 'auto': per-group ratios from "
                   "measured sensitivity (with --target-macs)")
    r.add_argument("--save-plan", metavar="FILE", help="write the plan used as JSON")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--verify", action="store_true", help="compare outputs with ONNX Runtime")
    r.add_argument("--bench", action="store_true", help="measure latency before/after")
    add_data_argument(r, "calibration and verification data: FILE.npz, a directory of .npz files or "
                      "test_data_set_* folders, or name:file.npy pairs (default: seeded random for --verify)")
    r.add_argument("--stats", metavar="FILE.npz", help="saved statistics from 'onnxprune stats'")
    r.add_argument("--gradients", metavar="FILE.npz", help="loss gradients keyed by initializer name (taylor)")
    r.add_argument("--target-macs", dest="target_macs", type=float, metavar="F", help="fraction of MACs to keep")
    r.add_argument("--target-params", dest="target_params", type=float, metavar="F",
                   help="fraction of parameters to keep")
    r.add_argument("--max-ratio", dest="max_ratio", type=float, default=0.9,
                   help="at most this fraction of any group is removed with targets (default 0.9)")
    r.add_argument("--recover", choices=RECOVER_METHODS,
                   help="compensate removed channels: bias, least-squares re-fit, or re-fit layer by layer "
                   "(default: bias when --data or --stats is given)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--head-ratio", dest="head_ratio", type=float, metavar="F",
                   help="fraction of attention heads to remove per layer (default: --ratio)")
    r.add_argument("--prune-hidden", dest="prune_hidden", action="store_true",
                   help="also prune the hidden size of transformers (residual stream; lossy)")
    r.add_argument("--gqa", choices=["kv", "query"], default="kv",
                   help="grouped-query attention unit: a KV head with its query heads (kv), or query "
                   "position j of every KV group, K/V kept and the repeat count shrunk (query)")
    r.add_argument("--atol", type=float)
    r.add_argument("--rtol", type=float)
    r.add_argument("--report", metavar="FILE.json", help="write the JSON report")
    r.add_argument("--save-external-data", nargs="?", const=True, default=False, metavar="NAME",
                   help="store weights in a separate data file (the quantized model's too, as FILE.data)")
    r.add_argument("--quantize", choices=["dynamic", "static"],
                   help="then quantize with onnxruntime.quantization (static calibrates on --data)")
    r.add_argument("--quant-format", dest="quant_format", choices=["qdq", "qoperator"],
                   help="quantized graph format (default: QDQ; with --bench the faster of QDQ and QOperator)")
    r.add_argument("--activation-type", dest="activation_type", choices=["int8", "uint8"],
                   help="activation type (default for this CPU: uint8 on x86, int8 on ARM)")
    r.add_argument("--weight-type", dest="weight_type", choices=["int8", "uint8"], help="weight type (default int8)")
    r.add_argument("--per-channel", dest="per_channel", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel weight scales (default: on for static, off for dynamic)")
    r.add_argument("--calibration", choices=["minmax", "entropy", "percentile"],
                   help="static calibration method (default minmax)")
    r.add_argument("--quantized-output", metavar="FILE", help="where the quantized model goes "
                   "(default: next to -o, suffix .int8.onnx)")
    r.add_argument("--eval-data", metavar="FILE.npz", help="held-out inputs plus labels: report top-1 accuracy")
    r.add_argument("--labels", default="label", metavar="NAME", help="labels array in --eval-data (default: label)")
    r.add_argument("--html", metavar="FILE.html", help="write a self-contained HTML report")
    r.add_argument("--sensitivity", metavar="FILE.json", help="sensitivity results to chart in --html")
    r.add_argument("--config", metavar="FILE", help="prune options from YAML/JSON (keys = option names; "
                   "flags given here override it)")
    add_distill_options(r)

    v = sub.add_parser("verify", help="compare two models' outputs in ONNX Runtime")
    v.add_argument("original")
    v.add_argument("pruned")
    add_data_argument(v)
    v.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    v.add_argument("--rtol", type=float, default=DEFAULT_RTOL)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--bench", action="store_true")

    add_commands(sub)
    add_train_commands(sub)

    t = sub.add_parser("latency-table", help="measure each prunable layer's ORT latency at candidate channel counts")
    t.add_argument("model")
    t.add_argument("-o", "--output", metavar="FILE.json", help="write the table (input to --latency-table)")
    t.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    t.add_argument("--runs", type=int, default=20, help="timed runs per point (median; default 20)")

    d = sub.add_parser("demo", help="prune the built-in digits CNN and show the result")
    d.add_argument("--ratio", type=float, default=0.5)
    d.add_argument("-o", "--output", help="where to write the pruned demo model")
    return p


def _cmd_analyze(args) -> int:
    from onnxprune.api import analyze
    from onnxprune.ir import atomic_write_json
    from onnxprune.report import analysis_json, analysis_listing

    analysis = analyze(args.model, exclude=args.exclude, prune_hidden=args.prune_hidden)
    print(analysis_listing(analysis))
    if args.json:
        atomic_write_json(args.json, analysis_json(analysis))
    return 0


def _same_file(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        return pa.resolve() == pb.resolve() or (pb.exists() and pa.exists() and pa.samefile(pb))
    except OSError:
        return False


def _pruned_data_file(args) -> Path:
    """Where `--save-external-data` writes the pruned model's weights (default: OUTPUT.data)."""
    out = Path(args.output)
    return out.parent / (args.save_external_data if isinstance(args.save_external_data, str) else out.name + ".data")


def _refuse_overwriting_input_data(args) -> None:
    """No output (the data file, named or the default used above 2 GB; reports; plans) may replace an
    input file."""
    from onnxprune.external_data import referenced_files

    for flag in ("report", "save_plan", "html"):
        side = getattr(args, flag, None)
        if side and _same_file(args.model, side):
            raise InputError(f"{side}: --{flag.replace('_', '-')} would overwrite the input model")
    data = _pruned_data_file(args)
    if data.exists() and any(_same_file(str(f), str(data)) for f in [Path(args.model), *referenced_files(args.model)]):
        raise InputError(f"{data}: output data file would overwrite the input model's data")


def prune_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `onnxprune.prune` taken from parsed flags.

    A `prune` flag's dest is the keyword's name, so adding an option means adding one
    `add_argument` and one keyword; config files use the same names.
    """
    import inspect

    from onnxprune.api import prune

    names = [n for n, p in inspect.signature(prune).parameters.items() if p.kind is p.KEYWORD_ONLY]
    kwargs = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if kwargs.get("distill"):  # --distill with its --distill-* options
        from onnxprune.cli_train import distill_options

        kwargs["distill"] = distill_options(args, prefix="distill_")
    return kwargs


def _cmd_prune(args) -> int:
    from onnxprune.api import prune
    from onnxprune.html_report import load_sensitivity
    from onnxprune.report import table

    if _same_file(args.model, args.output):
        raise InputError(f"{args.output}: output would overwrite the input model")
    _refuse_overwriting_input_data(args)
    quantized_target = args.quantized_output or str(Path(args.output).with_suffix("")) + ".int8.onnx"
    if args.quantize and (_same_file(args.model, quantized_target) or _same_file(args.output, quantized_target)):
        raise InputError(f"{quantized_target}: the quantized model would overwrite the input or the pruned model")
    if args.quantize and args.save_external_data:
        quantized_data = quantized_target + ".data"
        if _same_file(quantized_data, str(_pruned_data_file(args))) or _same_file(args.model, quantized_data):
            raise InputError(f"{quantized_data}: the quantized model's data file would overwrite another file")
    sensitivity = load_sensitivity(args.sensitivity) if args.sensitivity else None
    try:
        result = prune(args.model, **prune_kwargs(args))
    except VerificationError as exc:
        if exc.result is not None:
            print(table(exc.result.report))
            _write_reports(args, exc.result, sensitivity)
        raise
    result.save(args.output, external_data=args.save_external_data)
    if args.save_plan:
        result.plan.save(args.save_plan)
    _write_reports(args, result, sensitivity)
    print(table(result.report))
    print(f"wrote {args.output}")
    if result.quantized is not None:
        # External data when the pruned model has it, under the quantized file's own default name:
        # a --save-external-data NAME is the pruned model's data file and must not be shared.
        result.save_quantized(quantized_target, external_data=bool(args.save_external_data))
        print(f"wrote {quantized_target}")
    return 0


def _write_reports(args, result, sensitivity) -> None:
    """The JSON report (--report) and the HTML page (--html), also after a failed verification."""
    from onnxprune.html_report import html_page
    from onnxprune.ir import atomic_write_json, atomic_write_text

    if args.report:
        atomic_write_json(args.report, result.report.to_dict())
    if args.html:
        atomic_write_text(Path(args.html), html_page(result.report, sensitivity, title=Path(args.model).name))


def _cmd_verify(args) -> int:
    from onnxprune.api import iter_feeds, load_model
    from onnxprune.verify import benchmark, compare

    a, b = load_model(args.original), load_model(args.pruned)
    report = compare(a, b, iter_feeds(args.data, a, args.seed), args.atol, args.rtol)  # streamed: CLI data re-reads
    for o in report.outputs:
        top1 = f"  top1 agreement {o.top1_agreement:.3f}" if o.top1_agreement is not None else ""
        print(f"{o.name}: max abs {o.max_abs_diff:.3g}  max rel {o.max_rel_diff:.3g}  cosine {o.cosine:.6f}"
              f"{top1}  {'PASSED' if o.passed else 'FAILED'} (would pass with atol >= {o.min_atol:.3g})")
    if args.bench:
        lat = benchmark(a, b, next(iter_feeds(args.data, a, args.seed)))
        print(f"latency median {lat.before_ms['median']:.3f} ms -> {lat.after_ms['median']:.3f} ms "
              f"(ratio {lat.ratio:.3f}, {lat.threads} thread(s), {lat.provider})")
    if not report.passed:
        raise VerificationError(f"outputs differ beyond atol {args.atol:g} / rtol {args.rtol:g}")
    return 0


def _round_to(text: str) -> "int | str":
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _cmd_latency_table(args) -> int:
    from onnxprune.api import analyze, load_model
    from onnxprune.latency import measure_table

    if args.threads < 1 or args.runs < 1:
        raise InputError("--threads and --runs must be >= 1")
    model = load_model(args.model)
    table = measure_table(model, analyze(model), threads=args.threads, runs=args.runs)
    print(f"whole model: {table.model_ms:.3f} ms  ({table.setting})")
    print(f"{'layer':40s} {'op':7s} {'ms':>8s}  axes (group: counts)")
    for layer in table.layers:
        axes = ", ".join(f"{role} {c.group}: {c.counts[0]}..{c.counts[-1]} ({len(c.counts)})"
                         for role, c in layer.curves.items())
        print(f"{layer.node[:40]:40s} {layer.op:7s} {layer.full_ms:8.3f}  {axes}")
    if args.output:
        table.save(args.output)
        print(f"wrote {args.output}")
    return 0


def _cmd_demo(args) -> int:
    from onnxprune.demo import run_demo

    return run_demo(ratio=args.ratio, output=args.output)


_COMMANDS = {"analyze": _cmd_analyze, "prune": _cmd_prune, "verify": _cmd_verify, "demo": _cmd_demo,
             "latency-table": _cmd_latency_table, **DATA_COMMANDS, **TRAIN_COMMANDS}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if getattr(args, "config", None):
            from onnxprune.config import apply_config

            args = apply_config(args, _parser(), sys.argv[1:] if argv is None else argv)
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
    except BrokenPipeError:  # `onnxprune ... | head`: the reader left; that is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MemoryError:
        print("onnxprune: error: out of memory", file=sys.stderr)
        return 2
    except Exception as exc:  # an internal bug must still not spill a traceback into a pipeline log
        print(f"onnxprune: error: could not process the input ({type(exc).__name__}: {str(exc)[:200]})",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
