"""Keras zoo tier: Keras 3 models exported to ONNX (NHWC graphs) prune like PyTorch ones.

For each model and export path: channels are zeroed in Keras before export; pruning at ratio 0.5
gives a model that passes the full checker, runs in ORT with the original output shapes and has
fewer parameters; lossless pruning removes at least the zeroed channels with outputs unchanged.

CI runs a representative subset (the hand-built CNNs on both paths, three applications on one path
each). `ONNXPRUNE_KERAS_MODELS=all` (or a comma-separated list of names) runs more here; the full
sweep with its figures is `benchmarks/keras_sweep.py`.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

# Checked without importing: TensorFlow takes seconds to import, even for a run that deselects us.
if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tf2onnx") is None:
    pytest.skip("needs keras and tf2onnx (pip install onnxprune[keras])", allow_module_level=True)

from keras_export import PATH_KINDS, export  # noqa: E402  (imports nothing heavy)

pytestmark = pytest.mark.keras

HAND_BUILT = ["sequential_cnn", "functional_cnn"]
CI_APPLICATIONS = [("VGG16", "keras"), ("MobileNetV2", "tf2onnx"), ("ResNet50", "keras")]


def _cases() -> list[tuple[str, str]]:
    chosen = os.environ.get("ONNXPRUNE_KERAS_MODELS", "")
    if chosen == "all":
        from keras_models import MODELS

        return [(m, p) for m in MODELS for p in PATH_KINDS]
    if chosen:
        return [(m.strip(), p) for m in chosen.split(",") for p in PATH_KINDS]
    return [(m, p) for m in HAND_BUILT for p in PATH_KINDS] + CI_APPLICATIONS


@pytest.mark.parametrize("name, path_kind", _cases())
def test_keras_export_prunes_and_removes_zeroed_channels_exactly(name, path_kind, tmp_path):
    from keras_models import build, prune_checks, zero_channels

    model, input_shape = build(name)
    zeroed = zero_channels(model)
    assert zeroed > 0, f"{name}: no layer eligible for zeroing"
    path = export(model, input_shape, tmp_path / f"{name}_{path_kind}.onnx", path_kind)
    row = prune_checks(path)  # full checker on both prunes; lossless is verified in ORT at 1e-5
    assert row["same_shapes"]
    assert row["groups_pruned"] > 0
    assert row["params_after"] < row["params_before"]
    assert row["macs_after"] < row["macs_before"]
    assert row["lossless_removed"] >= zeroed
    assert row["lossless_max_abs_diff"] <= 1e-5
