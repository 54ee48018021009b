"""Tiny random-init Hugging Face transformers for the zoo tier and the compatibility sweep.

Each model is built from its config class (no downloads), gets one dead attention head (a whole KV
group under GQA) and a few dead MLP neurons planted per layer, and is exported with dynamic batch
and sequence axes by the TorchScript ("legacy") or the torch.export ("dynamo") exporter.
Test and benchmark helper only: torch and transformers are optional extras.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import torch
import transformers

LAYERS, HIDDEN, HEADS, FFN, VOCAB = 2, 64, 4, 128, 100
DEAD_HEAD, DEAD_NEURONS = 1, (3, 17, 40)


def _config(family: str):
    t = transformers
    common = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN, num_hidden_layers=LAYERS)
    if family == "bert":
        return t.BertModel(t.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **common))
    if family == "roberta":
        return t.RobertaModel(t.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=66, **common))
    if family == "distilbert":
        return t.DistilBertModel(t.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_heads=HEADS, hidden_dim=FFN,
                                                    n_layers=LAYERS, max_position_embeddings=64))
    if family == "vit":
        return t.ViTModel(t.ViTConfig(image_size=16, patch_size=4, num_channels=3, **common))
    if family == "gpt2":
        return t.GPT2Model(t.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_head=HEADS, n_inner=FFN, n_layer=LAYERS,
                                        n_positions=64, use_cache=False))
    if family == "llama":
        return t.LlamaModel(t.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=HEADS // 2, max_position_embeddings=64,
                                          **common))
    raise ValueError(family)


# Per family: (attention module path in a layer, q/k/v names, MLP module whose rows make neurons).
_PARTS = {
    "bert": ("attention.self", ("query", "key", "value"), "intermediate.dense"),
    "roberta": ("attention.self", ("query", "key", "value"), "intermediate.dense"),
    "vit": ("attention", ("q_proj", "k_proj", "v_proj"), "mlp.fc1"),
    "distilbert": ("attention", ("q_lin", "k_lin", "v_lin"), "ffn.lin1"),
    "llama": ("self_attn", ("q_proj", "k_proj", "v_proj"), "mlp.up_proj"),
    "gpt2": ("attn", ("c_attn",), "mlp.c_fc"),
}


def _layers(model, family: str):
    if family == "distilbert":
        return model.transformer.layer
    if family == "gpt2":
        return model.h
    if family in ("llama", "vit"):
        return model.layers
    return model.encoder.layer


def _zero_rows(linear, rows: np.ndarray) -> None:
    """Zero output features `rows` of a torch Linear (weight rows) or an HF Conv1D (columns)."""
    rows = torch.as_tensor(rows)
    if type(linear).__name__ == "Conv1D":
        linear.weight[:, rows] = 0
    else:
        linear.weight[rows] = 0
    if getattr(linear, "bias", None) is not None:
        linear.bias[rows] = 0


def plant_dead_units(model, family: str) -> int:
    """Zero head DEAD_HEAD's Q, K, V rows (a whole KV group under GQA) and DEAD_NEURONS' rows in
    every layer. Returns the number of units lossless pruning must find."""
    attn_path, qkv, mlp_path = _PARTS[family]
    kv_heads = getattr(model.config, "num_key_value_heads", None) or HEADS
    per_kv = HEADS // kv_heads
    dim = HIDDEN // HEADS
    q_rows = np.concatenate([np.arange(h * dim, (h + 1) * dim)
                             for h in range(DEAD_HEAD * per_kv, (DEAD_HEAD + 1) * per_kv)])
    kv_rows = np.arange(DEAD_HEAD * dim, (DEAD_HEAD + 1) * dim)
    with torch.no_grad():
        for layer in _layers(model, family):
            attn = layer.get_submodule(attn_path)
            if family == "gpt2":  # one fused c_attn: [q | k | v] columns
                _zero_rows(attn.c_attn, np.concatenate([q_rows, HIDDEN + kv_rows, 2 * HIDDEN + kv_rows]))
            else:
                for name, rows in zip(qkv, (q_rows, kv_rows, kv_rows)):
                    _zero_rows(getattr(attn, name), rows)
            _zero_rows(layer.get_submodule(mlp_path), np.array(DEAD_NEURONS))
    return LAYERS * (1 + len(DEAD_NEURONS))


class _Wrapper(torch.nn.Module):
    """Positional inputs, one output (the last hidden state)."""

    def __init__(self, model, family: str) -> None:
        super().__init__()
        self.model, self.family = model, family

    def forward(self, x, mask=None):
        if self.family == "vit":
            return self.model(pixel_values=x).last_hidden_state
        kwargs = {"use_cache": False} if self.family in ("gpt2", "llama") else {}
        return self.model(input_ids=x, attention_mask=mask, **kwargs).last_hidden_state


def example_inputs(family: str, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if family == "vit":
        return {"pixel_values": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64)}


def export_transformer(family: str, exporter: str, path, dynamic: bool = True) -> tuple[onnx.ModelProto, int]:
    """Build, plant and export one tiny model; returns (ModelProto, planted units). `dynamic`: batch
    and sequence axes dynamic (batch only for ViT); otherwise every dim is fixed at batch 2, 8 tokens."""
    torch.manual_seed(0)
    model = _config(family).eval()
    planted = plant_dead_units(model, family)
    feeds = example_inputs(family, 2, 8)
    names = list(feeds)
    args = tuple(torch.from_numpy(a) for a in feeds.values())
    wrapper = _Wrapper(model, family).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=48)
            shapes = tuple({0: batch} if family == "vit" else {0: batch, 1: seq} for _ in names)
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=names, output_names=["y"],
                                        dynamic_shapes=shapes if dynamic else None, opset_version=18, verbose=False)
            program.save(str(path), external_data=False)
        else:
            axes = {n: ({0: "batch"} if family == "vit" else {0: "batch", 1: "seq"}) for n in names}
            axes["y"] = {0: "batch"} if family == "vit" else {0: "batch", 1: "seq"}
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names, output_names=["y"],
                              dynamic_axes=axes if dynamic else None, opset_version=17)
    return onnx.load(str(path)), planted


FAMILIES = ("bert", "distilbert", "roberta", "vit", "gpt2", "llama")
EXPORTERS = ("legacy", "dynamo")
HEADS_FROZEN: dict[tuple[str, str], str] = {}
"""Exports whose attention heads stay frozen (with a reason shown by `analyze`); neurons still prune.
Empty: the TorchScript export of Llama's repeat_kv (run-time expand_as targets) prunes since the
shape evaluator follows Where/Equal/Mul chains (ops/shape_values.py)."""
