"""Launcher for the fused C++ BI reduction (csrc/bi_reduce/): the "cpp" backend.

The extension is optional: when `shortgpt_fast._C` is missing or stale, this module still imports, and the
backend reports why in `not_supported_reasons`, so forcing it with SHORTGPT_FAST_BACKEND=cpp shows how to fix it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .contract import NUM_STATS, BIReduceInputs, seq_offsets, validate

# Must match sgf::DType in csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

try:
    from shortgpt_fast import _C

    _EXTENSION_PROBLEM: Optional[str] = None
    if not hasattr(_C, "bi_reduce_cpu"):
        _EXTENSION_PROBLEM = (
            "shortgpt_fast._C was built without bi_reduce_cpu; rebuild it with `pip install -e . --no-build-isolation`"
        )
except ImportError as exc:
    _C = None
    _EXTENSION_PROBLEM = (
        f"the C++ extension shortgpt_fast._C could not be imported ({exc}); build it with "
        "`pip install -e . --no-build-isolation` (needs a C++17 compiler with OpenMP)"
    )


def _unit_inner_stride(t: torch.Tensor) -> bool:
    return t.shape[1] <= 1 or t.stride(1) == 1


def not_supported_reasons(inputs: BIReduceInputs) -> list:
    """Why the C++ kernel cannot run `inputs` (a validated BIReduceInputs), as a list of one-line str; [] when it can.

    Reasons: the extension shortgpt_fast._C is missing or lacks bi_reduce_cpu, the tensors are not on the CPU, or
    the hidden dimension is not contiguous (inner stride != 1). Never raises.
    """
    reasons = []
    if _EXTENSION_PROBLEM is not None:
        reasons.append(_EXTENSION_PROBLEM)
    if inputs.x_in.device.type != "cpu":
        reasons.append(f"not a CPU tensor (inputs are on {inputs.x_in.device})")
    if not (_unit_inner_stride(inputs.x_in) and _unit_inner_stride(inputs.x_out)):
        reasons.append("the hidden dimension is not contiguous (inner stride != 1); call .contiguous() first")
    return reasons


def run(inputs: BIReduceInputs, num_threads: Optional[int] = None, isa: str = "auto",
        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the C++ kernel; num_threads defaults to torch.get_num_threads(), isa to the best this CPU runs.

    out: optional float64 [num_seqs, NUM_STATS] CPU buffer, every entry of which is overwritten.

    inputs: a validated BIReduceInputs on the CPU. Returns float64 [num_seqs, NUM_STATS] (`out` when given).
    Raises RuntimeError when the extension is missing or stale, ValueError for an `out` of the wrong shape, dtype,
    layout or device.
    """
    if _EXTENSION_PROBLEM is not None:
        raise RuntimeError(_EXTENSION_PROBLEM)
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    x_in, x_out = inputs.x_in, inputs.x_out
    tokens, hidden = x_in.shape
    offsets = seq_offsets(inputs.seq_index, inputs.num_seqs).contiguous()
    mask = inputs.mask.contiguous()  # torch.bool is one byte per element, read as uint8
    if out is None:
        out = torch.empty(inputs.num_seqs, NUM_STATS, dtype=torch.float64)
    elif (out.shape != (inputs.num_seqs, NUM_STATS) or out.dtype != torch.float64 or not out.is_contiguous()
          or out.device.type != "cpu"):
        raise ValueError(f"out must be a contiguous float64 CPU tensor of shape [{inputs.num_seqs}, {NUM_STATS}]")
    _C.bi_reduce_cpu(
        x_in.data_ptr(), x_in.stride(0), x_out.data_ptr(), x_out.stride(0), DTYPE_CODES[x_in.dtype],
        tokens, hidden, mask.data_ptr(), offsets.data_ptr(), inputs.num_seqs, out.data_ptr(), threads, isa,
    )
    return out


def bi_reduce_cpp(x_in, x_out, mask=None, seq_index=None, num_seqs=None, *, num_threads=None, isa="auto", out=None):
    """bi_reduce forced onto the C++ kernel with an explicit thread count and ISA build (tests, benchmarks).

    Same arguments and result as bi_reduce: float64 [num_seqs, NUM_STATS]. Example: bi_reduce_cpp(a, b, num_threads=1).
    Raises BIReduceError for inputs validate refuses, RuntimeError listing why the C++ backend cannot run them.
    """
    inputs = validate(x_in, x_out, mask, seq_index, num_seqs)
    reasons = not_supported_reasons(inputs)
    if reasons:
        raise RuntimeError("cpp backend cannot run these inputs: " + "; ".join(reasons))
    return run(inputs, num_threads=num_threads, isa=isa, out=out)


def available_isas() -> list:
    """The instruction-set builds of the C++ kernel compiled into shortgpt_fast._C, as a list of str
    (what `_C.bi_reduce_isas()` reports; values accepted by `isa=` in `run`/`bi_reduce_cpp`).

    Returns [] when the extension is missing or stale, instead of raising.
    """
    return list(_C.bi_reduce_isas()) if _EXTENSION_PROBLEM is None else []

