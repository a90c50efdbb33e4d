"""Streamed scoring: one block in memory at a time, or one part of a block, for models larger than the device.

Scoring needs only the unpruned model's block inputs and outputs, so the forward pass can be cut at block
boundaries. The skeleton is built on the meta device; only what runs before block 0 (embeddings, rotary tables) is
materialised. One forward pass of that skeleton records the exact call every block receives: each block's `forward`
is temporarily replaced by a recorder, so per-layer inputs such as Qwen3's or Gemma2's sliding-window masks are
captured too, not only block 0's (replaying them reproduces every layer output exactly). A recorder returns what a
real block returns (a tensor, or a tuple led by the hidden state, as Falcon's and RWKV's blocks do), learnt by
running block 0 once first. Then, block by block: load its tensors (scoring/weights.py: transformers' weight
conversion mapping, quantized weights dequantized as they load), replay every recorded call through it, feed the
shared `LayerAccumulator`, and drop it. The next part loads in a background thread meanwhile, so reads overlap
compute.

A block that cannot compute while the next one loads within the memory budget is run in parts, the way transformers'
expert parallelism splits a MoE layer over ranks, only one "rank" after the other: the block less its routed experts
runs up to the experts call, which records the routed tokens; then the experts load in contiguous groups that fit. Each
group's experts module is called on only the (token, slot) routes that land in it, one route per row with its own weight
(top-k of 1), and each row's output is added to its token's float32 sum; then the block runs again with those sums in
place of the experts call. Calling a group on every token instead, with the routes elsewhere masked as expert-parallel
sentinels, spent most of the time on rows that contribute nothing (45 against 214 GFLOP/s in bf16 on the giant bench's
shapes). The sums add the same products in another order than transformers' single pass (per group, slot by slot), so
BI agrees to rounding, not bit for bit (tests/scoring/test_streamed_giant.py bounds it at 1e-5 relative).
"""
from __future__ import annotations

import inspect
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..data.calibration import CalibrationSet
from ..errors import one_line
from ..io import safetensors as st
from ..models.architectures import find_block_stack
from ..models.loading import DTYPES, ModelLoadError, gguf_model_file, resolve_model_path
from . import hardware
from .activations import ActivationStore, choose_activation_tier
from .block_influence import LayerAccumulator, LayerStats, ScoringError, _forward_kwargs, batch_layout
from .dequantize import dequantizer_for
from .hardware import AUTO_STREAM_FRACTION, available_memory_bytes
from .weights import (
    CheckpointShards,
    SafetensorsSource,
    StreamedWeights,
    StreamingError,
    _checked,
    experts_modules,
    materialise,
    skeleton,
)

__all__ = ["StreamingError", "StreamedLayerStats", "CheckpointShards", "collect_layer_stats_streamed",
           "streaming_decision", "available_memory_bytes"]


@dataclass
class StreamedLayerStats(LayerStats):
    """LayerStats plus how the streamed run kept its activations, which compute path ran, and where its time went."""

    streaming: dict = field(default_factory=dict)


def streaming_decision(model: str, dtype: str, device) -> tuple[bool, str]:
    """(stream?, the estimate behind it) for a local checkpoint: stream when it would not fit in free memory."""
    if dtype not in DTYPES:
        return False, f"unknown dtype {dtype!r}"  # the loader reports it with the valid choices
    folder = resolve_model_path(model)
    if gguf_model_file(folder) is not None:
        return True, f"{model} is a GGUF file: scoring streamed, dequantizing one block at a time"
    if not Path(folder).is_dir():
        return False, f"{model} is not a local checkpoint; loading it whole"
    if _checked(st.read_weight_map, Path(folder)) is None:
        return False, f"{model} has no safetensors weights to stream; loading it whole"
    # A damaged header or an unknown dtype is refused here, in one line, rather than guessed at or loaded whole.
    need = SafetensorsSource(folder).total_bytes(DTYPES[dtype])
    have = available_memory_bytes(device)
    stream = need > AUTO_STREAM_FRACTION * have
    verdict = "scoring streamed, one block at a time" if stream else "loading it whole"
    return stream, (f"model needs about {need / 1e9:.2f} GB in {dtype}; {have / 1e9:.2f} GB free on {device}: "
                    f"{verdict}")


# ---- recording what every block is called with -------------------------------------------------------------------

def _output_like(output):
    """hidden -> what the block returned, with `hidden` in the hidden state's place.

    The model's forward consumes its blocks' output as it is (Falcon indexes `outputs[0]`, RWKV unpacks three
    values), so a recorder that stands in for a block must return the same structure. The other entries come from a
    real run of block 0; with the cache off they are Nones or per-call extras the forward only collects.
    """
    from transformers.utils import ModelOutput

    if isinstance(output, torch.Tensor):
        return lambda hidden: hidden
    if isinstance(output, ModelOutput) and isinstance(output[0], torch.Tensor):
        first = next(iter(output.keys()))
        return lambda hidden: type(output)(**{**output, first: hidden})
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        rest = tuple(output[1:])
        kind = type(output)
        if kind in (tuple, list):
            return lambda hidden: kind((hidden, *rest))
        return lambda hidden: kind(hidden, *rest)  # a namedtuple takes its fields positionally
    raise StreamingError(f"a block returns {type(output).__name__}, not a tensor or a tuple whose first entry is the "
                         "hidden state; score this model in memory (drop --streamed)")


class _StopAtBlock(Exception):
    """Raised by a stand-in forward once it has what it was installed for."""


@dataclass
class _Recording:
    calls: list  # [batch][layer] -> (args after hidden_states, kwargs)
    layouts: list  # [batch] -> batch_layout
    first_hidden: list  # [batch] -> block 0's input
    like_block_output: Callable


class _Skeleton:
    """The meta-device model with its non-layer weights in place, and the forward pass that reaches its blocks."""

    def __init__(self, model: nn.Module, calib: CalibrationSet, batch_size: int, device):
        self.model = model
        self.stack = find_block_stack(model)
        self.blocks = self.stack.blocks
        self.calib = calib
        self.batch_size = batch_size
        self.device = device
        self.needs_positions = bool((calib.attention_mask == 0).any())
        self.starts = list(range(0, calib.num_sequences, batch_size))
        self.name = f"{type(model).__name__} ({getattr(model.config, 'model_type', None)})"

    def run_to_blocks(self, start: int) -> None:
        """The model's forward on one batch, until a stand-in block forward stops it."""
        stop = min(start + self.batch_size, self.calib.num_sequences)
        ids = self.calib.input_ids[start:stop].to(self.device)
        mask2d = self.calib.attention_mask[start:stop].to(self.device)
        try:
            self.model(**_forward_kwargs(self.model, ids, mask2d, self.needs_positions))
        except _StopAtBlock:
            return
        except (RuntimeError, NotImplementedError) as err:
            if "meta" in str(err):
                raise StreamingError(f"{self.name} uses weights outside its block stack between blocks, so its "
                                     f"blocks cannot be replayed one at a time: {one_line(err)}") from None
            raise
        raise StreamingError(f"the forward pass of {self.name} never reached its last block ({self.stack.path}); it "
                             "cannot be scored streamed")

    def first_call(self) -> tuple:
        """(hidden, args, kwargs) block 0 receives on the first batch."""
        probe: dict = {}

        def probe_first_block(*args, **kwargs):
            probe["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            probe["call"] = (args[1:], kwargs)
            raise _StopAtBlock

        self.blocks[0].forward = probe_first_block
        try:
            self.run_to_blocks(self.starts[0])
        finally:
            self.blocks[0].__dict__.pop("forward", None)
        return probe["hidden"], *probe["call"]

    def record(self, like_block_output: Callable) -> _Recording:
        """Every block's call for every batch, each block standing in with `like_block_output` of its input."""
        num_layers = len(self.blocks)
        rec = _Recording([], [], [], like_block_output)
        recorded: list = [None] * num_layers
        passed_on: list = [None]  # the hidden state the last recorder returned

        def recorder(layer: int):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if layer == 0:
                    rec.first_hidden.append(hidden)
                elif hidden is not passed_on[0] and not torch.equal(hidden, passed_on[0]):
                    # Replay feeds each block the previous block's output; a forward that changes the hidden state
                    # between blocks (RWKV's rescale_every halving) would be scored on inputs the model never sees.
                    raise StreamingError(f"{self.name} changes the hidden state between blocks {layer - 1} and "
                                         f"{layer}, so its blocks cannot be replayed one at a time; score it in "
                                         "memory (drop --streamed)")
                recorded[layer] = (args[1:], dict(kwargs))
                if layer == num_layers - 1:
                    raise _StopAtBlock
                passed_on[0] = hidden
                return like_block_output(hidden)

            return forward

        for i, block in enumerate(self.blocks):
            block.forward = recorder(i)
        try:
            for start in self.starts:
                before = len(rec.first_hidden)
                self.run_to_blocks(start)
                if len(rec.first_hidden) != before + 1 or any(r is None for r in recorded):
                    raise StreamingError(f"the forward pass of {self.name} does not call each block of "
                                         f"{self.stack.path} once per batch; score it in memory (drop --streamed)")
                rec.calls.append(list(recorded))
                recorded[:] = [None] * num_layers
                stop = min(start + self.batch_size, self.calib.num_sequences)
                rec.layouts.append(batch_layout(self.calib.attention_mask[start:stop].to(self.device), start,
                                                self.device))
        finally:
            for block in self.blocks:
                block.__dict__.pop("forward", None)
        return rec


# ---- loading parts in the background -----------------------------------------------------------------------------

class _Prefetcher:
    """Runs load jobs in order on one background thread, one job ahead of the consumer: while part k computes,
    part k+1 loads, and no more than those two are held."""

    def __init__(self, jobs: list[Callable], device):
        self._jobs = jobs
        self._next = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shortgpt-prefetch")
        # On a GPU the loads go on their own stream, or they would queue behind the compute they are meant to overlap.
        self._stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None
        self._pending = None
        self.load_seconds = 0.0
        self.wait_seconds = 0.0
        self._submit()

    def _run(self, job):
        began = time.perf_counter()
        if self._stream is None:
            out = job()
        else:
            with torch.cuda.stream(self._stream):
                out = job()
            self._stream.synchronize()  # the part is complete before the compute stream touches it
        return out, time.perf_counter() - began

    def _submit(self) -> None:
        if self._next < len(self._jobs):
            self._pending = self._executor.submit(self._run, self._jobs[self._next])
            self._next += 1
        else:
            self._pending = None

    def take(self):
        """The next job's result (waiting for it), and the job after it starts loading."""
        waited = time.perf_counter()
        out, seconds = self._pending.result()
        self.wait_seconds += time.perf_counter() - waited
        self.load_seconds += seconds
        self._submit()
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


# ---- how each block is loaded: whole, or in parts ------------------------------------------------------------------

@dataclass
class _BlockPlan:
    layer: int
    experts_name: Optional[str] = None  # None: the block loads whole
    groups: list = field(default_factory=list)  # [(start, stop)] of the experts module's experts
    work_bytes: int = 0  # what one call of a group on its routes may take (see EXPERT_WORK_SHARE)


# A block in parts calls each group of experts on its routes in chunks, so the working memory of that call (the
# gathered rows, the projections, the weighted output and its float32 copy) stays inside the budget instead of growing
# with the calibration batch: 1/EXPERT_WORK_SHARE of the budget is set aside for it, at EXPERT_ROW_FACTOR x hidden
# elements per route (5.3 measured on the giant bench's DeepSeek-V3 shapes in transformers' grouped_mm path).
EXPERT_WORK_SHARE = 16
EXPERT_ROW_FACTOR = 6


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3f} MB"


def _plan_blocks(weights: StreamedWeights, budget: int) -> list[_BlockPlan]:
    """Whole blocks where one computing and the next one loading fit in the budget; otherwise the block less its
    routed experts plus groups of experts, sized so that it, the group computing and the group loading fit. Loading
    is counted at its peak (StreamedWeights.block_loading_bytes: a converter's inputs and output at once)."""
    held = weights.outer_bytes()
    if held >= budget:
        raise StreamingError(f"the weights outside the blocks (embeddings, final norm) take {_size(held)}, held for "
                             f"the whole pass, and the memory budget is {_size(budget)}; raise --memory-budget above "
                             f"{_size(held)} plus two blocks")
    plans = []
    for layer, block in enumerate(weights.blocks):
        size = weights.block_bytes(layer)
        need = held + size + weights.block_loading_bytes(layer)
        if need <= budget:
            plans.append(_BlockPlan(layer))
            continue
        found = experts_modules(block)
        if len(found) != 1:
            what = "has no routed experts to load in groups" if not found else "has several experts modules"
            raise StreamingError(f"block {layer} needs {_size(size)} and {what}, but the memory budget "
                                 f"({_size(budget)}) does not hold one such block computing and the next loading; "
                                 f"raise --memory-budget to at least {_size(need)}")
        name, module = found[0]
        # `_is_expert_parallel` marks transformers' @use_experts_implementation classes: their forward reads
        # `num_experts` and indexes the fused parameters by the top-k indices it is given, so a group of experts
        # with renumbered indices is a valid experts module of its own.
        if not hasattr(module, "_is_expert_parallel"):
            raise StreamingError(f"block {layer} needs {_size(size)} and its experts ({type(module).__name__}) do not "
                                 "follow transformers' experts interface, so they cannot run in groups; raise "
                                 f"--memory-budget to at least {_size(need)}")
        rest = held + weights.without_experts_bytes(layer, [name])
        work = budget // EXPERT_WORK_SHARE
        count = module.num_experts
        per_expert = weights.expert_bytes(layer, name, count) + weights.expert_loading_bytes(layer, name, count)
        group = (budget - work - rest) // per_expert if per_expert else count
        if group < 1:
            minimum = -(-(rest + per_expert) * EXPERT_WORK_SHARE // (EXPERT_WORK_SHARE - 1))
            raise StreamingError(f"block {layer} less its experts, with the weights outside the blocks "
                                 f"({_size(rest)}), plus one expert computing and one loading ({_size(per_expert)}) "
                                 f"and their working memory exceed the memory budget ({_size(budget)}); raise "
                                 f"--memory-budget to at least {_size(minimum)}")
        group = min(group, count)
        plans.append(_BlockPlan(layer, name, [(a, min(a + group, count)) for a in range(0, count, group)], work))
    return plans


def _load_jobs(weights: StreamedWeights, plans: list[_BlockPlan], device) -> list[Callable]:
    jobs = []
    for plan in plans:
        if plan.experts_name is None:
            jobs.append(lambda i=plan.layer: weights.block(i, device))
            continue
        jobs.append(lambda i=plan.layer, n=plan.experts_name: weights.block_without_experts(i, [n], device))
        jobs.extend(lambda i=plan.layer, n=plan.experts_name, a=a, b=b: weights.expert_group(i, n, a, b, device)
                    for a, b in plan.groups)
    return jobs


# ---- the pass ----------------------------------------------------------------------------------------------------

def _routing_arguments(module: nn.Module, args: tuple, kwargs: dict) -> list:
    """[hidden_states, top-k expert indices, top-k weights] of one call of a transformers experts module, whatever
    names the family gives them (gpt-oss passes router_indices=/routing_weights=)."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    values = list(bound.arguments.values())[1:]
    if len(values) != 3 or not all(isinstance(v, torch.Tensor) for v in values):
        raise StreamingError(f"{type(module).__name__} is not called as experts(hidden, top_k_index, top_k_weights); "
                             "raise --memory-budget so its block loads whole")
    hidden, index, weight = values
    # Routes are regrouped one per row, which needs one row of hidden state per row of top-k indices and weights.
    if hidden.dim() != 2 or index.dim() != 2 or weight.shape != index.shape or hidden.shape[0] != index.shape[0]:
        raise StreamingError(f"{type(module).__name__} is called with hidden states {tuple(hidden.shape)}, top-k "
                             f"indices {tuple(index.shape)} and weights {tuple(weight.shape)}, not (tokens, hidden) "
                             "and (tokens, k); raise --memory-budget so its block loads whole")
    return values


def _run_block_in_parts(plan: _BlockPlan, block: nn.Module, prefix: str, prefetcher: _Prefetcher, rec: _Recording,
                        store: ActivationStore, accumulator: LayerAccumulator, compute_dtype, activation_dtype,
                        device, timing: dict) -> None:
    """Block `plan.layer` as its non-expert part, then its experts group by group, then the non-expert part again
    with the summed experts output (see the module docstring)."""
    i = plan.layer
    module = block.get_submodule(plan.experts_name)
    materialise(block, prefix, prefetcher.take(), device)
    routed: list = [None] * len(rec.layouts)

    def capture(b):
        def forward(*args, **kwargs):
            routed[b] = _routing_arguments(module, args, kwargs)
            raise _StopAtBlock
        return forward

    began = time.perf_counter()
    for b in range(len(rec.layouts)):
        module.forward = capture(b)
        args, kwargs = rec.calls[b][i]
        try:
            block(store.get(b).to(compute_dtype), *args, **kwargs)
        except _StopAtBlock:
            pass
        if routed[b] is None:
            raise StreamingError(f"block {i} did not call its experts ({plan.experts_name}); raise --memory-budget "
                                 "so it loads whole")
    module.__dict__.pop("forward", None)
    timing["rest_compute_s"] += time.perf_counter() - began

    count = module.num_experts
    expert_prefix = f"{prefix}{plan.experts_name}."
    summed: list = [None] * len(rec.layouts)
    try:
        for start, stop in plan.groups:
            tensors = prefetcher.take()
            began = time.perf_counter()
            for key, tensor in tensors.items():
                module._parameters[key[len(expert_prefix):]] = nn.Parameter(tensor, requires_grad=False)
            del tensors
            module.num_experts = stop - start  # this group's experts, numbered from 0
            for b, (hidden, index, weight) in enumerate(routed):
                if summed[b] is None:
                    summed[b] = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
                routes_token, routes_slot = ((index >= start) & (index < stop)).nonzero(as_tuple=True)
                rows = max(1, plan.work_bytes // (EXPERT_ROW_FACTOR * hidden.shape[-1] * hidden.element_size()))
                # Routes are in (token, slot) order, so each token's slots are added in slot order wherever the
                # chunks fall.
                for c in range(0, routes_token.numel(), rows):
                    token, slot = routes_token[c:c + rows], routes_slot[c:c + rows]
                    out = module(hidden[token], (index[token, slot] - start).unsqueeze(-1),
                                 weight[token, slot].unsqueeze(-1))
                    # One slot at a time, so no token appears twice in one index_add_ (atomics on a GPU would add
                    # the duplicates in a run-dependent order).
                    for k in range(index.shape[1]):
                        here = slot == k
                        summed[b].index_add_(0, token[here], out[here].float())
                    del out
            timing["experts_compute_s"] += time.perf_counter() - began
            timing["expert_groups"] += 1
            module.to("meta")
    finally:
        module.num_experts = count
    summed = [s.to(r[0].dtype) for s, r in zip(summed, routed)]
    routed.clear()

    def replay(b):
        def forward(*args, **kwargs):
            return summed[b]
        return forward

    began = time.perf_counter()
    for b, layout in enumerate(rec.layouts):
        module.forward = replay(b)
        hidden_in = store.get(b)
        args, kwargs = rec.calls[b][i]
        output = block(hidden_in.to(compute_dtype), *args, **kwargs)
        hidden_out = (output if isinstance(output, torch.Tensor) else output[0]).to(activation_dtype)
        accumulator.add(i, hidden_in, hidden_out, layout)
        store.put(b, hidden_out)
        rec.calls[b][i] = None
        summed[b] = None
    module.__dict__.pop("forward", None)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    timing["rest_compute_s"] += time.perf_counter() - began
    block.to("meta")


def _quantization(source) -> Optional[str]:
    """What the streamed weights were dequantized from: "gguf", a safetensors quantization method, or None."""
    if not isinstance(source, SafetensorsSource):
        return "gguf"
    return source.dequantizer.method if source.dequantizer else None


@torch.no_grad()
def collect_layer_stats_streamed(
    model_path: str,
    calib: CalibrationSet,
    batch_size: int = 8,
    angular_span: int = 8,
    device="cpu",
    dtype: str = "float32",
    progress: bool = True,
    activation_budget: Optional[int] = None,
    memory_budget: Optional[int] = None,
    compute_dtype: Optional[str] = None,
) -> StreamedLayerStats:
    """Same LayerStats as `collect_layer_stats` on the loaded model, holding at most two parts of blocks at a time.

    model_path: a local safetensors checkpoint folder or alias (FP8 block-scaled and compressed-tensors checkpoints
    are dequantized as they load), or a .gguf file (any part of a split set; each block dequantized by gguf-py).
    dtype: the dtype activations are kept in between blocks (and BI computed from).
    memory_budget: bytes the weights held may take, the embeddings included (default:
    hardware.WEIGHT_MEMORY_FRACTION of free memory); a block that cannot compute while the next one loads within it
    runs in parts, its routed experts in groups. compute_dtype: None (= dtype), "auto", "float32", "bfloat16" or
    "float16": the dtype blocks compute in (see hardware.choose_compute_dtype); the choice and why are in
    `.streaming["compute_dtype"]`/`["compute_dtype_reason"]`. activation_budget: bytes activations may take
    on the device before they go to host memory or disk.
    Raises ScoringError (bad batch size), ModelLoadError (unknown dtype), ValueError (bad budget or compute dtype),
    StreamingError (a checkpoint it cannot read, a block it cannot split under the budget, a quantization method it
    cannot dequantize, a model whose blocks cannot be replayed one at a time).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ScoringError(f"--batch-size must be >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    device = torch.device(device)
    folder = resolve_model_path(model_path)
    gguf = gguf_model_file(folder)
    if gguf is None and not Path(folder).is_dir():
        raise StreamingError(f"streamed scoring reads a local checkpoint folder; {model_path} is not one "
                             "(download it first, e.g. with `huggingface-cli download`)")
    started = time.perf_counter()
    budget = hardware.default_memory_budget(device, memory_budget)
    activation_dtype = DTYPES[dtype]
    hardware.return_freed_blocks_to_the_os()
    if gguf is not None:
        from .gguf_weights import GGUFSource, gguf_skeleton

        # GGUF blocks are dequantized by gguf-py into float32 whatever their storage type.
        compute, compute_reason = hardware.choose_compute_dtype(compute_dtype, device, activation_dtype, None)
        skeleton_model = gguf_skeleton(gguf, compute)
        source = GGUFSource(gguf, skeleton_model)
    else:
        weight_map = _checked(st.read_weight_map, Path(folder)) or {}
        source = SafetensorsSource(folder, dequantizer_for(folder, weight_map))
        from transformers import AutoConfig

        stored_dtype = getattr(AutoConfig.from_pretrained(folder), "dtype", None)
        compute, compute_reason = hardware.choose_compute_dtype(
            compute_dtype, device, activation_dtype, stored_dtype if isinstance(stored_dtype, torch.dtype) else None)
        skeleton_model = skeleton(folder, compute)
    skel = _Skeleton(skeleton_model, calib, batch_size, device)
    model, blocks = skel.model, skel.blocks
    num_layers = len(blocks)

    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = tuple(name for name, mod in model.named_modules()
                 if output_embeddings is not None and mod is output_embeddings) + (skel.stack.path,)
    # Everything outside the block stack except the output head: the embeddings and whatever the forward needs
    # before block 0. The head is never reached, and for large vocabularies it is the biggest tensor of all.
    weights = StreamedWeights(model, source, skel.stack.path, blocks, skip)
    materialise(model, "", weights.outer(device), device)
    plans = _plan_blocks(weights, budget)
    prefetcher = _Prefetcher(_load_jobs(weights, plans, device), device)
    timing = {"rest_compute_s": 0.0, "experts_compute_s": 0.0, "expert_groups": 0}
    store = None
    try:
        # Block 0 runs once for real, to learn what a block returns (a whole block 0 stays in place for the pass).
        hidden, args, kwargs = skel.first_call()
        if plans[0].experts_name is None:
            materialise(blocks[0], weights.prefixes[0], prefetcher.take(), device)
            like_block_output = _output_like(blocks[0](hidden, *args, **kwargs))
        else:
            # A block too large to load whole returns what its siblings return; tensors and tuples led by the hidden
            # state are all transformers' MoE families produce.
            like_block_output = _output_like(hidden)
        del hidden, args, kwargs
        rec = skel.record(like_block_output)

        hidden_size = rec.first_hidden[0].shape[-1]
        element = torch.empty(0, dtype=activation_dtype).element_size()
        needed = calib.num_sequences * calib.input_ids.shape[1] * hidden_size * element
        tier, message = choose_activation_tier(needed, device, activation_budget)
        if message:
            print(f"shortgpt-fast: {message}", file=sys.stderr)
        store = ActivationStore(tier, device)
        for b, first in enumerate(rec.first_hidden):
            store.put(b, first.to(activation_dtype))
        rec.first_hidden.clear()

        accumulator = LayerAccumulator(num_layers, calib.num_sequences, angular_span, device)
        compute_seconds = 0.0
        for plan in tqdm(plans, desc="streamed scoring", unit="block", disable=not progress):
            i = plan.layer
            began = time.perf_counter()
            if plan.experts_name is not None:
                _run_block_in_parts(plan, blocks[i], weights.prefixes[i], prefetcher, rec, store, accumulator,
                                    compute, activation_dtype, device, timing)
                compute_seconds += time.perf_counter() - began
                continue
            if i > 0:  # a whole block 0 is in place since the probe
                materialise(blocks[i], weights.prefixes[i], prefetcher.take(), device)
                began = time.perf_counter()
            for b, layout in enumerate(rec.layouts):
                hidden_in = store.get(b)
                args, kwargs = rec.calls[b][i]
                output = blocks[i](hidden_in.to(compute), *args, **kwargs)
                hidden_out = (output if isinstance(output, torch.Tensor) else output[0]).to(activation_dtype)
                accumulator.add(i, hidden_in, hidden_out, layout)
                store.put(b, hidden_out)
                rec.calls[b][i] = None  # its masks may be the only reference left
                del hidden_in, output, hidden_out
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compute_seconds += time.perf_counter() - began
            blocks[i].to("meta")  # frees the block's weights
    finally:
        prefetcher.close()
        if store is not None:
            store.close()
    stats = accumulator.finish(skel.stack.path, started)
    split = [p.layer for p in plans if p.experts_name is not None]
    return StreamedLayerStats(stats.per_sequence, stats.span_angular, stats.block_path, stats.seconds, stats.metric_sums, streaming={
        "activations": tier, "activation_bytes": needed, "load_s": prefetcher.load_seconds,
        "compute_s": compute_seconds, "wait_for_load_s": prefetcher.wait_seconds, "num_layers": num_layers,
        "memory_budget": budget, "blocks_in_parts": split, **timing,
        "compute_dtype": str(compute).replace("torch.", ""), "compute_dtype_reason": compute_reason,
        "activation_dtype": dtype, "quantization": _quantization(source),
        **{f"{k}_s": v for k, v in source.seconds.items()},
    })
