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
