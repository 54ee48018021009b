"""Export Keras 3 models to ONNX the two ways Keras users do (tests and benchmarks only).

`export(model, input_shape, path, path_kind)` writes `path` and returns it:
- path_kind "keras": Keras 3's own `model.export(path, format="onnx")`.
- path_kind "tf2onnx": `tf2onnx.convert.from_function` on a `tf.function` with an input signature
  (tf2onnx's `from_keras` fails on Keras 3 models).

`input_shape` excludes the batch axis, which stays dynamic. Both paths need tensorflow (the
Keras backend) and tf2onnx; import this module after `pytest.importorskip("keras")`.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

PATH_KINDS = ("keras", "tf2onnx")
OPSET = 17


def export(model, input_shape: tuple[int, ...], path: "str | os.PathLike[str]", path_kind: str = "keras",
           batch: int | None = None) -> Path:
    """Write `model` as ONNX at `path` through the named export path; returns the path. `batch`
    fixes the batch size (None: dynamic)."""
    path = Path(path)
    if path_kind == "keras":
        _quiet_tf2onnx()
        model.export(str(path), format="onnx", verbose=False, opset_version=OPSET,
                     input_signature=[_spec(model, input_shape, batch)])
    elif path_kind == "tf2onnx":
        _from_function(model, input_shape, path, batch)
    else:
        raise ValueError(f"unknown export path {path_kind!r}; use one of {PATH_KINDS}")
    return path


def _spec(model, input_shape, batch: int | None = None):
    import tensorflow as tf

    name = model.inputs[0].name if getattr(model, "inputs", None) else "input"
    return tf.TensorSpec((batch, *input_shape), tf.float32, name=name.split(":")[0])


def _from_function(model, input_shape, path: Path, batch: int | None = None) -> None:
    import tensorflow as tf
    import tf2onnx

    _quiet_tf2onnx()
    spec = _spec(model, input_shape, batch)

    @tf.function(input_signature=[spec])
    def serve(x):
        return model(x, training=False)

    tf2onnx.convert.from_function(serve, input_signature=[spec], opset=OPSET, output_path=str(path))


def _quiet_tf2onnx() -> None:
    """Apply Keras's numpy-2 patch to tf2onnx (shared by both paths) and silence its logging."""
    import logging

    from keras.src.export.onnx import patch_tf2onnx

    patch_tf2onnx()
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
