"""dequant_fp8: FP8 (e4m3fn) block-scaled weights to float32, the layout of DeepSeek-V3/R1, Kimi-K2 and Qwen3-FP8
checkpoints (one float32 `weight_scale_inv` per block, the last block row/column possibly partial).

`fp8_block_dequantize(weight, scale_inv, block)` runs the C++ kernel (csrc/dequant/fp8_block.cpp) when it can and
torch's own arithmetic (`reference.py`) otherwise; `why_not_native(...)` says why the kernel cannot run given inputs.
Both compute float(e4m3) * scale in float32 with one rounding, so they agree to the bit.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import fp8_block_dequantize_reference, scale_grid

__all__ = ["fp8_block_dequantize", "fp8_block_dequantize_reference", "scale_grid", "why_not_native"]


def why_not_native(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> list[str]:
    """Why the C++ kernel cannot dequantize these inputs, one line each; [] when it can. Never raises."""
    from ... import _native

    reasons = []
    try:
        _native.load("FP8 dequantization", needs="fp8_block_dequantize")
    except _native.NativeExtensionError as err:
        reasons.append(str(err))
    if weight.device.type != "cpu" or scale_inv.device.type != "cpu":
        reasons.append(f"not a CPU tensor ({weight.device}); torch dequantizes on the device")
    if weight.dtype != torch.float8_e4m3fn:
        reasons.append(f"weight dtype is {weight.dtype}, not float8_e4m3fn")
    if weight.dim() != 2 or (weight.shape[1] > 1 and weight.stride(1) != 1):
        reasons.append("weight is not a 2-D tensor with contiguous rows")
    elif scale_inv.shape != scale_grid(weight.shape, block):
        reasons.append(f"scale_inv has shape {tuple(scale_inv.shape)}, not the block grid "
                       f"{scale_grid(weight.shape, block)}")
    return reasons


def fp8_block_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         num_threads: Optional[int] = None) -> torch.Tensor:
    """float32 [rows, cols] = float(weight) * scale_inv of each element's block.

    weight: float8_e4m3fn [rows, cols]; scale_inv: [ceil(rows / block[0]), ceil(cols / block[1])]. On the CPU the
    C++ kernel runs (about 10x torch's cast on 2 cores); elsewhere, or without the extension, torch does. Raises
    ValueError when scale_inv is not the block grid of weight.
    """
    if weight.dim() != 2 or scale_inv.shape != scale_grid(weight.shape, block):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} is not the {block} block grid of a weight of "
                         f"shape {tuple(weight.shape)}")
    if why_not_native(weight, scale_inv, block):
        return fp8_block_dequantize_reference(weight, scale_inv, block)
    from ... import _native

    scale = scale_inv.to(torch.float32).contiguous()
    out = torch.empty(weight.shape, dtype=torch.float32)
    rows, cols = weight.shape
    _native.load("FP8 dequantization", needs="fp8_block_dequantize").fp8_block_dequantize(
        weight.data_ptr(), weight.stride(0) if rows > 1 else cols, scale.data_ptr(), rows, cols, block[0], block[1],
        out.data_ptr(), torch.get_num_threads() if num_threads is None else int(num_threads))
    return out
