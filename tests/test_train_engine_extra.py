"""The train extra is optional: the base package and `import onnxprune.train` never import torch, and
without torch the first use names the extra in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from onnxprune.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_package_does_not_import_torch():
    code = "import sys, onnxprune, onnxprune.train; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-500:]
    assert run.stdout.strip() == "False"


def test_missing_torch_names_the_extra(monkeypatch):
    import onnxprune.train as train

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(InputError, match=r"^onnxprune.train needs the train extra: pip install 'onnxprune\[train\]'$"):
        train.TrainableGraph  # noqa: B018
    with pytest.raises(AttributeError):
        train.NoSuchThing  # noqa: B018
