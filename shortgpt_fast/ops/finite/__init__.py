"""finite: whether a weight tensor holds only finite values, the check streamed scoring runs on every weight it loads.

`all_finite(t)` counts NaN/inf by exponent bits in C++ (csrc/dequant/finite.cpp) for contiguous float32, bfloat16
and float16 CPU tensors, at memory speed, and falls back to torch's `isfinite(t).all()` (the reference) for
anything else; `why_not_native(t)` says why the kernel does not take a tensor.
"""
from __future__ import annotations

import torch

from ..bi_reduce.cpp import DTYPE_CODES as _DTYPE_CODES  # the one mapping onto sgf::DType (csrc/common.h)

__all__ = ["all_finite", "all_finite_reference", "why_not_native"]


def all_finite_reference(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def why_not_native(tensor: torch.Tensor) -> list[str]:
    """Why the C++ count cannot check `tensor`, one line each; [] when it can. Never raises."""
    from ... import _native

    reasons = []
    try:
        _native.load("the finiteness check", needs="count_nonfinite")
    except _native.NativeExtensionError as err:
        reasons.append(str(err))
    if tensor.device.type != "cpu":
        reasons.append(f"not a CPU tensor ({tensor.device})")
    if tensor.dtype not in _DTYPE_CODES:
        reasons.append(f"dtype {tensor.dtype} is not float32, bfloat16 or float16")
    if not tensor.is_contiguous():
        reasons.append("not contiguous")
    return reasons


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element of the floating tensor `tensor` is NaN or infinite."""
    if why_not_native(tensor):
        return all_finite_reference(tensor)
    from ... import _native

    ext = _native.load("the finiteness check", needs="count_nonfinite")
    return ext.count_nonfinite(tensor.data_ptr(), tensor.numel(), _DTYPE_CODES[tensor.dtype],
                               torch.get_num_threads()) == 0
