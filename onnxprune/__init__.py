"""onnxprune: structured pruning of ONNX models, framework-agnostic and post-training."""

from onnxprune.api import PruneReport, PruneResult, analyze, prune, verify
from onnxprune.config import load_config
from onnxprune.errors import InputError, OnnxPruneError, VerificationError
from onnxprune.passes.dependency import Analysis
from onnxprune.plan import Plan
from onnxprune.verify import VerifyReport

__version__ = "0.1.0"

__all__ = ["analyze", "prune", "verify", "distill", "load_config", "Analysis", "Plan", "PruneResult", "PruneReport",
           "VerifyReport", "InputError", "OnnxPruneError", "VerificationError", "__version__"]


def __getattr__(name: str):
    """`onnxprune.distill` is imported on first use: `import onnxprune` stays free of torch."""
    if name == "distill":
        from onnxprune.train.distill import distill

        return distill
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
