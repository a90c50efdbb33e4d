"""The per-token reduction behind every layer metric: one read of a block's input and output.

For each calibration sequence s the op returns, over the valid (unmasked) rows t of s,

    column 0  tokens               count of valid rows
    column 1  sum_one_minus_cos    Σ (1 - cos(x_in_t, x_out_t))          -> Block Influence
    column 2  sum_angular          Σ arccos(cos)/π                        -> angular distance
    column 3  sum_rel_magnitude    Σ ‖x_out_t - x_in_t‖ / ‖x_out_t‖       -> relative magnitude
    column 4  last_one_minus_cos   1 - cos on the last valid row of s
    column 5  last_angular         arccos(cos)/π on the last valid row of s

as float64 of shape [num_seqs, 6]. Per-sequence sums (not means) are what callers keep: they weight every
token equally across batches and let the bootstrap resample whole sequences.

Conventions every backend must follow exactly:
- dot products and squared norms are accumulated in float32 per row; sums across rows in float64, in row order,
  so the result does not depend on thread count or launch configuration;
- 1 - cos = (‖x_out - x_in‖² - (‖x_in‖ - ‖x_out‖)²) / (2‖x_in‖‖x_out‖) (the law of cosines, free of the
  cancellation that dot/(‖a‖‖b‖) suffers when the vectors are nearly parallel), cos clamped to [-1, 1];
  a row with ‖x_in‖·‖x_out‖ < EPS uses cos = dot / EPS, i.e. 0 for a zero row: BI term 1;
- rel_magnitude = ‖x_out - x_in‖ / max(‖x_out‖, EPS);
- masked rows contribute nothing, even when they hold NaN;
- a sequence with no valid row gives zeros.

The op lives in this folder: `contract.py` (this contract: column names, validation), `naive.py` (the float64
reference and the plain-torch backend), `cpp.py` (launcher of csrc/bi_reduce/), `triton_kernel.py` (kernels and
launcher), `registry.py` (the backends in priority order, each saying why it cannot run given inputs) and
`__init__.py` (the public op, also registered as `torch.ops.shortgpt_fast.bi_reduce`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ...errors import ShortGPTError


class Stat(enum.IntEnum):
    """Output columns, by name: every consumer, the C++ kernel (sgf::Stat) and the Triton kernel follow this order."""

    TOKENS = 0
    SUM_ONE_MINUS_COS = 1
    SUM_ANGULAR = 2
    SUM_REL_MAGNITUDE = 3
    LAST_ONE_MINUS_COS = 4
    LAST_ANGULAR = 5


STAT_COLUMNS = tuple(s.name.lower() for s in Stat)
NUM_STATS = len(Stat)
EPS = 1e-12
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKEND_ENV = "SHORTGPT_FAST_BACKEND"


class BIReduceError(ShortGPTError):
    """Inputs the reduction cannot accept; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class BIReduceInputs:
    """Validated, normalised arguments shared by every backend."""

    x_in: torch.Tensor  # [T, H]
    x_out: torch.Tensor  # [T, H]
    mask: torch.Tensor  # [T] bool
    seq_index: torch.Tensor  # [T] int64, non-decreasing
    num_seqs: int


def validate(x_in, x_out, mask, seq_index, num_seqs) -> BIReduceInputs:
    """Check and normalise bi_reduce's arguments once, so every backend can trust them.

    x_in, x_out: [tokens, hidden] tensors, same shape, device and dtype (float32, bfloat16 or float16).
    mask: optional [tokens] tensor on the same device, cast to bool; None means every row is valid.
    seq_index: optional [tokens] int32/int64 tensor (row -> sequence), cast to int64; needs num_seqs with it.
    None puts every row in one sequence (num_seqs defaults to 1).
    Returns a BIReduceInputs. Example: validate(a, b, None, None, None).num_seqs == 1 for a, b of shape [8, 16].

    Raises BIReduceError (one line saying how to fix it) for non-tensors, non-2-D or mismatched shapes, devices or
    dtypes, an unsupported dtype, hidden size 0, a mask or seq_index of the wrong shape, dtype or device, seq_index
    without num_seqs, or num_seqs < 1.
    """
    if not isinstance(x_in, torch.Tensor) or not isinstance(x_out, torch.Tensor):
        raise BIReduceError("bi_reduce: x_in and x_out must be torch tensors of shape [tokens, hidden]")
    if x_in.dim() != 2 or x_out.dim() != 2:
        raise BIReduceError(
            f"bi_reduce: expected 2-D [tokens, hidden] tensors, got {tuple(x_in.shape)} and {tuple(x_out.shape)}; "
            "flatten batch and sequence dimensions first"
        )
    if x_in.shape != x_out.shape:
        raise BIReduceError(f"bi_reduce: shape mismatch {tuple(x_in.shape)} vs {tuple(x_out.shape)}")
    if x_in.device != x_out.device:
        raise BIReduceError(f"bi_reduce: x_in is on {x_in.device} but x_out is on {x_out.device}; move both to one device")
    if x_in.dtype not in SUPPORTED_DTYPES or x_out.dtype not in SUPPORTED_DTYPES:
        raise BIReduceError(
            f"bi_reduce: dtypes {x_in.dtype}/{x_out.dtype} not supported; use float32, bfloat16 or float16"
        )
    if x_in.dtype != x_out.dtype:
        raise BIReduceError(f"bi_reduce: dtype mismatch {x_in.dtype} vs {x_out.dtype}; cast one to the other")
    tokens, hidden = x_in.shape
    if hidden == 0:
        raise BIReduceError("bi_reduce: hidden size is 0; there is nothing to compare")
    if mask is None:
        mask = torch.ones(tokens, dtype=torch.bool, device=x_in.device)
    else:
        if mask.dim() != 1 or mask.shape[0] != tokens:
            raise BIReduceError(
                f"bi_reduce: mask has shape {tuple(mask.shape)} but there are {tokens} tokens; pass a [tokens] mask"
            )
        if mask.device != x_in.device:
            raise BIReduceError(f"bi_reduce: mask is on {mask.device} but inputs are on {x_in.device}")
        mask = mask.to(torch.bool)
    if seq_index is None:
        seq_index = torch.zeros(tokens, dtype=torch.long, device=x_in.device)
        num_seqs = 1 if num_seqs is None else num_seqs
    else:
        if seq_index.dim() != 1 or seq_index.shape[0] != tokens:
            raise BIReduceError(
                f"bi_reduce: seq_index has shape {tuple(seq_index.shape)} but there are {tokens} tokens"
            )
        if seq_index.dtype not in (torch.int32, torch.int64):
            raise BIReduceError(f"bi_reduce: seq_index must be an integer tensor, got {seq_index.dtype}")
        if seq_index.device != x_in.device:
            raise BIReduceError(f"bi_reduce: seq_index is on {seq_index.device} but inputs are on {x_in.device}")
        seq_index = seq_index.to(torch.long)
        if num_seqs is None:
            raise BIReduceError("bi_reduce: pass num_seqs together with seq_index")
    if num_seqs < 1:
        raise BIReduceError(f"bi_reduce: num_seqs must be >= 1, got {num_seqs}")
    return BIReduceInputs(x_in, x_out, mask, seq_index, int(num_seqs))


def seq_offsets(seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Row offsets [num_seqs + 1] of each sequence's contiguous segment, computed on the device (no host sync)."""
    bounds = torch.arange(num_seqs + 1, device=seq_index.device, dtype=seq_index.dtype)
    return torch.searchsorted(seq_index, bounds).to(torch.int64)
