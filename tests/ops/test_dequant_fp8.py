"""The C++ FP8 block dequantization equals torch's arithmetic and compressed-tensors' dequantizer to the bit."""
from __future__ import annotations

import pytest
import torch

from shortgpt_fast.ops.dequant_fp8 import (
    fp8_block_dequantize,
    fp8_block_dequantize_reference,
    scale_grid,
    why_not_native,
)

pytestmark = pytest.mark.skipif(
    bool(why_not_native(torch.zeros(1, 1, dtype=torch.float8_e4m3fn), torch.ones(1, 1), (1, 1))),
    reason="the extension was built without the FP8 kernel")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # tells -0.0 from 0.0 and NaN payloads apart


def random_fp8(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)


def test_every_e4m3_code_matches_torchs_cast():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    for scale in (1.0, 0.0173, 3.0e-5, 448.0):
        got = fp8_block_dequantize(codes, torch.full((1, 1), scale), (16, 16))
        assert torch.equal(bits(got), bits(codes.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)))


@pytest.mark.parametrize("rows, cols, block", [(1, 1, (128, 128)), (129, 130, (128, 128)), (577, 193, (128, 128)),
                                               (40, 48, (16, 16)), (33, 7, (5, 3)), (256, 128, (128, 128))])
def test_odd_shapes_and_partial_blocks_equal_the_reference(rows, cols, block):
    weight = random_fp8(rows, cols, seed=rows * 1000 + cols)
    scale = torch.rand(scale_grid(weight.shape, block), generator=torch.Generator().manual_seed(1)) * 1e-2
    got = fp8_block_dequantize(weight, scale, block)
    assert got.dtype == torch.float32 and got.shape == weight.shape
    assert torch.equal(bits(got), bits(fp8_block_dequantize_reference(weight, scale, block)))


def test_strided_rows_and_thread_counts_give_the_same_bits():
    wide = random_fp8(300, 520, seed=5)
    weight = wide[:, 7:7 + 401]  # rows 520 elements apart: the kernel reads the row stride
    assert weight.stride(0) == 520
    scale = torch.rand(scale_grid(weight.shape, (128, 128)))
    expected = fp8_block_dequantize_reference(weight, scale, (128, 128))
    for threads in (1, 2, 3):
        assert torch.equal(bits(fp8_block_dequantize(weight, scale, (128, 128), num_threads=threads)), bits(expected))


def test_equals_compressed_tensors_block_dequantizer():
    converters = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer")
    weight = random_fp8(576, 300, seed=9)  # DeepSeek-V3's kv_a_proj_with_mqa has 576 rows: a partial block row
    weight = torch.where(weight.to(torch.float32).isnan(), torch.zeros((), dtype=torch.float8_e4m3fn), weight)
    scale = torch.rand(scale_grid(weight.shape, (128, 128)))
    library = converters.FP8BlockDequantizer(targets=frozenset({"m"}), weight_block_size=(128, 128),
                                             dtype=torch.float32)
    library._checkpoint_targets = frozenset({"m"})
    expected = library.process({"m.weight": weight, "m.weight_scale_inv": scale})["m.weight"]
    assert torch.equal(bits(fp8_block_dequantize(weight, scale, (128, 128))), bits(expected))


def test_inputs_the_kernel_cannot_take_are_named_or_refused():
    weight = random_fp8(10, 10, seed=0)
    assert any("not float8_e4m3fn" in r for r in why_not_native(weight.to(torch.float32), torch.ones(1, 1), (16, 16)))
    assert any("not the block grid" in r for r in why_not_native(weight, torch.ones(2, 1), (16, 16)))
    with pytest.raises(ValueError, match=r"is not the \(16, 16\) block grid"):
        fp8_block_dequantize(weight, torch.ones(2, 1), (16, 16))


def test_bfloat16_output_equals_torchs_two_roundings_on_every_finite_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    # Scales whose products land on bfloat16 ties and beyond its range: 3.0e38 * 448 overflows to inf in bfloat16.
    for scale in (1.0, 0.0173, 3.0e-5, 448.0, 1.0 + 2 ** -8, 3.0e38):
        got = fp8_block_dequantize(codes, torch.full((1, 1), scale), (16, 16), dtype=torch.bfloat16)
        want = (codes.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)).to(torch.bfloat16)
        assert got.dtype == torch.bfloat16
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_into_a_slice_of_a_larger_tensor(dtype):
    weight = random_fp8(129, 130, seed=3)
    weight = torch.where(weight.to(torch.float32).isnan(), torch.zeros((), dtype=torch.float8_e4m3fn), weight)
    scale = torch.rand(scale_grid(weight.shape, (128, 128)), generator=torch.Generator().manual_seed(2))
    fused = torch.full((3, 300, 130), 7.0, dtype=dtype)  # expert 1's rows 40..169 of a fused [experts, rows, cols]
    returned = fp8_block_dequantize(weight, scale, (128, 128), out=fused[1, 40:169])
    assert returned.data_ptr() == fused[1, 40:169].data_ptr()
    want = fp8_block_dequantize_reference(weight, scale, (128, 128)).to(dtype)
    assert torch.equal(fused[1, 40:169].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    untouched = torch.ones_like(fused, dtype=torch.bool)
    untouched[1, 40:169] = False
    assert bool((fused[untouched] == 7.0).all())  # nothing outside the slice is written
    # Strided output rows: a column window of a wider tensor.
    wide = torch.zeros(129, 200, dtype=dtype)
    fp8_block_dequantize(weight, scale, (128, 128), out=wide[:, 50:180])
    assert torch.equal(wide[:, 50:180], want) and bool((wide[:, :50] == 0).all() and (wide[:, 180:] == 0).all())
    assert not why_not_native(weight, scale, (128, 128), wide[:, 50:180])
    assert any("not float32 or bfloat16" in r for r in why_not_native(weight, scale, (128, 128),
                                                                      torch.empty(129, 130, dtype=torch.float16)))
