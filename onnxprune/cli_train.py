"""Command line for training: `distill`, and the `--distill-*` options of `prune`.

Both are generated from one table, so `distill --epochs 5` and `prune --distill --distill-epochs 5`
mean the same thing. Options `prune` already has keep their `prune` meaning there and are shared:
`--data` (training data), `--eval-data` with `--labels` (early stopping and accuracy), `--seed`,
`--quiet`. Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from onnxprune.cli_data import _input_files, add_data_argument
from onnxprune.errors import InputError

# field of DistillOptions -> (argparse keywords, help); shared with prune under the prefix --distill-
_OPTIONS: dict[str, tuple[dict, str]] = {
    "epochs": ({"type": int}, "passes over the data (default 10)"),
    "lr": ({"type": float}, "Adam learning rate (default 1e-3)"),
    "batch": ({"type": int}, "samples per step (default: the model's fixed batch, else 32)"),
    "loss": ({"nargs": "+", "metavar": "KIND|OUTPUT=KIND"},
             "kl, mse, cosine or pooled (cosine of the mean over real positions: sentence embeddings) for "
             "every output, or OUTPUT=KIND pairs (default auto: KL on outputs that look like class logits, MSE "
             "elsewhere)"),
    "temperature": ({"type": float}, "softmax temperature of the KL loss (default 2)"),
    "label_weight": ({"type": float, "metavar": "W"}, "weight of the cross-entropy term (default 1)"),
    "match": ({"action": "append", "metavar": "TENSOR"},
              "also match this intermediate tensor (same name and shape in both graphs) by MSE; repeatable"),
    "match_weight": ({"type": float, "metavar": "W"}, "weight of each --match term (default 1)"),
    "padding_mask": ({"metavar": "INPUT|none"}, "input whose zeros mark padding, left out of the loss on "
                     "(batch, positions, features) outputs and --match tensors (default auto: the one rank-2 "
                     "input named like *mask*, e.g. attention_mask)"),
    "augment": ({"action": "store_true"}, "modality-aware augmentation: shifts and noise for rank-4 float inputs, "
                "slight noise for other float inputs, none for integer (token) inputs"),
    "token_swap": ({"type": float, "metavar": "P"}, "token augmentation: replace a share P of the token ids "
                   "(e.g. 0.15) with ids drawn from the same batch; padding, masks and positions untouched"),
    "patience": ({"type": int}, "with --eval-data: stop after N epochs without improvement (default 3)"),
    "freeze_bn": ({"action": "store_true"}, "keep BatchNormalization scale and bias fixed"),
    "freeze": ({"action": "append", "metavar": "PATTERN"},
               "keep initializers with this name or shell-style pattern fixed (e.g. '*word_embeddings*'); repeatable"),
    "max_minutes": ({"type": float, "metavar": "M"}, "time budget: stop training after M minutes"),
}


def add_distill_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The distillation flags, named `--NAME` (distill) or `--distill-NAME` (prune); dests are the
    `DistillOptions` field names with the same prefix."""
    for name, (kwargs, help_text) in _OPTIONS.items():
        flag = "--" + (prefix + name).replace("_", "-")
        parser.add_argument(flag, dest=prefix + name, help=help_text, **kwargs)


def add_commands(sub) -> None:
    d = sub.add_parser("distill", help="knowledge distillation: train a (pruned) model to imitate its original")
    d.add_argument("student", help="the model to train (e.g. the pruned one)")
    d.add_argument("--teacher", required=True, help="the model to imitate (e.g. the original)")
    d.add_argument("-o", "--output", required=True, help="where the trained student goes")
    add_data_argument(d, "training data (no labels needed): FILE.npz, a directory of .npz files or "
                      "test_data_set_* folders, or name:file.npy pairs")
    d.add_argument("--eval-data", metavar="DATA", help="held-out data: early stopping on accuracy (with --labels) "
                   "or top-1 agreement with the teacher")
    d.add_argument("--labels", metavar="NAME", help="labels array in the data: cross-entropy on the logits output, "
                   "accuracy on --eval-data")
    add_distill_options(d)
    d.add_argument("--seed", type=int, default=0, help="same inputs and seed give a byte-identical output")
    d.add_argument("--report", metavar="FILE.json", help="write the distillation history as JSON")
    d.add_argument("--save-external-data", nargs="?", const=True, default=False, metavar="NAME",
                   help="store weights in a separate data file")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="data-parallel on Ray Train: a local Ray without ADDRESS, or a cluster "
                        "(ray://head:10001, auto); needs the ray extra (docs/scale.md)")
    d.add_argument("--workers", type=int, default=2, metavar="N",
                   help="with --ray: training workers (--batch is the global batch, split evenly)")


def add_prune_options(parser: argparse.ArgumentParser) -> None:
    """`prune --distill` and its `--distill-*` options."""
    parser.add_argument("--distill", action="store_true", help="after pruning, distil the pruned model from the "
                        "original on --data (options: --distill-*; --eval-data, --labels, --seed shared)")
    parser.add_argument("--distill-labels", dest="distill_labels", metavar="NAME",
                        help="labels array in --data: adds cross-entropy while distilling")
    add_distill_options(parser, prefix="distill_")


def distill_options(args: argparse.Namespace, prefix: str = ""):
    """`DistillOptions` from parsed flags: unset flags keep the dataclass defaults."""
    from onnxprune.train.distill import DistillOptions
    from onnxprune.train.losses import parse_loss_option

    values = {name: getattr(args, prefix + name) for name in _OPTIONS if getattr(args, prefix + name, None) is not None}
    if "loss" in values:
        values["loss"] = parse_loss_option(values["loss"])
    for name in ("match", "freeze"):
        if name in values:
            values[name] = tuple(values[name])
    values = {k: v for k, v in values.items() if v is not False}
    labels = getattr(args, prefix + "labels", None)
    eval_labels = args.labels if prefix else None
    return DistillOptions(**values, labels=labels, eval_labels=eval_labels, seed=args.seed, quiet=args.quiet)


def cmd_distill(args) -> int:
    from onnxprune.cli import _same_file
    from onnxprune.ir import atomic_write_json
    from onnxprune.train.distill import distill

    if args.data is None:
        raise InputError("distill needs --data")
    reads = [args.student, args.teacher, *_input_files(args)] + ([args.eval_data] if args.eval_data else [])
    for flag, out in (("-o", args.output), ("--report", args.report)):
        if out and any(_same_file(src, out) for src in reads):
            raise InputError(f"{out}: {flag} would overwrite an input file")
    options = distill_options(args)
    if args.ray:
        from onnxprune.ray.distill import distill as distill_on_ray

        result = distill_on_ray(args.student, args.teacher, args.data, workers=args.workers,
                                address=None if args.ray == "local" else args.ray,
                                eval_data=args.eval_data, options=options, quiet=args.quiet)
    else:
        from dataclasses import asdict

        result = distill(args.student, args.teacher, args.data, eval_data=args.eval_data, **asdict(options))
    print(history_table(result.history))
    result.save(args.output, external_data=args.save_external_data)
    if args.report:
        atomic_write_json(args.report, {"format": "onnxprune-distill", "version": 1,
                                        "student": str(Path(args.student)), "teacher": str(Path(args.teacher)),
                                        "distill": result.history.to_dict()})
    print(f"wrote {args.output}")
    return 0


def history_table(history) -> str:
    """Per-epoch loss and evaluation figures, then before/after and why training stopped."""
    from onnxprune.report import EVAL_FIGURES, distill_line

    keys = [k for k in EVAL_FIGURES if any(k in e.eval for e in history.epochs)]
    lines = [f"{'epoch':>5} {'train loss':>11}" + "".join(f" {'eval ' + k:>15}" for k in keys) + f" {'s':>6}"]
    for e in history.epochs:
        lines.append(f"{e.epoch:>5} {e.loss:>11.4g}" + "".join(f" {e.eval.get(k, float('nan')):>15.4f}" for k in keys)
                     + f" {e.seconds:>6.1f}")
    lines.append(distill_line(history.to_dict()))
    return "\n".join(lines)


COMMANDS = {"distill": cmd_distill}
