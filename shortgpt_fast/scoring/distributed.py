"""Data-parallel scoring: each rank scores a contiguous share of the calibration sequences, then the per-sequence
accumulators are gathered so every rank (and the report rank 0 writes) sees every sequence in the original order.

Per-sequence sums do not depend on which other sequences share a batch, which is why a gathered run equals the
single-process run: bootstrap CIs and rankings are computed from exactly the same [layers, sequences, stats] tensor.
Launch with `torchrun --nproc_per_node=N -m shortgpt_fast score ...`; gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..data.calibration import CalibrationSet
from .block_influence import LayerStats, ScoringError


def launched_by_torchrun() -> bool:
    """True when the environment says this process is one of several (WORLD_SIZE > 1, as torchrun sets it).

    Example: with WORLD_SIZE unset or "1", launched_by_torchrun() is False. A non-integer WORLD_SIZE raises ValueError.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str) -> str:
    """Join the process group torchrun describes; returns this rank's device (cuda -> cuda:LOCAL_RANK)."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return device


def world() -> tuple[int, int]:
    """(rank, world_size) of this process as ints: the process group's when one is initialised, else (0, 1).

    Never raises; safe to call in a single-process run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run), the rank that writes the report; bool, never raises."""
    return world()[0] == 0


def share_counts(num_sequences: int, world_size: int) -> list[int]:
    """How many calibration sequences each rank scores: list[int] of length world_size, the first
    num_sequences % world_size ranks taking one extra. Example: share_counts(10, 3) == [4, 3, 3].

    A share may be 0 (shard_calibration refuses that); world_size 0 raises ZeroDivisionError.
    """
    base, extra = divmod(num_sequences, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def shard_calibration(calib: CalibrationSet, rank: int, world_size: int) -> CalibrationSet:
    """This rank's contiguous share of `calib`, as a CalibrationSet whose description gains rank and world_size.

    Example: with 10 sequences and world_size 3, rank 1 gets sequences 4..6. Contiguous shares keep the gathered
    per-sequence tensor in the original order. Raises ScoringError when there are fewer sequences than ranks
    (some rank would get none).
    """
    counts = share_counts(calib.num_sequences, world_size)
    if min(counts) == 0:
        raise ScoringError(f"{calib.num_sequences} calibration sequences cannot be shared by {world_size} ranks; "
                           f"use --samples >= {world_size} or fewer processes")
    start = sum(counts[:rank])
    stop = start + counts[rank]
    return CalibrationSet(calib.input_ids[start:stop], calib.attention_mask[start:stop],
                          dict(calib.description, rank=rank, world_size=world_size))


def _all_gather_sequences(local: torch.Tensor, counts: list[int], seq_dim: int, device) -> torch.Tensor:
    """Concatenate every rank's [.., n_r, ..] tensor along `seq_dim`, in rank order."""
    import torch.distributed as dist

    widest = max(counts)
    pad_shape = list(local.shape)
    pad_shape[seq_dim] = widest - local.shape[seq_dim]
    padded = torch.cat([local, local.new_zeros(pad_shape)], dim=seq_dim).to(device).contiguous()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p.cpu().narrow(seq_dim, 0, n) for p, n in zip(parts, counts)], dim=seq_dim)


def gather_layer_stats(local: LayerStats, num_sequences: int, device="cpu") -> LayerStats:
    """Every rank's per-sequence accumulators, in sequence order; the slowest rank's time.

    local: this rank's LayerStats; returns LayerStats with per_sequence [layers, num_sequences, NUM_STATS] on the
    CPU (`local` itself when there is one process). Raises ScoringError when this rank scored a different number of
    sequences than its share.
    """
    import torch.distributed as dist

    rank, world_size = world()
    if world_size == 1:
        return local
    counts = share_counts(num_sequences, world_size)
    if local.per_sequence.shape[1] != counts[rank]:
        raise ScoringError(f"rank {rank} scored {local.per_sequence.shape[1]} sequences, expected {counts[rank]}")
    # NCCL only moves device tensors; gloo takes host ones.
    comm_device = device if dist.get_backend() == "nccl" else "cpu"
    per_sequence = _all_gather_sequences(local.per_sequence, counts, 1, comm_device)
    span = {n: _all_gather_sequences(values, counts, 1, comm_device) for n, values in sorted(local.span_angular.items())}
    metric_sums = {name: _all_gather_sequences(sums, counts, 1, comm_device) for name, sums in local.metric_sums.items()}
    seconds = torch.tensor([local.seconds], dtype=torch.float64, device=comm_device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return LayerStats(per_sequence, span, local.block_path, float(seconds.item()), metric_sums)


def scored_in_shares(calib: CalibrationSet, score_share, device: Optional[str] = None) -> LayerStats:
    """Run `score_share(calibration share)` on this rank and return the gathered LayerStats."""
    rank, world_size = world()
    if world_size == 1:
        return score_share(calib)
    local = score_share(shard_calibration(calib, rank, world_size))
    return gather_layer_stats(local, calib.num_sequences, device or "cpu")
