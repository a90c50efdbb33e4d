"""Fused BI reduction in Triton (GPU, or CPU tensors under TRITON_INTERPRET=1): kernels and launcher in one file.

Stage 1 (`_bi_row_terms_kernel`): one program per block of rows reads each row of x_in and x_out once, keeps
fp32 lane accumulators, folds them with a fixed halving tree, and writes the float64 per-row terms
(1 - cos, angular, relative magnitude). Stage 2 (`_bi_seq_reduce_kernel`): one program per sequence walks its
rows block by block, in order, and accumulates in float64. No float atomics. Stage 1's tree is fixed by
constants whatever configuration autotuning picks, and stage 2 always launches with one fixed configuration,
so the bits do not depend on autotuning.

Importing this module never fails for want of Triton or a GPU: the backend then lists the reason instead.
"""
from __future__ import annotations

import os

import torch

from .contract import BACKEND_ENV, EPS, NUM_STATS, BIReduceInputs, Stat, seq_offsets
from .registry import forced_backend

try:
    import triton
    import triton.language as tl

    _TRITON_PROBLEM = None
except ImportError as exc:  # the op still works through the other backends
    triton = None
    tl = None
    _TRITON_PROBLEM = f"triton is not installed ({exc}); `pip install triton` on a CUDA machine"

# Lanes per row in stage 1, and the whole stage-2 configuration: part of the numerics (they fix the summation
# trees), so they are constants, never tuned.
LANES = 256  # a power of two: the halving tree needs it
LOG2_LANES = LANES.bit_length() - 1
# Large steps: one program walks a whole sequence, so its serial step count is what stage 2 costs.
SEQ_BLOCK = 1024
SEQ_WARPS = 4
# Rows per stage-1 program when nothing is tuned (interpreter, or a GPU without autotuning).
DEFAULT_BLOCK_ROWS = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


if triton is not None:
    # Output layout of stage 2, from contract.Stat: module-level constexprs are the globals a jit function may read.
    NUM_STATS_ = tl.constexpr(NUM_STATS)
    STAT_TOKENS = tl.constexpr(int(Stat.TOKENS))
    STAT_SUM_OMC = tl.constexpr(int(Stat.SUM_ONE_MINUS_COS))
    STAT_SUM_ANG = tl.constexpr(int(Stat.SUM_ANGULAR))
    STAT_SUM_REL = tl.constexpr(int(Stat.SUM_REL_MAGNITUDE))
    STAT_LAST_OMC = tl.constexpr(int(Stat.LAST_ONE_MINUS_COS))
    STAT_LAST_ANG = tl.constexpr(int(Stat.LAST_ANGULAR))

    @triton.jit
    def _row_total(x, LOG2_WIDTH: tl.constexpr):
        # Halving tree x[:, j] + x[:, j + width/2]: a sum of two terms has the same bits in either order, so the
        # tree is fixed by LOG2_WIDTH alone, whatever layout or num_warps the compiler picks (tl.sum over the
        # whole axis would follow the layout).
        for _ in tl.static_range(LOG2_WIDTH):
            x = tl.sum(tl.reshape(x, [x.shape[0], 2, x.shape[1] // 2]), axis=1)
        return tl.reshape(x, [x.shape[0]])

    @triton.jit
    def _acos_f64(x):
        # fdlibm's rational approximation of acos, in float64: libdevice has acos, but the interpreter does not.
        # The constants stay literals inside the expressions: a literal takes the fp64 type of the tensor it
        # meets, whereas one bound to a local name first becomes an fp32 scalar and loses half its digits.
        small = tl.abs(x) < 0.5
        z = tl.where(small, x * x, tl.where(x < 0.0, (1.0 + x) * 0.5, (1.0 - x) * 0.5))
        p = z * (1.66666666666666657415e-01 + z * (-3.25565818622400915405e-01 + z * (
            2.01212532134862925881e-01 + z * (-4.00555345006794114027e-02 + z * (
                7.91534994289814532176e-04 + z * 3.47933107596021167570e-05)))))
        q = 1.0 + z * (-2.40339491173441421878e00 + z * (2.02094576023350569471e00 + z * (
            -6.88283971605453293030e-01 + z * 7.70381505559019352791e-02)))
        r = p / q
        s = tl.sqrt(z)
        near_zero = 1.57079632679489655800e00 - (x - (6.12323399573676603587e-17 - x * r))  # pi/2 split hi + lo
        near_minus_one = 3.14159265358979311600e00 - 2.0 * (s + (r * s - 6.12323399573676603587e-17))
        near_one = 2.0 * (s + r * s)
        return tl.where(small, near_zero, tl.where(x < 0.0, near_minus_one, near_one))

    @triton.jit
    def _bi_row_terms_kernel(
        x_in_ptr, x_out_ptr, mask_ptr, terms_ptr,
        tokens, hidden,
        in_row_stride, in_col_stride, out_row_stride, out_col_stride,
        EPS_: tl.constexpr, BLOCK_ROWS: tl.constexpr, LANES_: tl.constexpr, LOG2_LANES: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        in_range = rows < tokens
        # Masked rows are never loaded, so NaN or garbage there cannot reach the sums.
        valid = (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0) & in_range
        rows64 = rows.to(tl.int64)
        lanes = tl.arange(0, LANES_)
        dot = tl.zeros([BLOCK_ROWS, LANES_], dtype=tl.float32)
        sq_in = tl.zeros([BLOCK_ROWS, LANES_], dtype=tl.float32)
        sq_out = tl.zeros([BLOCK_ROWS, LANES_], dtype=tl.float32)
        sq_diff = tl.zeros([BLOCK_ROWS, LANES_], dtype=tl.float32)
        for start in range(0, hidden, LANES_):
            cols = (start + lanes).to(tl.int64)
            load_mask = valid[:, None] & (cols < hidden)[None, :]
            a = tl.load(x_in_ptr + rows64[:, None] * in_row_stride + cols[None, :] * in_col_stride,
                        mask=load_mask, other=0.0).to(tl.float32)
            b = tl.load(x_out_ptr + rows64[:, None] * out_row_stride + cols[None, :] * out_col_stride,
                        mask=load_mask, other=0.0).to(tl.float32)
            diff = b - a
            dot += a * b
            sq_in += a * a
            sq_out += b * b
            sq_diff += diff * diff
        dot64 = _row_total(dot, LOG2_LANES).to(tl.float64)
        norm_in = tl.sqrt(_row_total(sq_in, LOG2_LANES).to(tl.float64))
        norm_out = tl.sqrt(_row_total(sq_out, LOG2_LANES).to(tl.float64))
        norm_diff = tl.sqrt(_row_total(sq_diff, LOG2_LANES).to(tl.float64))
        # Comparisons rather than maximum/minimum, so NaN in a valid row propagates as in the torch backend.
        raw_denom = norm_in * norm_out
        denom = tl.where(raw_denom < EPS_, EPS_, raw_denom)
        # Law of cosines instead of dot/denom: nearly parallel rows would lose 1 - cos to float32 cancellation.
        gap = tl.abs(norm_in - norm_out)
        cos = tl.where(raw_denom < EPS_, dot64 / denom,
                       1.0 - (norm_diff - gap) * (norm_diff + gap) / (2.0 * denom))
        cos = tl.where(cos < -1.0, -1.0, cos)
        cos = tl.where(cos > 1.0, 1.0, cos)
        one_minus_cos = 1.0 - cos
        angular = _acos_f64(cos) / 3.14159265358979311600e00
        rel_magnitude = norm_diff / tl.where(norm_out < EPS_, EPS_, norm_out)
        base = terms_ptr + rows64 * 3
        tl.store(base + 0, one_minus_cos, mask=in_range)
        tl.store(base + 1, angular, mask=in_range)
        tl.store(base + 2, rel_magnitude, mask=in_range)

    @triton.jit
    def _bi_seq_reduce_kernel(terms_ptr, mask_ptr, offsets_ptr, out_ptr, SEQ_BLOCK_: tl.constexpr):
        seq = tl.program_id(0)
        first = tl.load(offsets_ptr + seq)
        end = tl.load(offsets_ptr + seq + 1)
        offs = tl.arange(0, SEQ_BLOCK_)
        count = tl.zeros([1], dtype=tl.float64)
        sum_omc = tl.zeros([1], dtype=tl.float64)
        sum_ang = tl.zeros([1], dtype=tl.float64)
        sum_rel = tl.zeros([1], dtype=tl.float64)
        last_valid = tl.full([1], -1, dtype=tl.int64)
        for block_start in range(first, end, SEQ_BLOCK_):
            rows = block_start + offs
            in_seq = rows < end
            valid = (tl.load(mask_ptr + rows, mask=in_seq, other=0) != 0) & in_seq
            base = terms_ptr + rows.to(tl.int64) * 3
            omc = tl.where(valid, tl.load(base + 0, mask=valid, other=0.0), 0.0)
            ang = tl.where(valid, tl.load(base + 1, mask=valid, other=0.0), 0.0)
            rel = tl.where(valid, tl.load(base + 2, mask=valid, other=0.0), 0.0)
            # tl.sum's tree follows the layout, which is fixed here: stage 2 always runs SEQ_BLOCK rows
            # per step on SEQ_WARPS warps, never tuned.
            count += tl.sum(valid.to(tl.float64), axis=0)
            sum_omc += tl.sum(omc, axis=0)
            sum_ang += tl.sum(ang, axis=0)
            sum_rel += tl.sum(rel, axis=0)
            block_last = tl.max(tl.where(valid, rows.to(tl.int64), -1), axis=0)
            last_valid = tl.maximum(last_valid, block_last)
        has_last = last_valid >= 0
        last_row = tl.where(has_last, last_valid, 0)
        last_omc = tl.load(terms_ptr + last_row * 3 + 0, mask=has_last, other=0.0)
        last_ang = tl.load(terms_ptr + last_row * 3 + 1, mask=has_last, other=0.0)
        one = tl.arange(0, 1)
        # Columns follow contract.Stat.
        out = out_ptr + seq * NUM_STATS_ + one
        tl.store(out + STAT_TOKENS, count)
        tl.store(out + STAT_SUM_OMC, sum_omc)
        tl.store(out + STAT_SUM_ANG, sum_ang)
        tl.store(out + STAT_SUM_REL, sum_rel)
        tl.store(out + STAT_LAST_OMC, tl.where(has_last, last_omc, 0.0))
        tl.store(out + STAT_LAST_ANG, tl.where(has_last, last_ang, 0.0))

    _tuned_row_kernel = None

    def _row_kernel_for_gpu():
        """Autotuned stage 1, built on first GPU use: the autotuner needs a live driver to benchmark."""
        global _tuned_row_kernel
        if _tuned_row_kernel is None:
            configs = [
                triton.Config({"BLOCK_ROWS": rows}, num_warps=warps, num_stages=stages)
                for rows in (1, 2, 4, 8)
                for warps in (2, 4, 8)
                for stages in (2, 3)
            ]
            _tuned_row_kernel = triton.autotune(configs=configs, key=["hidden", "in_col_stride", "out_col_stride"])(
                _bi_row_terms_kernel
            )
        return _tuned_row_kernel


def not_supported_reasons(inputs: BIReduceInputs) -> list:
    """Why the Triton backend cannot run `inputs` (a BIReduceInputs), as a list of one-line str; [] when it can.

    [] for CUDA tensors. CPU tensors only under TRITON_INTERPRET=1 and when forced with SHORTGPT_FAST_BACKEND=triton
    (the interpreter is far slower than the C++ kernel). When Triton could not be imported, the only reason is that
    import problem. Never raises.
    """
    if _TRITON_PROBLEM is not None:
        return [_TRITON_PROBLEM]
    device = inputs.x_in.device
    if device.type == "cuda":
        return []
    if device.type == "cpu" and _interpreting():
        # The interpreter is orders of magnitude slower than the C++ kernel: a test suite that sets
        # TRITON_INTERPRET=1 globally must not route every CPU call through it, only the ones that ask.
        if forced_backend() == "triton":
            return []
        return [f"interpreted Triton runs CPU tensors only when forced with {BACKEND_ENV}=triton"]
    return [f"not a CUDA tensor (inputs are on {device}); set TRITON_INTERPRET=1 and {BACKEND_ENV}=triton to "
            "interpret it on CPU tensors"]


def run(inputs: BIReduceInputs, autotune: bool | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch both stages. autotune defaults to True on a real GPU; out: optional float64 [num_seqs, NUM_STATS].

    inputs: a validated BIReduceInputs (CUDA, or CPU when interpreted). Returns float64 [num_seqs, NUM_STATS].
    Raises RuntimeError when Triton could not be imported, ValueError for an `out` that is not a contiguous float64
    [num_seqs, NUM_STATS] tensor.
    """
    if _TRITON_PROBLEM is not None:
        raise RuntimeError(_TRITON_PROBLEM)
    x_in, x_out = inputs.x_in, inputs.x_out
    tokens, hidden = x_in.shape
    device = x_in.device
    mask = inputs.mask.contiguous()
    offsets = seq_offsets(inputs.seq_index, inputs.num_seqs).contiguous()
    terms = torch.empty(max(tokens, 1), 3, dtype=torch.float64, device=device)
    if out is None:
        out = torch.empty(inputs.num_seqs, NUM_STATS, dtype=torch.float64, device=device)
    elif out.shape != (inputs.num_seqs, NUM_STATS) or out.dtype != torch.float64 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float64 [{inputs.num_seqs}, {NUM_STATS}] tensor")
    strides = (x_in.stride(0), x_in.stride(1), x_out.stride(0), x_out.stride(1))
    if autotune is None:
        autotune = device.type == "cuda" and not _interpreting()
    if tokens > 0:
        if autotune:
            kernel = _row_kernel_for_gpu()
            grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_ROWS"]),)  # noqa: E731
            kernel[grid](x_in, x_out, mask, terms, tokens, hidden, *strides, EPS_=EPS, LANES_=LANES, LOG2_LANES=LOG2_LANES)
        else:
            grid = (triton.cdiv(tokens, DEFAULT_BLOCK_ROWS),)
            _bi_row_terms_kernel[grid](
                x_in, x_out, mask, terms, tokens, hidden, *strides,
                EPS_=EPS, BLOCK_ROWS=DEFAULT_BLOCK_ROWS, LANES_=LANES, LOG2_LANES=LOG2_LANES,
            )
    _bi_seq_reduce_kernel[(inputs.num_seqs,)](terms, mask, offsets, out, SEQ_BLOCK_=SEQ_BLOCK, num_warps=SEQ_WARPS)
    return out

