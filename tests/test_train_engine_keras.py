"""TrainableGraph on Keras exports (NHWC CNN, LSTM, GRU-as-Loop). TensorFlow and torch must never
load in one process: this test exports in-process (TensorFlow) and checks the engine in a
subprocess (torch)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tf2onnx") is None:
    pytest.skip("needs keras and tf2onnx (pip install onnxprune[keras])", allow_module_level=True)
if importlib.util.find_spec("torch") is None:
    pytest.skip("needs the train extra (torch)", allow_module_level=True)

pytestmark = pytest.mark.keras
ROOT = Path(__file__).resolve().parents[1]

_CHECK = """
import json, sys
import numpy as np, onnx, torch
torch.set_num_threads(1)
from onnxprune.train import TrainableGraph, max_relative_error
from onnxprune.verify import random_inputs
from builders import structure
from test_train_engine_writeback import sgd_steps
out = {}
for path in sys.argv[1:]:
    model = onnx.load(path)
    g = TrainableGraph(model)
    check = random_inputs(model, seed=1, batch=3)
    before = max_relative_error(g, check)
    sgd_steps(g, random_inputs(model, seed=2, batch=4), steps=2, lr=1e-3, adam=True)
    trained = g.to_onnx()
    same = structure(trained) == structure(model)
    moved = sum(not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
                for a, b in zip(model.graph.initializer, trained.graph.initializer))
    out[path] = {"before": before, "after": max_relative_error(trained, check), "same_graph": same, "moved": moved}
print(json.dumps(out))
"""


def _models():
    import keras_export  # noqa: F401  (sets the backend before keras is imported)
    import keras
    from keras_models import build

    cnn, shape = build("functional_cnn")
    made = {"nhwc_cnn": (cnn, shape)}
    for cell in ("LSTM", "GRU"):
        keras.utils.set_random_seed(0)
        inp = keras.Input((6, 5))
        h = getattr(keras.layers, cell)(8, return_sequences=True)(inp)
        h = getattr(keras.layers, cell)(8, go_backwards=True)(h)
        made[cell.lower()] = (keras.Model(inp, keras.layers.Dense(3)(h)), (6, 5))
    return made


def test_keras_exports_train_and_write_back(tmp_path):
    import keras_export

    paths = {name: keras_export.export(model, shape, tmp_path / f"{name}.onnx", "keras")
             for name, (model, shape) in _models().items()}
    ops = {name: {n.op_type for n in onnx.load(p).graph.node} for name, p in paths.items()}
    assert "Transpose" in ops["nhwc_cnn"] and "LSTM" in ops["lstm"] and "Loop" in ops["gru"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    run = subprocess.run([sys.executable, "-c", _CHECK, *map(str, paths.values())], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, path in paths.items():
        r = results[str(path)]
        assert r["before"] <= 1e-5 and r["after"] <= 1e-4 and r["same_graph"] and r["moved"] > 0, (name, r)
