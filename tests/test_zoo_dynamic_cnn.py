"""Zoo tier: CNN families exported with a dynamic batch prune as much as their static twins.

The small model of each family (tests/test_zoo_torchvision.py's cases and exporter variants) is
exported twice, batch 1 (static) and a dynamic batch, with no planted dead channels, and pruned at
ratio 0.5 (l1). The dynamic export removes the static export's share of params (within SHARE_TOL);
the pruned dynamic model passes the full checker and runs at batch 1 and 3 with the original output
shapes. The attention tiny configs are tests/test_zoo_dynamic.py's (both exporters there).

For CI time the slowest cases (TOO_SLOW, with the seconds each took on a shared 2-core machine) are
left to `benchmarks/zoo_sweep.py --shapes`; the 15 cases kept here took about 60 s together. When
this file was written all 20 CNN cases, slow ones included, removed exactly the same share of
params dynamic and static.
"""

from __future__ import annotations

import pytest

from torchvision_zoo import BY_NAME, ci_cases, export_cached, prune_and_run

pytestmark = pytest.mark.zoo

SHARE_TOL = 1e-3
"""Dynamic and static exports count the same weights; their shares differ by a few shape constants."""

ATTENTION = {"vit_tiny_config", "swin_tiny_config"}

TOO_SLOW = {
    "inception_v3": 25, "efficientnet_v2_s": 26,
    "mobilenet_v3_small": 21,  # MobileNetV3 blocks: the LR-ASPP backbone stays
    "regnet_x_400mf": 20,  # RegNet: regnet_y_400mf stays (3 s)
    "deeplabv3_mobilenet_v3_large": 9,  # same backbone and run-time Resize sizes as LR-ASPP
}
"""Case -> seconds it took (export both shape modes, prune and run both)."""

CASES = ci_cases(skip=ATTENTION | set(TOO_SLOW))


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_dynamic_batch_prunes_as_much_as_the_static_export(name, variant, zoo_dir):
    entry = BY_NAME[name]
    dynamic = export_cached(entry, variant, zoo_dir, shapes="dynamic")
    assert not dynamic.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    _, check = prune_and_run(dynamic, ratio=0.5)  # full checker; runs at batch 1 and 3
    assert check.shapes_equal
    assert check.groups_pruned > 0, check.frozen_reasons
    _, twin = prune_and_run(export_cached(entry, variant, zoo_dir, shapes="static"), ratio=0.5)
    share, twin_share = (1 - c.params_after / c.params_before for c in (check, twin))
    assert share == pytest.approx(twin_share, abs=SHARE_TOL), (share, twin_share, check.frozen_reasons)
