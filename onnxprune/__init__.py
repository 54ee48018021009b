"""onnxprune: structured pruning of ONNX models, framework-agnostic and post-training."""

from onnxprune.api import PruneReport, PruneResult, analyze, prune, verify
from onnxprune.config import load_config
from onnxprune.errors import InputError, OnnxPruneError, VerificationError
from onnxprune.passes.dependency import Analysis
from onnxprune.plan import Plan
from onnxprune.verify import VerifyReport

__version__ = "0.1.0"

__all__ = ["analyze", "prune", "verify", "load_config", "Analysis", "Plan", "PruneResult", "PruneReport",
           "VerifyReport", "InputError", "OnnxPruneError", "VerificationError", "__version__"]
