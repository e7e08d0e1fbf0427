"""The registration summary groups skipped modules by (type, reason), with their parameter share."""

from __future__ import annotations

from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.summary import skipped_rows


def resnet_like(blocks: int = 5) -> nn.Module:
    layers = [
        nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)) for _ in range(blocks)
    ]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.LayerNorm(4))


def test_batchnorms_are_one_row_with_count_params_and_share():
    model = resnet_like(5)
    pre = KFACPreconditioner(model)
    total = sum(p.numel() for p in model.parameters())
    rows = skipped_rows(pre.skipped, total)
    assert [row[1] for row in rows] == ["BatchNorm2d", "LayerNorm"]
    label, _, _, _, params, status = rows[0]
    assert label == "5 modules: 0.1, 1.1, 2.1, +2 more"
    bn_params = 5 * (3 + 3)
    assert params == f"{bn_params:,}"
    (reason,) = {s.reason for s in pre.skipped if s.type_name == "BatchNorm2d"}
    assert "BatchNorm2d is not a supported layer type" in reason
    assert status == f"skipped: {reason} ({100.0 * bn_params / total:.1f}% of params)"
    assert rows[1][0] == "7" and rows[1][4] == "8"  # a group of one keeps its own name
    summary = pre.summary()
    assert (
        summary.count("BatchNorm2d") == 2
    )  # the grouped row (type and reason), no per-module rows
    assert "1.1 " not in summary.replace("1.1, ", "")


def test_different_reasons_of_one_type_stay_apart():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    pre = KFACPreconditioner(model, skip_layers=["^0$", "^1$"])
    rows = skipped_rows(pre.skipped, sum(p.numel() for p in model.parameters()))
    assert [row[0] for row in rows] == ["0", "1"]  # matched different patterns: two reasons
    assert all("Linear" == row[1] and "matched skip_layers" in row[5] for row in rows)
