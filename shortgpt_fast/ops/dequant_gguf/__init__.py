"""dequant_gguf: GGUF tensor bytes to float32, for the block types most GGUF releases are made of.

`gguf_dequantize(raw, ggml_type, shape)` runs the C++ kernel (csrc/dequant/gguf_blocks.cpp) for F16, BF16, Q4_0,
Q4_1, Q8_0, Q4_K and Q6_K and gguf-py (`reference.py`) for every other type; `why_not_native(ggml_type)` says why
the kernel does not take a type. The kernel repeats gguf-py's float32 arithmetic step for step, so both give the
same bits.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .reference import gguf_dequantize_reference

__all__ = ["gguf_dequantize", "gguf_dequantize_reference", "why_not_native"]


def why_not_native(ggml_type: int) -> list[str]:
    """Why the C++ kernel cannot dequantize tensors of `ggml_type`, one line each; [] when it can. Never raises."""
    from ... import _native

    try:
        ext = _native.load("GGUF dequantization", needs="gguf_dequantize")
    except _native.NativeExtensionError as err:
        return [str(err)]
    if not ext.gguf_block_layout(int(ggml_type)):
        return [f"ggml type {ggml_type} is not one the C++ kernel decodes (F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)"]
    return []


def gguf_dequantize(raw: np.ndarray, ggml_type: int, shape: tuple, num_threads: Optional[int] = None) -> np.ndarray:
    """float32 numpy array of `shape` (numpy order, last dimension contiguous) from the tensor's stored bytes `raw`
    (uint8, as read from the file). Raises ValueError when the byte count does not match the shape."""
    if why_not_native(ggml_type):
        return gguf_dequantize_reference(raw, ggml_type, shape)
    from ... import _native

    ext = _native.load("GGUF dequantization", needs="gguf_dequantize")
    elements, nbytes = ext.gguf_block_layout(int(ggml_type))
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if count % elements or raw.size != count // elements * nbytes:
        raise ValueError(f"{raw.size} bytes are not {count} elements of ggml type {ggml_type} "
                         f"({nbytes} bytes per {elements})")
    out = np.empty(shape, dtype=np.float32)
    ext.gguf_dequantize(int(ggml_type), raw.ctypes.data, raw.size, out.ctypes.data,
                        torch.get_num_threads() if num_threads is None else int(num_threads))
    return out
