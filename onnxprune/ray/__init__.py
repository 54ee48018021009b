"""Scale out on Ray (the `ray` extra): statistics with Ray Data actors, sensitivity sweeps as Ray
tasks. Needs `pip install 'onnxprune[ray]'`; the rest of onnxprune never imports this package.

    import onnxprune.ray
    stats = onnxprune.ray.stats("model.onnx", "shards/", workers=4)          # or a ray.data.Dataset
    result = onnxprune.ray.sensitivity("model.onnx", "eval.parquet", workers=4)
"""

from onnxprune.ray.cluster import RAY_EXTRA
from onnxprune.ray.sweep import sensitivity
from onnxprune.ray.stats import stats

__all__ = ["stats", "sensitivity", "RAY_EXTRA"]
