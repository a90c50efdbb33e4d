"""In-memory scoring: one forward pass per calibration batch, metrics accumulated on the device by hooks.

Each block is scored on its own input and output, captured by a forward hook. `output_hidden_states` is never used:
its last entry comes after the final norm, which silently corrupts the last layer's BI (NOTES §2). The forward stops
by exception right after the last block, so the final norm and the lm_head never run. Per-sequence sums stay on the
device; the only host sync is at the end of scoring.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..data.calibration import CalibrationSet
from ..models.architectures import find_block_stack
from ..ops.bi_reduce import NUM_STATS, Stat, bi_reduce


class ScoringError(ValueError):
    pass


class _StopAfterLastBlock(Exception):
    """Raised from the last block's hook: nothing after the block stack is needed."""


@dataclass
class LayerStats:
    """Raw per-sequence accumulators, the source of every metric, CI and ranking."""

    per_sequence: torch.Tensor  # float64 [num_layers, num_sequences, NUM_STATS], columns as in ops.bi_reduce
    span_angular: dict  # n -> float64 [num_layers - n + 1, num_sequences]: last-token angular distance ℓ -> ℓ+n
    block_path: str
    seconds: float


def _block_io(args, kwargs, output):
    hidden_in = args[0] if args else kwargs.get("hidden_states")
    hidden_out = output if isinstance(output, torch.Tensor) else output[0]
    return hidden_in, hidden_out


def _forward_kwargs(model: nn.Module, input_ids, attention_mask, needs_positions: bool) -> dict:
    accepted = inspect.signature(model.forward).parameters
    kwargs = {"input_ids": input_ids}
    if "attention_mask" in accepted:
        kwargs["attention_mask"] = attention_mask
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    if needs_positions and "position_ids" in accepted:
        # Left padding shifts real tokens; positions from the mask keep their outputs identical to unpadded ones.
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return kwargs


@dataclass
class BatchLayout:
    """Where one calibration batch sits in the accumulators, and which of its rows are real tokens."""

    rows: torch.Tensor  # [batch] global sequence indices
    mask: torch.Tensor  # [batch * seq_len] bool, flattened 2D attention mask
    seq_index: torch.Tensor  # [batch * seq_len] row -> sequence within the batch
    batch_index: torch.Tensor  # [batch]
    last_pos: torch.Tensor  # [batch] position of the last real token

    @property
    def batch(self) -> int:
        return int(self.rows.shape[0])

    def to(self, device) -> "BatchLayout":
        return BatchLayout(*(t.to(device) for t in (self.rows, self.mask, self.seq_index, self.batch_index,
                                                    self.last_pos)))


def batch_layout(mask2d: torch.Tensor, start: int, device) -> BatchLayout:
    mask2d = mask2d.to(device)
    batch, seq_len = mask2d.shape
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    return BatchLayout(
        rows=torch.arange(start, start + batch, device=device),
        mask=mask2d.reshape(-1).bool(),
        seq_index=torch.arange(batch, device=device).repeat_interleave(seq_len),
        batch_index=torch.arange(batch, device=device),
        # Last real token: the highest position whose mask is set (works for left and right padding).
        last_pos=torch.where(mask2d.bool(), positions, -1).amax(dim=1).clamp(min=0),
    )


class LayerAccumulator:
    """Per-sequence metric sums on the device; in-memory and streamed scoring both feed blocks through `add`.

    Sharing this is what makes the two paths give the same numbers: same reduction, same slots, same span states.
    """

    def __init__(self, num_layers: int, num_seqs: int, angular_span: int, device):
        self.num_layers = num_layers
        self.num_seqs = num_seqs
        self.device = device
        self.acc = torch.zeros(num_layers, num_seqs, NUM_STATS, dtype=torch.float64, device=device)
        self.max_span = max(0, min(angular_span, num_layers))
        # Last-token states at every layer boundary, for the Gromov et al. distance between layer ℓ and ℓ+n.
        # Allocated on the first block, when the hidden size is known from the activations themselves.
        self.boundary: Optional[torch.Tensor] = None

    def add(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor, layout: BatchLayout) -> None:
        batch, tokens, hidden = hidden_out.shape
        rows = layout.rows
        if hidden_out.device != layout.mask.device:
            # A model spread over several GPUs (device_map): reduce where the block ran and move only the sums,
            # never the activations. hidden_in sits on the previous block's device.
            layout = layout.to(hidden_out.device)
            hidden_in = hidden_in.to(hidden_out.device)
        flat_in = hidden_in.reshape(batch * tokens, hidden)
        flat_out = hidden_out.reshape(batch * tokens, hidden)
        sums = bi_reduce(flat_in, flat_out, layout.mask, layout.seq_index, batch)
        self.acc[layer, rows] = sums.to(self.device)
        if self.max_span == 0:
            return
        if self.boundary is None:
            self.boundary = torch.zeros(self.num_layers + 1, self.num_seqs, hidden, dtype=torch.float32,
                                        device=self.device)
        if layer == 0:
            self.boundary[0, rows] = hidden_in[layout.batch_index, layout.last_pos].float().to(self.device)
        self.boundary[layer + 1, rows] = hidden_out[layout.batch_index, layout.last_pos].float().to(self.device)

    def finish(self, block_path: str, started: float) -> LayerStats:
        span = {}
        if self.boundary is not None:
            seq_index = torch.arange(self.num_seqs, device=self.device)
            for n in range(1, self.max_span + 1):
                span[n] = torch.stack([
                    bi_reduce(self.boundary[start], self.boundary[start + n], None, seq_index, self.num_seqs)[:, Stat.SUM_ANGULAR]
                    for start in range(self.num_layers - n + 1)
                ])
        acc = self.acc.cpu()  # the one host sync of scoring
        span = {n: v.cpu() for n, v in span.items()}
        _raise_on_non_finite(acc)
        if float(acc[0, :, Stat.TOKENS].sum()) == 0:
            raise ScoringError("no calibration token was unmasked; check the attention mask")
        return LayerStats(acc, span, block_path, time.perf_counter() - started)


@torch.no_grad()
def collect_layer_stats(
    model: nn.Module,
    calib: CalibrationSet,
    batch_size: int = 8,
    angular_span: int = 8,
    progress: bool = True,
) -> LayerStats:
    """Run the calibration set through `model` and return per-layer, per-sequence metric sums."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ScoringError(f"--batch-size must be >= 1, got {batch_size}")
    stack = find_block_stack(model)
    blocks = stack.blocks
    num_layers = len(blocks)
    device = next(model.parameters()).device
    num_seqs = calib.num_sequences
    accumulator = LayerAccumulator(num_layers, num_seqs, angular_span, device)
    needs_positions = bool((calib.attention_mask == 0).any())

    state: dict = {}

    def make_hook(layer: int):
        def hook(module, args, kwargs, output):
            hidden_in, hidden_out = _block_io(args, kwargs, output)
            accumulator.add(layer, hidden_in, hidden_out, state["layout"])
            if layer == num_layers - 1:
                raise _StopAfterLastBlock
            return None

        return hook

    handles = [blk.register_forward_hook(make_hook(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    started = time.perf_counter()
    try:
        starts = range(0, num_seqs, batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress):
            stop = min(start + batch_size, num_seqs)
            ids = calib.input_ids[start:stop].to(device)
            mask2d = calib.attention_mask[start:stop].to(device)
            state["layout"] = batch_layout(mask2d, start, device)
            try:
                model(**_forward_kwargs(model, ids, mask2d, needs_positions))
            except _StopAfterLastBlock:
                pass
            else:
                raise ScoringError("the forward pass never reached the last block; the block stack is not on the "
                                   f"model's forward path ({stack.path})")
    finally:
        for handle in handles:
            handle.remove()
    return accumulator.finish(stack.path, started)


def _raise_on_non_finite(acc: torch.Tensor) -> None:
    finite = torch.isfinite(acc[:, :, Stat.SUM_ONE_MINUS_COS:Stat.SUM_REL_MAGNITUDE + 1]).all(dim=(1, 2))
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ScoringError(
            f"NaN or inf in the activations of layer {first} (its input or output); the model overflows in this "
            "dtype or its weights are corrupt: try --dtype float32 or check the checkpoint")
