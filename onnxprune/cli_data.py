"""Command line for the data-driven steps: `stats`, `stats merge`, `sensitivity`, and the `--data`
argument shared by every command that reads data."""

from __future__ import annotations

import argparse
import os

from onnxprune.errors import InputError

DATA_HELP = ("data: FILE.npz, Parquet files, tar shards of .npy (docs/scale.md), a directory of them or of "
             "test_data_set_* folders, or name:file.npy pairs (default: seeded random inputs)")
RAY_HELP = ("run on Ray: a local Ray without ADDRESS, or a cluster (ray://head:10001, auto); needs the ray "
            "extra (docs/scale.md)")


class DataArg(argparse.Action):
    """One path stays a string; several values (name:file.npy pairs) become a list."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def add_data_argument(parser: argparse.ArgumentParser, help_text: str = DATA_HELP) -> None:
    parser.add_argument("--data", nargs="+", action=DataArg, metavar="DATA", help=help_text)


def add_commands(sub) -> None:
    from onnxprune.passes.recover import RECOVER_METHODS

    s = sub.add_parser("stats", help="calibration statistics (additive; 'stats merge' joins shards)")
    s.add_argument("inputs", nargs="+", metavar="MODEL | merge FILE...",
                   help="a model, or 'merge' followed by statistics files")
    s.add_argument("-o", "--output", required=True, metavar="FILE.npz")
    add_data_argument(s, DATA_HELP.replace(" (default: seeded random inputs)", ""))
    s.add_argument("--no-gram", action="store_true", help="skip the Gram matrices (no least-squares recovery)")
    s.add_argument("--limit", type=int, metavar="N", help="read at most N samples")
    add_ray_arguments(s, "actors, each with one ONNX Runtime session, sum shards (default 2)")
    s.add_argument("--quiet", action="store_true")

    t = sub.add_parser("sensitivity", help="prune each group alone and measure the damage")
    t.add_argument("model")
    add_data_argument(t)
    t.add_argument("--labels", default="label", metavar="NAME", help="labels array in the data (top-1 accuracy)")
    t.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    t.add_argument("--criterion", default="l1")
    t.add_argument("--recover", choices=RECOVER_METHODS, default="none")
    t.add_argument("--stats", metavar="FILE.npz", help="saved statistics (instead of computing them)")
    t.add_argument("--samples", type=int, default=512, help="evaluate on at most N samples (default 512)")
    t.add_argument("--exclude", nargs="+", default=[], metavar="NAME")
    t.add_argument("--json", metavar="FILE", help="write the curves as JSON")
    t.add_argument("--plot", metavar="FILE.png", help="plot the curves (needs matplotlib: the 'plot' extra)")
    add_ray_arguments(t, "Ray tasks evaluating (group, ratio) points in parallel (default 2)")
    t.add_argument("--quiet", action="store_true")


def add_ray_arguments(parser: argparse.ArgumentParser, workers_help: str) -> None:
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help=RAY_HELP)
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="with --ray: " + workers_help)


def _input_files(args: argparse.Namespace) -> list[str]:
    """Every file a data command reads: model(s), data (one path or name:file.npy pairs), statistics."""
    data = args.data if isinstance(args.data, list) else [args.data] if args.data else []
    files = [d.split(":", 1)[1] if ":" in d and not os.path.exists(d) else d for d in data]
    for name in ("model", "stats"):
        if isinstance(getattr(args, name, None), str):
            files.append(getattr(args, name))
    return files + [f for f in getattr(args, "inputs", []) if f != "merge"]


def _refuse_overwriting_inputs(args: argparse.Namespace, outputs: dict[str, str | None]) -> None:
    """Same rule as `prune`: no output (`{flag: path}`) may replace a file the command reads."""
    from onnxprune.cli import _same_file

    for flag, out in outputs.items():
        if out and any(_same_file(src, out) for src in _input_files(args)):
            raise InputError(f"{out}: {flag} would overwrite an input file")


def cmd_stats(args) -> int:
    from onnxprune.passes.stats import merge_files

    _refuse_overwriting_inputs(args, {"-o": args.output})
    if args.inputs[0] == "merge":
        if len(args.inputs) < 2:
            raise InputError("stats merge needs at least one statistics file")
        total = merge_files(args.inputs[1:])
        total.save(args.output)
        print(f"merged {len(args.inputs) - 1} file(s): {total.samples} samples -> {args.output}")
        return 0
    if len(args.inputs) != 1:
        raise InputError("stats takes one model (or: stats merge FILE... -o OUT)")
    if args.data is None:
        raise InputError("stats needs --data")
    if args.ray:
        stats = _ray_stats(args)
    else:
        from onnxprune.api import analyze
        from onnxprune.ir import load_model
        from onnxprune.passes.stats import collect

        model = load_model(args.inputs[0])
        stats = collect(model, analyze(model), args.data, grams=not args.no_gram, limit=args.limit, quiet=args.quiet)
    stats.save(args.output)
    print(f"{stats.samples} samples, {len(stats.slots)} channel slots, {len(stats.grams)} Gram matrices "
          f"-> {args.output}")
    return 0


def _ray_stats(args):
    ray_api = _ray_api()
    if args.limit is not None:
        raise InputError("--limit is not supported with --ray (shards are read whole)")
    return ray_api.stats(args.inputs[0], args.data, workers=args.workers, address=args.ray,
                         grams=not args.no_gram, quiet=args.quiet)


def _ray_api():
    """`onnxprune.ray`, after checking the extra (one line naming it when missing)."""
    from onnxprune.ray.cluster import require_ray

    require_ray()
    import onnxprune.ray

    return onnxprune.ray


def cmd_sensitivity(args) -> int:
    from onnxprune.sensitivity import save_json, sensitivity

    _refuse_overwriting_inputs(args, {"--json": args.json, "--plot": args.plot})
    options = dict(ratios=args.ratios, criterion=args.criterion, recover=args.recover, stats=args.stats,
                   labels=args.labels, samples=args.samples, exclude=args.exclude, quiet=args.quiet)
    if args.ray:
        result = _ray_api().sensitivity(args.model, args.data, workers=args.workers, address=args.ray, **options)
    else:
        result = sensitivity(args.model, args.data, **options)
    print(result.table())
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        if result.plot(args.plot):
            print(f"wrote {args.plot}")
        else:
            print("plot skipped: matplotlib is not installed (pip install onnxprune[plot])")
    return 0


COMMANDS = {"stats": cmd_stats, "sensitivity": cmd_sensitivity}
