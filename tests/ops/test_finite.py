"""The C++ finiteness check agrees with torch.isfinite on every dtype it takes, wherever the NaN or inf sits."""
from __future__ import annotations

import pytest
import torch

from shortgpt_fast.ops.finite import all_finite, all_finite_reference, why_not_native

pytestmark = pytest.mark.skipif(bool(why_not_native(torch.zeros(1))), reason="the extension lacks count_nonfinite")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 7, 4099])
def test_agrees_with_torch_for_every_bad_value_and_position(dtype, numel):
    g = torch.Generator().manual_seed(numel)
    base = (torch.randn(numel, generator=g) * 100).to(dtype)
    assert not why_not_native(base)
    assert all_finite(base) is True
    finfo = torch.finfo(dtype)
    extremes = base.clone()
    extremes[0], extremes[-1] = finfo.max, -finfo.max  # the largest finite values are finite
    assert all_finite(extremes) is True
    for bad in (float("nan"), float("inf"), float("-inf")):
        for position in {0, numel // 2, numel - 1}:
            t = base.clone()
            t[position] = bad
            assert all_finite(t) is False and all_finite_reference(t) is False, (bad, position)


def test_other_tensors_take_torchs_path():
    strided = torch.randn(6, 8)[:, ::2]
    assert "not contiguous" in why_not_native(strided)
    assert all_finite(strided) is True
    assert why_not_native(torch.zeros(3, dtype=torch.float64)) == ["dtype torch.float64 is not float32, bfloat16 or "
                                                                    "float16"]
    t = torch.zeros(3, dtype=torch.float64)
    t[1] = float("nan")
    assert all_finite(t) is False
