"""What a prune learns from data: statistics, gradients, and the recovery they make possible.

`api.prune` asks this module, once per run, for the inputs the data-driven steps need (collecting
statistics only when a criterion, `--plan auto` or a recovery method will read them), and after a
plan is chosen, for the recovery: per-slot values for bias compensation (folded by the rewrite pass)
and least-squares fits (written after it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.errors import InputError
from onnxprune.importance import DATA_CRITERIA, load_gradients
from onnxprune.ops import Slot
from onnxprune.passes.dependency import Analysis
from onnxprune.passes.recover import (RECOVER_METHODS, Fit, apply_fits, batchnorm_values, lstsq_fits,
                                      sequential_refit, stats_values)
from onnxprune.passes.stats import Statistics, check_matches, collect


@dataclass
class Calibration:
    """Statistics and gradients for one prune run, and the recovery method resolved from them."""

    stats: Statistics | None = None
    gradients: dict[str, np.ndarray] | None = None
    recover: str = "none"
    notes: list[str] = field(default_factory=list)
    data: object = None
    """Calibration data, kept for sequential re-fitting (which reads it once per layer)."""
    quiet: bool = False

    @classmethod
    def prepare(cls, model: onnx.ModelProto, analysis: Analysis, *, data=None, stats=None, gradients=None,
                criterion="l1", recover: str | None = None, auto_plan: bool = False, quiet: bool = False
                ) -> "Calibration":
        """Load or collect what the run needs. `recover` None means: bias when data or statistics
        are given, else none."""
        if recover is None:
            recover = "bias" if data is not None or stats is not None else "none"
        if recover not in RECOVER_METHODS:
            raise InputError(f"recover must be one of {', '.join(RECOVER_METHODS)}, got {recover!r}")
        loaded = stats if isinstance(stats, Statistics) or stats is None else Statistics.load(stats)
        if loaded is not None:
            check_matches(loaded, model)
        custom = not isinstance(criterion, str) or ":" in criterion  # may read ctx.stats
        needs = criterion in DATA_CRITERIA or custom or auto_plan or recover != "none"
        if loaded is None and data is not None and needs:
            loaded = collect(model, analysis, data, grams=recover.startswith("lstsq"), quiet=quiet)
        if recover.startswith("lstsq") and (loaded is None or not loaded.grams):
            raise InputError(f"recover {recover!r} needs calibration data or statistics with Gram matrices (--data)")
        if recover == "lstsq-seq" and data is None:
            raise InputError("recover 'lstsq-seq' re-reads the calibration data layer by layer: give --data")
        grads = gradients if isinstance(gradients, dict) or gradients is None else load_gradients(gradients)
        return cls(loaded, grads, recover, data=data, quiet=quiet)

    def recovery(self, analysis: Analysis, units: dict[int, np.ndarray],
                 values: dict[Slot, np.ndarray] | None) -> tuple[dict[Slot, np.ndarray] | None, list[Fit]]:
        """(values for bias compensation, least-squares fits); exact dead-channel values win."""
        if self.recover == "none" or not units:
            return values, []
        fits: list[Fit] = []
        covered: set[Slot] = set()
        if self.recover.startswith("lstsq"):
            fits, covered = lstsq_fits(analysis, self.stats, units)
        expected = stats_values(analysis, self.stats) if self.stats is not None else batchnorm_values(analysis)
        if self.stats is None:
            self.notes.append("bias recovery is data-free (expected values from BatchNormalization)")
        merged = {slot: v for slot, v in expected.items() if slot not in covered}
        for slot, exact in (values or {}).items():
            if slot in merged:
                merged[slot] = np.where(np.isnan(exact), merged[slot], exact)
            elif slot not in covered:
                merged[slot] = exact
        if fits:
            self.notes.append(f"least-squares reconstruction re-fitted {len(fits)} layer(s)")
        return merged or None, fits


    def apply(self, graph: gs.Graph, original: onnx.ModelProto, fits: list[Fit]) -> None:
        """Write the fits into the rewritten graph; `lstsq-seq` then re-fits layer by layer."""
        apply_fits(graph, fits)
        if self.recover == "lstsq-seq" and fits:
            sequential_refit(graph, original, fits, self.data, quiet=self.quiet)
            self.notes.append("sequential: each layer re-fitted on the pruned model's own inputs")
