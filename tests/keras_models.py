"""Keras models for the Keras zoo tier and `benchmarks/keras_sweep.py` (random init, no downloads).

`build(name)` returns (model, input shape without batch) for a keras.applications model or a
hand-built CNN; `zero_channels` zeroes whole output channels in Keras, the way a user's pruned or
dead filters look, so lossless removal can be checked on the exported graph; `prune_checks`
prunes an exported file and returns the figures both the tests and the sweep report.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from keras import layers  # noqa: E402

APPLICATIONS = {  # name: smallest input side the architecture accepts
    "VGG16": 32, "VGG19": 32, "ResNet50": 32, "ResNet50V2": 32, "MobileNet": 32, "MobileNetV2": 32,
    "MobileNetV3Small": 32, "MobileNetV3Large": 32, "EfficientNetB0": 32, "EfficientNetV2B0": 32,
    "DenseNet121": 32, "Xception": 71, "InceptionV3": 75, "ConvNeXtTiny": 32,
}
_NO_PREPROCESSING = ("MobileNetV3Small", "MobileNetV3Large", "EfficientNetV2B0", "ConvNeXtTiny")


def sequential_cnn() -> keras.Model:
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        layers.Conv2D(8, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.DepthwiseConv2D(3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.SeparableConv2D(12, 3, activation="relu"), layers.MaxPooling2D(), layers.Dropout(0.2),
        layers.Flatten(), layers.Dense(16, activation="relu"), layers.Dropout(0.2), layers.Dense(5),
    ], name="sequential_cnn")


def functional_cnn() -> keras.Model:
    """Residual Add, Concatenate of two branches, channel-last BN after a concat, squeeze-excite."""
    x = keras.Input((16, 16, 3))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x)))
    a = layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    h = layers.Add()([h, layers.BatchNormalization()(layers.Conv2D(8, 1)(a))])
    left = layers.Conv2D(6, 1, activation="relu")(h)
    right = layers.SeparableConv2D(6, 3, padding="same", activation="relu")(h)
    h = layers.BatchNormalization()(layers.Concatenate()([left, right]))
    gate = layers.Dense(12, activation="sigmoid")(layers.Dense(4, activation="relu")(layers.GlobalAveragePooling2D()(h)))
    h = layers.Multiply()([h, layers.Reshape((1, 1, 12))(gate)])
    h = layers.Conv2D(10, 3, strides=2, activation="relu")(h)
    y = layers.Dense(5)(layers.Dropout(0.3)(layers.GlobalAveragePooling2D()(h)))
    return keras.Model(x, y, name="functional_cnn")


HAND_BUILT = {"sequential_cnn": sequential_cnn, "functional_cnn": functional_cnn}
MODELS = list(HAND_BUILT) + list(APPLICATIONS)


def build(name: str, seed: int = 0) -> tuple[keras.Model, tuple[int, int, int]]:
    """A random-init model and its input shape (without the batch axis)."""
    keras.utils.set_random_seed(seed)
    if name in HAND_BUILT:
        model = HAND_BUILT[name]()
        _randomize_stats(model, np.random.default_rng(seed))
        return model, tuple(model.input_shape[1:])
    side = APPLICATIONS[name]
    extra = {"include_preprocessing": False} if name in _NO_PREPROCESSING else {}
    model = getattr(keras.applications, name)(weights=None, input_shape=(side, side, 3), classes=10, **extra)
    return model, (side, side, 3)


def _randomize_stats(model: keras.Model, rng: np.random.Generator) -> None:
    """Non-trivial biases and BN statistics, so exporters keep the Add/Mul nodes under test."""
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            draw = {"gamma": lambda n: rng.uniform(0.5, 1.5, n), "beta": lambda n: rng.normal(0, 0.2, n),
                    "moving_mean": lambda n: rng.normal(0, 0.2, n), "moving_variance": lambda n: rng.uniform(0.5, 1.5, n)}
            for variable in layer.weights:
                variable.assign(draw[variable.name](variable.shape).astype(np.float32))
        elif getattr(layer, "use_bias", False) and layer.weights:
            weights = layer.get_weights()
            weights[-1] = rng.normal(0, 0.1, weights[-1].shape)
            layer.set_weights(weights)


_WEIGHTED = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D, layers.Dense)
_PASS = (layers.BatchNormalization, layers.Activation, layers.ReLU, layers.Dropout, layers.ZeroPadding2D,
         layers.MaxPooling2D, layers.Concatenate, layers.Flatten, layers.GlobalAveragePooling2D)


def _feeds_weights_only(layer) -> bool:
    """Whether every path from `layer` meets a weight layer through ops that keep a zero channel zero."""
    consumers = [n.operation for n in layer._outbound_nodes]
    if not consumers:
        return False
    for consumer in consumers:
        if isinstance(consumer, _WEIGHTED):
            continue
        if not isinstance(consumer, _PASS) or not _feeds_weights_only(consumer):
            return False
        if isinstance(consumer, layers.Activation) and consumer.get_config()["activation"] not in (
                "relu", "relu6", "swish", "silu", "linear", "hard_swish", "gelu", "tanh"):
            return False
    return True


def zero_channels(model: keras.Model, per_layer: int = 2, seed: int = 0) -> int:
    """Zero `per_layer` output channels of every eligible layer; returns how many were zeroed.

    Eligible: a Conv2D / DepthwiseConv2D / SeparableConv2D / Dense (not the last layer) whose output
    reaches only weight layers through BN, activations, pooling, Dropout, Flatten or Concatenate,
    so each zeroed channel is provably constant; not a depthwise conv that follows another weight
    layer (its channels are that layer's). A layer followed by BatchNormalization gets that
    BN's gamma and beta zeroed (and its moving mean; with no gamma, the layer's own weights too),
    otherwise its own kernel slice and bias.
    """
    rng = np.random.default_rng(seed)
    zeroed = 0
    for layer in model.layers[:-1]:
        if not isinstance(layer, _WEIGHTED) or not _feeds_weights_only(layer) or _channel_owner(layer) is not layer:
            continue  # a depthwise conv's channels are its input's: removable only with them
        width = int(layer.compute_output_shape(layer.input.shape)[-1])
        channels = rng.choice(width, size=min(per_layer, width - 1), replace=False)
        consumers = [n.operation for n in layer._outbound_nodes]
        if len(consumers) == 1 and isinstance(consumers[0], layers.BatchNormalization):
            if not _zero_bn(consumers[0], channels):
                _zero_own(layer, channels)
        else:
            _zero_own(layer, channels)
        zeroed += len(channels)
    return zeroed


def _channel_owner(layer):
    """The layer whose output channels `layer`'s are: a depthwise conv (multiplier 1) keeps the
    channels of the weight layer before it, across BN, activations and padding."""
    if not isinstance(layer, layers.DepthwiseConv2D) or layer.depth_multiplier != 1:
        return layer
    producer = layer.input._keras_history.operation
    while isinstance(producer, (layers.BatchNormalization, layers.Activation, layers.ReLU, layers.ZeroPadding2D,
                                layers.Dropout)):
        producer = producer.input._keras_history.operation
    return _channel_owner(producer) if isinstance(producer, _WEIGHTED) else layer


def _zero_bn(bn, channels: np.ndarray) -> bool:
    """Zero gamma, beta and moving mean; False when there is no gamma (BN(0) is then still 0 once
    the layer before is zeroed too)."""
    for variable in bn.weights:
        if variable.name in ("gamma", "beta", "moving_mean"):
            value = np.array(variable.numpy())
            value[channels] = 0
            variable.assign(value)
    return bn.scale


def _zero_own(layer, channels: np.ndarray) -> None:
    weights = layer.get_weights()
    if isinstance(layer, layers.SeparableConv2D):
        weights[1][..., channels] = 0  # pointwise kernel [1, 1, in, out]
    elif isinstance(layer, layers.DepthwiseConv2D):
        kernel = weights[0]  # [k, k, in, multiplier]: output channel c is (c // m, c % m)
        m = kernel.shape[-1]
        kernel[:, :, channels // m, channels % m] = 0
    else:
        weights[0][..., channels] = 0
    if getattr(layer, "use_bias", False):
        weights[-1][channels] = 0
    layer.set_weights(weights)


def zero_units(cell, units: int, dead) -> None:
    """Zero hidden units `dead` of a Keras recurrent cell (LSTM, GRU, SimpleRNN): their column in
    every gate block of the kernel, the recurrent kernel and the bias(es) (gates along the last axis)."""
    kernel, recurrent, bias = cell.get_weights()
    cols = [g * units + u for g in range(kernel.shape[-1] // units) for u in dead]
    kernel[:, cols], recurrent[:, cols], bias[..., cols] = 0, 0, 0
    cell.set_weights([kernel, recurrent, bias])


def export_planted_and_narrow(planted, narrow, input_shape, folder, path_kind: str = "keras"):
    """Export a model with dead units planted and the same architecture built narrower; returns
    both as ModelProtos."""
    import onnx

    from keras_export import export

    return tuple(onnx.load(export(m, input_shape, folder / f"{name}.onnx", path_kind))
                 for name, m in (("planted", planted), ("narrow", narrow)))


def prune_checks(path, ratio: float = 0.5, lossless: bool = True) -> dict:
    """Prune an exported model at `ratio` and (optionally) losslessly; the figures the tier checks.

    Ratio pruning: full checker, ORT runs on the same inputs with the original output shapes.
    Lossless pruning: verified in ORT against the original at 1e-5 (raises VerificationError).
    """
    import onnx

    import onnxprune
    from onnxprune.verify import random_inputs, session

    original = onnx.load(str(path))
    result = onnxprune.prune(original, ratio=ratio)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = random_inputs(original, seed=0, batch=2)
    shapes = [o.shape for o in session(original).run(None, feeds)]
    pruned_shapes = [o.shape for o in session(result.model).run(None, feeds)]
    report = result.report
    row = {
        "params_before": report.before.params, "params_after": report.after.params,
        "macs_before": report.before.macs, "macs_after": report.after.macs,
        "groups_total": report.analysis["groups_total"], "groups_pruned": report.groups_pruned,
        "groups_frozen": report.analysis["groups_frozen"], "same_shapes": shapes == pruned_shapes,
    }
    if lossless:
        exact = onnxprune.prune(original, lossless=True, verify=True)
        onnx.checker.check_model(exact.model, full_check=True)
        row["lossless_removed"] = exact.report.channels_removed
        row["lossless_max_abs_diff"] = exact.report.verify.max_abs_diff
    return row
