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

This file holds the public entry point, the backend registry, the plain-torch backend and the float64 reference.
The C++ backend lives in csrc/bi_reduce.cpp and the Triton one in kernels/bi_reduce_triton.py.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

STAT_COLUMNS = (
    "tokens",
    "sum_one_minus_cos",
    "sum_angular",
    "sum_rel_magnitude",
    "last_one_minus_cos",
    "last_angular",
)
NUM_STATS = len(STAT_COLUMNS)
EPS = 1e-12
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKEND_ENV = "SHORTGPT_FAST_BACKEND"


class BIReduceError(ValueError):
    """Inputs the reduction cannot accept; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class BIReduceInputs:
    """Validated, normalised arguments shared by every backend."""

    x_in: torch.Tensor  # [T, H]
    x_out: torch.Tensor  # [T, H]
    mask: torch.Tensor  # [T] bool
    seq_index: torch.Tensor  # [T] int64, non-decreasing
    num_seqs: int


def _validate(x_in, x_out, mask, seq_index, num_seqs) -> BIReduceInputs:
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


def _finish(per_row: torch.Tensor, inputs: BIReduceInputs) -> torch.Tensor:
    """Turn float64 per-row terms [T, 4] (valid, 1-cos, angular, relmag) into per-sequence stats, in row order."""
    valid = inputs.mask
    per_row = torch.where(valid[:, None], per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    out = torch.zeros(inputs.num_seqs, NUM_STATS, dtype=torch.float64, device=per_row.device)
    # index_add_ on CPU adds rows sequentially, in row order.
    out[:, 0:4].index_add_(0, inputs.seq_index, per_row)
    rows = torch.arange(per_row.shape[0], device=per_row.device)
    last_row = torch.full((inputs.num_seqs,), -1, dtype=torch.long, device=per_row.device)
    last_row.scatter_reduce_(0, inputs.seq_index, torch.where(valid, rows, -1), reduce="amax")
    has_last = last_row >= 0
    picked = per_row[last_row.clamp(min=0)]
    out[:, 4] = torch.where(has_last, picked[:, 1], 0.0)
    out[:, 5] = torch.where(has_last, picked[:, 2], 0.0)
    return out


def _per_row_terms(dot, sq_in, sq_out, sq_diff, valid) -> torch.Tensor:
    dot, sq_in, sq_out, sq_diff = (t.to(torch.float64) for t in (dot, sq_in, sq_out, sq_diff))
    norm_in, norm_out, norm_diff = torch.sqrt(sq_in), torch.sqrt(sq_out), torch.sqrt(sq_diff)
    raw_denom = norm_in * norm_out
    denom = torch.clamp(raw_denom, min=EPS)
    # Law of cosines: 2|a||b|(1 - cos) = |b-a|^2 - (|a|-|b|)^2. Adjacent residual-stream states are nearly
    # parallel, so dot/(|a||b|) loses most float32 digits of 1 - cos to cancellation; |b-a| is summed from
    # the differences themselves and keeps them. Zero-norm rows keep the dot-product convention (cos = 0).
    gap = (norm_in - norm_out).abs()
    one_minus_cos_law = (norm_diff - gap) * (norm_diff + gap) / (2.0 * denom)
    cos = torch.where(raw_denom < EPS, dot / denom, 1.0 - one_minus_cos_law)
    cos = torch.clamp(cos, -1.0, 1.0)
    rel = norm_diff / torch.clamp(norm_out, min=EPS)
    return torch.stack([valid.to(torch.float64), 1.0 - cos, torch.arccos(cos) / math.pi, rel], dim=1)


def bi_reduce_reference(x_in, x_out, mask=None, seq_index=None, num_seqs=None) -> torch.Tensor:
    """Ground truth: every step in float64."""
    inputs = _validate(x_in, x_out, mask, seq_index, num_seqs)
    a = inputs.x_in.to(torch.float64)
    b = inputs.x_out.to(torch.float64)
    terms = _per_row_terms((a * b).sum(1), (a * a).sum(1), (b * b).sum(1), ((b - a) ** 2).sum(1), inputs.mask)
    return _finish(terms, inputs)


def _torch_backend(inputs: BIReduceInputs) -> torch.Tensor:
    """Plain torch in float32 per row: the portable fallback and the baseline the fused kernels must beat."""
    a = inputs.x_in.float()
    b = inputs.x_out.float()
    terms = _per_row_terms((a * b).sum(1), (a * a).sum(1), (b * b).sum(1), ((b - a) ** 2).sum(1), inputs.mask)
    return _finish(terms, inputs)


# ---------------------------------------------------------------------------------------------------------------
# Backend registry. Each backend says why it cannot run on given inputs; dispatch takes the first that can.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[[BIReduceInputs], torch.Tensor]
    not_supported_reasons: Callable[[BIReduceInputs], list]
    # Device types on which dispatch may pick this backend unasked. Triton can run CPU tensors under
    # TRITON_INTERPRET=1, but only when forced: interpreted, it is orders of magnitude slower than the C++ kernel.
    auto_devices: tuple = ("cpu", "cuda")


_REGISTRY: dict[str, Backend] = {}
_PREFERENCE: list[str] = []


def register_backend(backend: Backend, prefer: bool = False) -> None:
    _REGISTRY[backend.name] = backend
    if backend.name in _PREFERENCE:
        _PREFERENCE.remove(backend.name)
    if prefer:
        _PREFERENCE.insert(0, backend.name)
    else:
        _PREFERENCE.append(backend.name)


def backends() -> dict[str, Backend]:
    _load_optional_backends()
    return dict(_REGISTRY)


register_backend(Backend("torch", _torch_backend, lambda inputs: []))

_optional_loaded = False


def _load_optional_backends() -> None:
    """Register the compiled backends lazily: a missing extension or Triton shows up as a reason, not an ImportError."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    try:
        from . import bi_reduce_cpp  # noqa: F401  (registers "cpp")
    except ImportError:
        pass
    try:
        from shortgpt_fast.kernels import bi_reduce_triton  # noqa: F401  (registers "triton")
    except ImportError:
        pass


def select_backend(inputs: BIReduceInputs) -> Backend:
    _load_optional_backends()
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in _REGISTRY:
            raise BIReduceError(
                f"{BACKEND_ENV}={forced} names no available backend; choose one of {sorted(_REGISTRY)}"
            )
        reasons = _REGISTRY[forced].not_supported_reasons(inputs)
        if reasons:
            raise BIReduceError(f"{BACKEND_ENV}={forced} cannot run these inputs: " + "; ".join(reasons))
        return _REGISTRY[forced]
    refused = []
    for name in _PREFERENCE:
        backend = _REGISTRY[name]
        if inputs.x_in.device.type not in backend.auto_devices:
            refused.append(f"{name}: not chosen automatically for {inputs.x_in.device.type} tensors")
            continue
        reasons = backend.not_supported_reasons(inputs)
        if not reasons:
            return backend
        refused.append(f"{name}: " + "; ".join(reasons))
    raise BIReduceError("bi_reduce: no backend can run these inputs (" + " | ".join(refused) + ")")


def bi_reduce(
    x_in: torch.Tensor,
    x_out: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    seq_index: Optional[torch.Tensor] = None,
    num_seqs: Optional[int] = None,
) -> torch.Tensor:
    """Per-sequence sums of the layer metrics; see the module docstring for the columns and conventions.

    x_in, x_out: [tokens, hidden] in float32/bfloat16/float16, any row stride.
    mask:        [tokens] bool, True where a token counts (None: all count).
    seq_index:   [tokens] sequence id of each row, non-decreasing (None: one sequence).
    Returns float64 [num_seqs, 6] on the inputs' device, without a host sync.
    """
    inputs = _validate(x_in, x_out, mask, seq_index, num_seqs)
    return select_backend(inputs).run(inputs)
