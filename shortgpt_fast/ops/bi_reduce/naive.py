"""The float64 reference every backend is judged against, and the plain-torch backend (portable fallback, baseline)."""
from __future__ import annotations

import math

import torch

from .contract import EPS, NUM_STATS, BIReduceInputs, Stat, validate


def _finish(per_row: torch.Tensor, inputs: BIReduceInputs) -> torch.Tensor:
    """Turn float64 per-row terms [T, 4] into per-sequence stats, in row order.

    The per-row columns are laid out as the first four Stat columns (valid, 1-cos, angular, relmag), so they add
    straight into them.
    """
    valid = inputs.mask
    per_row = torch.where(valid[:, None], per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    out = torch.zeros(inputs.num_seqs, NUM_STATS, dtype=torch.float64, device=per_row.device)
    # index_add_ on CPU adds rows sequentially, in row order.
    out[:, Stat.TOKENS:Stat.SUM_REL_MAGNITUDE + 1].index_add_(0, inputs.seq_index, per_row)
    rows = torch.arange(per_row.shape[0], device=per_row.device)
    last_row = torch.full((inputs.num_seqs,), -1, dtype=torch.long, device=per_row.device)
    last_row.scatter_reduce_(0, inputs.seq_index, torch.where(valid, rows, -1), reduce="amax")
    has_last = last_row >= 0
    picked = per_row[last_row.clamp(min=0)]
    out[:, Stat.LAST_ONE_MINUS_COS] = torch.where(has_last, picked[:, Stat.SUM_ONE_MINUS_COS], 0.0)
    out[:, Stat.LAST_ANGULAR] = torch.where(has_last, picked[:, Stat.SUM_ANGULAR], 0.0)
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
    """Ground truth: every step in float64. Same arguments and result as `bi_reduce`.

    Example: `bi_reduce_reference(torch.randn(63, 7), torch.randn(63, 7))` -> float64 [1, 6].
    """
    inputs = validate(x_in, x_out, mask, seq_index, num_seqs)
    a = inputs.x_in.to(torch.float64)
    b = inputs.x_out.to(torch.float64)
    terms = _per_row_terms((a * b).sum(1), (a * a).sum(1), (b * b).sum(1), ((b - a) ** 2).sum(1), inputs.mask)
    return _finish(terms, inputs)


def torch_backend(inputs: BIReduceInputs) -> torch.Tensor:
    """Plain torch in float32 per row: the portable fallback and the baseline the fused kernels must beat."""
    a = inputs.x_in.float()
    b = inputs.x_out.float()
    terms = _per_row_terms((a * b).sum(1), (a * a).sum(1), (b * b).sum(1), ((b - a) ** 2).sum(1), inputs.mask)
    return _finish(terms, inputs)


def not_supported_reasons(inputs: BIReduceInputs) -> list:
    """Why the plain-torch backend cannot run `inputs` (a BIReduceInputs): always [], it runs on any device.

    It is the fallback at the end of the priority list, so it never refuses and never raises.
    """
    return []


run = torch_backend
