"""A Keras VGG16 digits classifier, exported to ONNX for onnxprune (docs/tutorials/keras_vgg16.md).

    python keras_vgg16_digits.py train [--out DIR]        # train, export vgg16_digits.onnx + data
    python keras_vgg16_digits.py evaluate A.onnx B.onnx --data digits32_test.npz

`train` builds `keras.applications.VGG16(include_top=False, weights=None)` on 32x32 RGB inputs
with a small Dense head and fits it to scikit-learn's digits (8x8, upsampled). To stay within a
CI minute on two CPU cores, the convolutional base keeps its random initial weights (random
convolutional features separate the digits well) and runs once to cache features; only the head
is trained. The exported model is the whole network. `evaluate` reports accuracy, macro
precision/recall/F1 and ORT latency.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

SIDE = 32


def load_digits32(seed: int = 0):
    """Digits upsampled to 32x32x3 in [0, 1]: (train x, train y, test x, test y), stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    images = images.repeat(SIDE // 8, axis=1).repeat(SIDE // 8, axis=2)  # nearest-neighbour 4x
    images = np.repeat(images[..., None], 3, axis=-1)
    return train_test_split(images, digits.target.astype(np.int64), test_size=0.25,
                            stratify=digits.target, random_state=seed)


def build_and_train(x_train, y_train, epochs: int, seed: int = 0):
    """VGG16 base (random init, frozen) + Dense head trained on the base's cached features."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIDE, SIDE, 3))
    base.trainable = False
    cached = base.predict(x_train, batch_size=256, verbose=0)
    # Standardise each channel (random features are tiny): a frozen BatchNormalization holding
    # the feature statistics, exported as channel-last Mul/Add constants.
    normalize = layers.BatchNormalization(epsilon=1e-12, trainable=False)
    normalize.build(cached.shape)
    flat = cached.reshape(-1, cached.shape[-1])
    normalize.set_weights([np.ones(flat.shape[1]), np.zeros(flat.shape[1]), flat.mean(0), flat.var(0)])
    head = keras.Sequential([
        keras.Input(cached.shape[1:]), normalize,
        layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(10, activation="softmax"),
    ], name="head")
    head.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    head.fit(cached, y_train, epochs=epochs, batch_size=64, verbose=0)
    image = keras.Input((SIDE, SIDE, 3), name="image")
    return keras.Model(image, head(base(image)), name="vgg16_digits")


def train(out: Path, epochs: int) -> None:
    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from keras_export import export

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_digits32()
    model = build_and_train(x_train, y_train, epochs)
    path = export(model, (SIDE, SIDE, 3), out / "vgg16_digits.onnx", "keras")
    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    np.savez(out / "digits32_test.npz", **{name: x_test, "label": y_test})
    np.savez(out / "digits32_calib.npz", **{name: x_train[:256]})
    accuracy = scores(str(path), {name: x_test}, y_test)["accuracy"]
    print(f"test accuracy {accuracy:.3f} ({len(y_test)} images, ONNX Runtime); "
          f"trained and exported in {time.perf_counter() - start:.0f} s; wrote {path}")


def scores(model_path: str, data: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1 and median single-image latency in ORT (1 thread)."""
    import onnxruntime as ort
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    predicted = session.run(None, data)[0].argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, average="macro", zero_division=0)
    one = {k: v[:1] for k, v in data.items()}
    session.run(None, one)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        session.run(None, one)
        times.append(time.perf_counter() - t)
    return {"accuracy": accuracy_score(labels, predicted), "precision": precision, "recall": recall,
            "f1": f1, "latency_ms": 1000 * float(np.median(times))}


def evaluate(paths: list[str], data_path: str) -> None:
    with np.load(data_path) as npz:
        labels = npz["label"]
        data = {k: npz[k] for k in npz.files if k != "label"}
    rows = {p: scores(p, data, labels) for p in paths}
    print(f"{'model':<28}" + "".join(f"{k:>12}" for k in next(iter(rows.values()))))
    for path, row in rows.items():
        print(f"{Path(path).name:<28}" + "".join(f"{v:>12.3f}" for v in row.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, default=Path("."))
    t.add_argument("--epochs", type=int, default=15)
    e = sub.add_parser("evaluate")
    e.add_argument("models", nargs="+")
    e.add_argument("--data", required=True)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.out, args.epochs)
    else:
        evaluate(args.models, args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
