"""torch's own FP8 block dequantization: the reference the C++ kernel is held to, and its fallback off the CPU."""
from __future__ import annotations

import torch


def scale_grid(shape, block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale grid of a [rows, cols] weight in `block` blocks (partial last blocks count)."""
    rows, cols = shape
    return (-(-rows // block[0]), -(-cols // block[1]))


def fp8_block_dequantize_reference(weight: torch.Tensor, scale_inv: torch.Tensor,
                                   block: tuple[int, int]) -> torch.Tensor:
    """float32 float(weight) * scale_inv per block, as compressed-tensors' FP8BlockDequantizer computes it."""
    rows, cols = weight.shape
    scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return weight.to(torch.float32) * scale.to(weight.device)
