"""bi_reduce: the per-token reduction behind every layer metric (see contract.py for the columns and conventions).

`bi_reduce(x_in, x_out, mask, seq_index, num_seqs)` validates, picks a backend from the registry and runs it. It is
registered as the custom op `torch.ops.shortgpt_fast.bi_reduce` (with a fake implementation), so it traces under
`torch.compile` without a graph break and other tools can call it without importing our Python API.
"""
from __future__ import annotations

from typing import Optional

import torch

from .contract import (
    BACKEND_ENV,
    EPS,
    NUM_STATS,
    STAT_COLUMNS,
    SUPPORTED_DTYPES,
    BIReduceError,
    BIReduceInputs,
    Stat,
    seq_offsets,
    validate,
)
from .naive import bi_reduce_reference, torch_backend
from .registry import BACKENDS, Backend, backends, select_backend

__all__ = [
    "BACKEND_ENV", "BACKENDS", "EPS", "NUM_STATS", "STAT_COLUMNS", "SUPPORTED_DTYPES", "Backend", "BIReduceError",
    "BIReduceInputs", "Stat", "backends", "bi_reduce", "bi_reduce_reference", "select_backend", "seq_offsets",
    "torch_backend", "validate",
]


@torch.library.custom_op("shortgpt_fast::bi_reduce", mutates_args=())
def _bi_reduce_op(x_in: torch.Tensor, x_out: torch.Tensor, mask: Optional[torch.Tensor],
                  seq_index: Optional[torch.Tensor], num_seqs: int) -> torch.Tensor:
    inputs = validate(x_in, x_out, mask, seq_index, num_seqs)
    return select_backend(inputs).run(inputs)


@_bi_reduce_op.register_fake
def _bi_reduce_fake(x_in, x_out, mask, seq_index, num_seqs):
    # Validation that needs no data still runs, so a traced call fails where an eager one would.
    validate(x_in, x_out, mask, seq_index, num_seqs)
    return x_in.new_empty((num_seqs, NUM_STATS), dtype=torch.float64)


def bi_reduce(
    x_in: torch.Tensor,
    x_out: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    seq_index: Optional[torch.Tensor] = None,
    num_seqs: Optional[int] = None,
) -> torch.Tensor:
    """Per-sequence sums of the layer metrics; columns are named by `Stat` (see contract.py for the conventions).

    x_in, x_out: [tokens, hidden] in float32/bfloat16/float16, any row stride.
    mask:        [tokens] bool, True where a token counts (None: all count).
    seq_index:   [tokens] sequence id of each row, non-decreasing (None: one sequence).
    Returns float64 [num_seqs, NUM_STATS] on the inputs' device, without a host sync.

    Example:
        stats = bi_reduce(h_in.flatten(0, 1), h_out.flatten(0, 1), mask.flatten(), seq_index, batch)
        bi = stats[:, Stat.SUM_ONE_MINUS_COS].sum() / stats[:, Stat.TOKENS].sum()

    Raises BIReduceError when num_seqs is missing with seq_index, for inputs `contract.validate` refuses (shapes,
    dtypes, devices), or when no backend can run them (or SHORTGPT_FAST_BACKEND forces one that cannot).
    """
    if seq_index is None and num_seqs is None:
        num_seqs = 1
    if num_seqs is None:
        raise BIReduceError("bi_reduce: pass num_seqs together with seq_index")
    return _bi_reduce_op(x_in, x_out, mask, seq_index, int(num_seqs))
