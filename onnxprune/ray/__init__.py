"""Scale out on Ray (the `ray` extra): statistics with Ray Data actors, sensitivity sweeps as Ray
tasks, distillation as data-parallel Ray Train (with the `train` extra). Needs
`pip install 'onnxprune[ray]'`; the rest of onnxprune never imports this package, and importing it
imports neither Ray nor torch.

    import onnxprune.ray
    stats = onnxprune.ray.stats("model.onnx", "shards/", workers=4)          # or a ray.data.Dataset
    result = onnxprune.ray.sensitivity("model.onnx", "eval.parquet", workers=4)
    trained = onnxprune.ray.distill("pruned.onnx", "model.onnx", "train/", workers=4)
"""

from onnxprune.ray.cluster import RAY_EXTRA
from onnxprune.ray.distill import distill
from onnxprune.ray.stats import stats
from onnxprune.ray.sweep import sensitivity

__all__ = ["stats", "sensitivity", "distill", "RAY_EXTRA"]
