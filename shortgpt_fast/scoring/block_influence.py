"""In-memory scoring: one forward pass per calibration batch, metrics accumulated on the device by hooks.

Each block is scored on its own input and output, captured by a forward hook. `output_hidden_states` is never used:
its last entry comes after the final norm, which silently corrupts the last layer's BI. The forward stops
by exception right after the last block, so the final norm and the lm_head never run; only the first batch runs on
to just before the output head, to catch blocks that run more than once per forward (refused: BI is undefined for
them). A block the forward skips (an input it does not apply to) scores as the identity it then is. Per-sequence sums
stay on the device; the only host sync is at the end of scoring.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..data.calibration import CalibrationSet
from ..errors import ShortGPTError
from ..models.architectures import find_block_stack
from ..ops.bi_reduce import NUM_STATS, Stat, bi_reduce
from .metrics import per_sequence_sums, resolve_metrics

AngularSpan = Union[int, str]  # a largest span n, or "all" for every span 1..num_layers (the full span map)


class ScoringError(ShortGPTError):
    """Scoring refused or failed (e.g. a block that runs twice per forward, ambiguous hidden-state axes); one line that
    says how to fix it. Base of streamed.StreamingError; a ShortGPTError, so the CLI prints it without a traceback.
    """

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
    # user metric name -> float64 [num_layers, num_sequences] sums over real tokens (scoring/metrics.py)
    metric_sums: dict = field(default_factory=dict)


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

    @property
    def seq_len(self) -> int:
        return int(self.mask.shape[0]) // max(self.batch, 1)

    def to(self, device) -> "BatchLayout":
        return BatchLayout(*(t.to(device) for t in (self.rows, self.mask, self.seq_index, self.batch_index,
                                                    self.last_pos)))


def batch_layout(mask2d: torch.Tensor, start: int, device) -> BatchLayout:
    """Where one calibration batch sits in the accumulators, built on `device`.

    mask2d: [batch, seq_len] attention mask (0/1 or bool; left or right padding); start: global index of the batch's
    first sequence. Returns a BatchLayout with rows [batch] = start..start+batch-1, mask and seq_index flattened to
    [batch * seq_len], and last_pos [batch] (0 for an all-padding row).
    Example: batch_layout(torch.ones(2, 5), 4, "cpu").rows.tolist() == [4, 5].
    Refuses nothing itself; a mask2d that is not 2-D fails unpacking its shape with ValueError.
    """
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


def token_states(hidden: torch.Tensor, batch: int, seq_len: int, layer: int) -> torch.Tensor:
    """A block's hidden state as [batch, seq_len, width]: one row per token, whatever layout the model uses.

    - [batch, seq, hidden]: the usual layout, returned as is.
    - [seq, batch, hidden]: sequence-first models (XLNet); transposed. When batch == seq_len the two cannot be told
      apart by shape, and the batch-first convention of transformers is assumed.
    - [batch, seq, streams, hidden] (DeepSeek-V4 and HY-V4 manifold hyper-connections) and
      [streams, batch, seq, hidden] (Gemma-3n AltUp): several residual streams per token. The streams are flattened
      into the hidden dimension, so BI = 1 - cos between the token's whole residual state before and after the block.
      That is the state the next block consumes and the one an identity skip passes on unchanged: a skipped block
      scores exactly 0 and the score stays a property of the block, not of one stream. Comparing a single "primary"
      stream is not defensible here: mHC streams are symmetric (mixed by learned weights), and Gemma-3n's final
      output averages all AltUp streams, so a block that only changes the other streams would look free to remove.
    """
    shape = tuple(hidden.shape)
    if hidden.dim() == 3:
        if shape[:2] == (batch, seq_len):
            return hidden
        if shape[:2] == (seq_len, batch):
            return hidden.transpose(0, 1)
    elif hidden.dim() == 4:
        batch_first = shape[:2] == (batch, seq_len)
        streams_first = shape[1:3] == (batch, seq_len)
        if batch_first and not streams_first:
            return hidden.reshape(batch, seq_len, shape[2] * shape[3])
        if streams_first and not batch_first:
            return hidden.permute(1, 2, 0, 3).reshape(batch, seq_len, shape[0] * shape[3])
    if hidden.dim() == 4 and shape[:2] == (batch, seq_len) and shape[1:3] == (batch, seq_len):
        raise ScoringError(f"layer {layer}'s hidden state {list(shape)} has equal batch, sequence and stream sizes, "
                           "so its token axes are ambiguous; use another --batch-size")
    # CPM-Ant prepends learned prompt positions, ProphetNet's decoder concatenates its n-gram streams along the
    # sequence: positions that are not the calibration tokens, which the attention mask cannot be matched to.
    raise ScoringError(
        f"layer {layer}'s hidden state has shape {list(shape)}, which is not one row per calibration token (batch "
        f"{batch}, sequence {seq_len}): the model adds positions or streams inside its blocks, so BI per token is "
        "undefined; ShortGPT scoring does not support it")


def span_limit(angular_span: AngularSpan, num_layers: int) -> int:
    """The largest span n the accumulator keeps distances for: "all" -> num_layers, an int n -> min(n, num_layers).

    Raises ScoringError for anything else (a negative int, another string).
    """
    if angular_span == "all":
        return num_layers
    if isinstance(angular_span, bool) or not isinstance(angular_span, int) or angular_span < 0:
        raise ScoringError(f"--angular-span must be a non-negative integer or 'all', got {angular_span!r}")
    return min(angular_span, num_layers)


class LayerAccumulator:
    """Per-sequence metric sums on the device; in-memory and streamed scoring both feed blocks through `add`.

    Sharing this is what makes the two paths give the same numbers: same reduction, same slots, same span states.
    `metrics` names registered user metrics (scoring/metrics.py), reduced per sequence beside the built-in ones.
    """

    def __init__(self, num_layers: int, num_seqs: int, angular_span: AngularSpan, device,
                 metrics: Sequence[str] = ()):
        self.num_layers = num_layers
        self.num_seqs = num_seqs
        self.device = device
        self.acc = torch.zeros(num_layers, num_seqs, NUM_STATS, dtype=torch.float64, device=device)
        self.user_metrics = resolve_metrics(metrics)
        self.metric_sums = {m.name: torch.zeros(num_layers, num_seqs, dtype=torch.float64, device=device)
                            for m in self.user_metrics}
        self.max_span = span_limit(angular_span, num_layers)
        # Last-token states at every layer boundary, for the Gromov et al. distance between layer ℓ and ℓ+n.
        # Allocated on the first block, when the hidden size is known from the activations themselves.
        self.boundary: Optional[torch.Tensor] = None

    def add(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor, layout: BatchLayout) -> None:
        hidden_in = token_states(hidden_in, layout.batch, layout.seq_len, layer)
        hidden_out = token_states(hidden_out, layout.batch, layout.seq_len, layer)
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
        for metric in self.user_metrics:
            self.metric_sums[metric.name][layer, rows] = per_sequence_sums(
                metric, flat_in, flat_out, layout.mask, batch, layer).to(self.device)
        if self.max_span == 0:
            return
        if self.boundary is None:
            self.boundary = torch.zeros(self.num_layers + 1, self.num_seqs, hidden, dtype=torch.float32,
                                        device=self.device)
        if layer == 0:
            self.boundary[0, rows] = hidden_in[layout.batch_index, layout.last_pos].float().to(self.device)
        self.boundary[layer + 1, rows] = hidden_out[layout.batch_index, layout.last_pos].float().to(self.device)

    def add_skipped(self, layer: int, layout: BatchLayout) -> None:
        """A block the forward pass skipped for this batch (Mllama's cross-attention layers without an image).

        Its output is its input, so every token has cos 1: BI 0, angular distance 0, relative magnitude 0. That is
        what the model computes on this data, and what removing the block changes on it: nothing.
        """
        per_row = layout.mask.reshape(layout.batch, -1).sum(dim=1).to(self.acc.device, torch.float64)
        self.acc[layer, layout.rows.to(self.device)] = 0
        self.acc[layer, layout.rows.to(self.device), Stat.TOKENS] = per_row
        # What a user metric says about an identity block is the metric's business, and the states to ask it with are
        # not kept here; refusing beats guessing 0.
        if self.user_metrics:
            raise ScoringError(f"layer {layer} was skipped by the forward pass, and user metrics "
                               f"{[m.name for m in self.user_metrics]} need its input and output; score without them")
        if self.boundary is not None:
            rows = layout.rows.to(self.device)
            self.boundary[layer + 1, rows] = self.boundary[layer, rows]

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
        metric_sums = {name: v.cpu() for name, v in self.metric_sums.items()}
        _raise_on_non_finite(acc)
        for name, sums in metric_sums.items():
            finite = torch.isfinite(sums).all(dim=1)
            if not bool(finite.all()):
                raise ScoringError(f"user metric {name!r} gave NaN or inf on a real token of layer "
                                   f"{int((~finite).nonzero()[0, 0])}; fix the metric function")
        if float(acc[0, :, Stat.TOKENS].sum()) == 0:
            raise ScoringError("no calibration token was unmasked; check the attention mask")
        return LayerStats(acc, span, block_path, time.perf_counter() - started, metric_sums)


@torch.no_grad()
def collect_layer_stats(
    model: nn.Module,
    calib: CalibrationSet,
    batch_size: int = 8,
    angular_span: AngularSpan = 8,
    progress: bool = True,
    metrics: Sequence[str] = (),
) -> LayerStats:
    """Run the calibration set through `model` and return per-layer, per-sequence metric sums.

    angular_span: the largest n of the ℓ -> ℓ+n distances, or "all" for the full span map; metrics: registered user
    metric names (scoring/metrics.py) reduced beside the built-in ones.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ScoringError(f"--batch-size must be >= 1, got {batch_size}")
    stack = find_block_stack(model)
    blocks = stack.blocks
    num_layers = len(blocks)
    device = next(model.parameters()).device
    num_seqs = calib.num_sequences
    accumulator = LayerAccumulator(num_layers, num_seqs, angular_span, device, metrics)
    needs_positions = bool((calib.attention_mask == 0).any())

    state: dict = {"check_repeats": True}

    def make_hook(layer: int):
        def hook(module, args, kwargs, output):
            ran = state["ran"]
            if layer in ran:
                # Looped or recurrent-depth models (HRM, Dory) run the same block several times per forward. BI
                # compares a block's input with its output; with several passes there are several pairs, and
                # removing the block removes all of its passes at once, which no single pair (nor their mean)
                # measures. No per-block score is defensible, so refuse rather than rank on the first pass.
                raise ScoringError(
                    f"layer {layer} of {stack.path} runs more than once per forward pass (a looped or recurrent-depth "
                    f"model, {type(model).__name__}): Block Influence per block is undefined there; ShortGPT scoring "
                    "does not support this model")
            ran.add(layer)
            hidden_in, hidden_out = _block_io(args, kwargs, output)
            accumulator.add(layer, hidden_in, hidden_out, state["layout"])
            if layer == num_layers - 1 and not state["check_repeats"]:
                raise _StopAfterLastBlock
            return None

        return hook

    def stop_before_head(module, args):
        raise _StopAfterLastBlock

    handles = [blk.register_forward_hook(make_hook(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    # The first batch runs on past the last block, up to the output head, so a block that runs again later in the
    # same forward (a loop over the stack) is seen; later batches stop right after the last block.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_handle = head.register_forward_pre_hook(stop_before_head) if isinstance(head, nn.Module) else None
    started = time.perf_counter()
    try:
        starts = range(0, num_seqs, batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress):
            stop = min(start + batch_size, num_seqs)
            ids = calib.input_ids[start:stop].to(device)
            mask2d = calib.attention_mask[start:stop].to(device)
            state["layout"] = batch_layout(mask2d, start, device)
            state["ran"] = set()
            try:
                model(**_forward_kwargs(model, ids, mask2d, needs_positions))
            except _StopAfterLastBlock:
                pass
            if num_layers - 1 not in state["ran"]:
                raise ScoringError("the forward pass never reached the last block; the block stack is not on the "
                                   f"model's forward path ({stack.path})")
            for layer in range(num_layers):
                if layer not in state["ran"]:
                    accumulator.add_skipped(layer, state["layout"])
            state["check_repeats"] = False
            if head_handle is not None:
                head_handle.remove()
                head_handle = None
    finally:
        for handle in handles:
            handle.remove()
        if head_handle is not None:
            head_handle.remove()
    return accumulator.finish(stack.path, started)


def _raise_on_non_finite(acc: torch.Tensor) -> None:
    finite = torch.isfinite(acc[:, :, Stat.SUM_ONE_MINUS_COS:Stat.SUM_REL_MAGNITUDE + 1]).all(dim=(1, 2))
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        raise ScoringError(
            f"NaN or inf in the activations of layer {first} (its input or output); the model overflows in this "
            "dtype or its weights are corrupt: try --dtype float32 or check the checkpoint")
