"""Train the demo CNN shipped in onnxprune/data on scikit-learn's bundled digits (8x8 images).

Run once by a developer (needs torch and scikit-learn); it writes onnxprune/data/digits_cnn.onnx
and the held-out test split onnxprune/data/digits_test.npz. The ONNX graph is written with
onnx.helper from the trained weights so BatchNormalization stays explicit (bn_scale, data-free
bias compensation) rather than being folded by an exporter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "onnxprune" / "data"
WIDTHS = (32, 64, 128)


def build() -> nn.Sequential:
    c1, c2, c3 = WIDTHS
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c3 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def data():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def train(net: nn.Sequential, x: np.ndarray, y: np.ndarray, epochs: int = 40) -> None:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def to_onnx(net: nn.Sequential) -> onnx.ModelProto:
    nodes, inits, counter = [], [], iter(range(1000))
    x = "image"

    def const(name: str, t: torch.Tensor) -> str:
        inits.append(numpy_helper.from_array(t.detach().numpy().astype(np.float32), name))
        return name

    for i, layer in enumerate(net):
        out = f"t{next(counter)}"
        if isinstance(layer, nn.Conv2d):
            nodes.append(helper.make_node("Conv", [x, const(f"conv{i}.weight", layer.weight),
                                                   const(f"conv{i}.bias", layer.bias)], [out], name=f"conv{i}",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        elif isinstance(layer, nn.BatchNorm2d):
            nodes.append(helper.make_node("BatchNormalization", [
                x, const(f"bn{i}.weight", layer.weight), const(f"bn{i}.bias", layer.bias),
                const(f"bn{i}.running_mean", layer.running_mean), const(f"bn{i}.running_var", layer.running_var)],
                [out], name=f"bn{i}", epsilon=layer.eps))
        elif isinstance(layer, nn.ReLU):
            nodes.append(helper.make_node("Relu", [x], [out], name=f"relu{i}"))
        elif isinstance(layer, nn.MaxPool2d):
            nodes.append(helper.make_node("MaxPool", [x], [out], name=f"pool{i}", kernel_shape=[2, 2], strides=[2, 2]))
        elif isinstance(layer, nn.Flatten):
            nodes.append(helper.make_node("Flatten", [x], [out], name=f"flatten{i}", axis=1))
        elif isinstance(layer, nn.Linear):
            nodes.append(helper.make_node("Gemm", [x, const(f"fc{i}.weight", layer.weight),
                                                   const(f"fc{i}.bias", layer.bias)], [out], name=f"fc{i}", transB=1))
        x = out
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxprune-examples")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    x_train, x_test, y_train, y_test = data()
    net = build()
    train(net, x_train, y_train)
    with torch.no_grad():
        acc = (net(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"test accuracy {acc:.4f}")
    OUT.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(net), OUT / "digits_cnn.onnx")
    np.savez_compressed(OUT / "digits_test.npz", image=x_test, label=y_test)
    np.savez_compressed(OUT / "digits_calib.npz", image=x_train[:256], label=y_train[:256])


if __name__ == "__main__":
    main()
