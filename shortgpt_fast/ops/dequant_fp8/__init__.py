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

KERNEL = "fp8_block_dequantize_to"  # the extension's entry point; an older build without it is reported, not called


# Output dtypes the kernel writes directly; any other is written in float32 and cast by torch.
NATIVE_OUT_DTYPES = (torch.float32, torch.bfloat16)


def why_not_native(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   out: Optional[torch.Tensor] = None) -> list[str]:
    """Why the C++ kernel cannot dequantize these inputs (into `out`, when given), one line each; [] when it can.
    Never raises."""
    from ... import _native

    reasons = []
    try:
        _native.load("FP8 dequantization", needs=KERNEL)
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
    if out is not None:
        if out.device.type != "cpu" or out.dtype not in NATIVE_OUT_DTYPES:
            reasons.append(f"out is {out.dtype} on {out.device}, not float32 or bfloat16 on the CPU")
        if out.shape != weight.shape or (out.dim() == 2 and out.shape[1] > 1 and out.stride(1) != 1):
            reasons.append(f"out has shape {tuple(out.shape)} or strided columns, not {tuple(weight.shape)} with "
                           "contiguous rows")
    return reasons


def fp8_block_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         num_threads: Optional[int] = None, dtype: torch.dtype = torch.float32,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[rows, cols] = float(weight) * scale_inv of each element's block, in float32, then cast to `dtype`.

    weight: float8_e4m3fn [rows, cols]; scale_inv: [ceil(rows / block[0]), ceil(cols / block[1])]. out: where to
    write it (a [rows, cols] view with contiguous rows, e.g. one expert's rows of a fused tensor); its dtype wins
    over `dtype`. On the CPU the C++ kernel runs (about 10x torch's cast on 2 cores) and writes float32 or bfloat16
    directly, with the bits of torch's two roundings; elsewhere, or without the extension, torch does. Returns
    `out` when given. Raises ValueError when scale_inv is not the block grid of weight, or out has another shape.
    """
    if weight.dim() != 2 or scale_inv.shape != scale_grid(weight.shape, block):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} is not the {block} block grid of a weight of "
                         f"shape {tuple(weight.shape)}")
    if out is not None and out.shape != weight.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, the weight {tuple(weight.shape)}")
    dtype = out.dtype if out is not None else dtype
    target = out if out is not None else torch.empty(weight.shape, dtype=dtype)
    if dtype not in NATIVE_OUT_DTYPES or why_not_native(weight, scale_inv, block, target):
        value = fp8_block_dequantize_reference(weight, scale_inv, block).to(dtype)
        return value if out is None else out.copy_(value)
    from ... import _native
    from ..bi_reduce.cpp import DTYPE_CODES

    scale = scale_inv.to(torch.float32).contiguous()
    rows, cols = weight.shape
    _native.load("FP8 dequantization", needs=KERNEL).fp8_block_dequantize_to(
        weight.data_ptr(), weight.stride(0) if rows > 1 else cols, scale.data_ptr(), rows, cols, block[0], block[1],
        target.data_ptr(), target.stride(0) if rows > 1 else cols, DTYPE_CODES[dtype],
        torch.get_num_threads() if num_threads is None else int(num_threads))
    return target
