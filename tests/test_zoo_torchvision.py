"""Zoo tier: real torchvision exports (random init) prune into valid, running, smaller models, and
channels made dead in torch before export are removed exactly by lossless mode.

One small model per family; the three exporter variants are spread across them so each one is
covered by several architectures. `benchmarks/zoo_sweep.py` runs every model on every variant.
"""

from __future__ import annotations

import numpy as np
import pytest

from torchvision_zoo import BY_NAME, ci_cases, export_cached, lossless_error, prune_and_run

pytestmark = pytest.mark.zoo

VARIANTS = ("legacy-folded", "legacy-bn", "dynamo")
"""tests/torch_export.py's variants, repeated so collecting this file never imports torch."""

LOSSLESS_TOL = 1e-4
"""Max output difference relative to the output's scale: float32 reassociation only."""

CASES = ci_cases()


def _exported(name: str, variant: str, zoo_dir):
    """The model with planted dead channels, exported once per session (both tests reuse it; `zoo_dir` is
    conftest.py's session-wide export folder)."""
    return export_cached(BY_NAME[name], variant, zoo_dir, dead=True)


def test_every_variant_is_covered_by_several_models(zoo_dir):
    from torch_export import VARIANTS as exported

    assert exported == VARIANTS
    variants = [v for _, v in CASES]
    assert all(variants.count(v) >= 3 for v in VARIANTS)


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_prunes_half_into_a_valid_smaller_model(name, variant, zoo_dir):
    model = _exported(name, variant, zoo_dir)
    result, check = prune_and_run(model, ratio=0.5)
    assert check.shapes_equal
    assert check.groups_pruned > 0, check.frozen_reasons
    assert check.params_after < 0.9 * check.params_before
    assert check.macs_after < check.macs_before
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_lossless_removes_planted_dead_channels_exactly(name, variant, zoo_dir):
    model = _exported(name, variant, zoo_dir)
    result, error = lossless_error(model)
    assert result.report.channels_removed > 0
    assert result.report.after.params < result.report.before.params
    assert error <= LOSSLESS_TOL
    assert np.isfinite(error)
