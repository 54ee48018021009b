"""Tiny random-init causal language models (an LM head on top) for hidden-size pruning tests.

`tests/transformer_models.py` exports bare encoders/decoders whose output is the last hidden
state, a graph output that keeps the hidden size frozen. These models end in logits [B, S, vocab]
instead, so `--prune-hidden` can shrink the residual stream from the embedding lookup to the LM
head: GPT-2 (LayerNorm, tied wte / lm_head) and Llama (RMSNorm, untied or tied).
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
LM_FAMILIES = ("gpt2", "llama", "llama-tied")


def causal_lm(family: str):
    """A seeded, random-init `*ForCausalLM` (no downloads)."""
    torch.manual_seed(0)
    t = transformers
    if family == "gpt2":
        config = t.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_head=HEADS, n_inner=FFN, n_layer=LAYERS,
                              n_positions=64, use_cache=False)
        return t.GPT2LMHeadModel(config).eval()
    if family in ("llama", "llama-tied"):
        config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS,
                               num_key_value_heads=HEADS // 2, intermediate_size=FFN, num_hidden_layers=LAYERS,
                               max_position_embeddings=64, tie_word_embeddings=family == "llama-tied",
                               use_cache=False)
        return t.LlamaForCausalLM(config).eval()
    raise ValueError(family)


class _Logits(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def lm_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64)}


def export_causal_lm(family: str, exporter: str, path) -> onnx.ModelProto:
    """Export one tiny causal LM with dynamic batch and sequence axes; output `logits`."""
    wrapper = _Logits(causal_lm(family)).eval()
    feeds = lm_inputs(2, 8)
    names = list(feeds)
    args = tuple(torch.from_numpy(a) for a in feeds.values())
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=48)
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=names, output_names=["logits"],
                                        dynamic_shapes=tuple({0: batch, 1: seq} for _ in names), opset_version=18,
                                        verbose=False)
            program.save(str(path), external_data=False)
        else:
            axes = {n: {0: "batch", 1: "seq"} for n in [*names, "logits"]}
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=17)
    return onnx.load(str(path))
