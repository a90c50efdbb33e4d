"""Streamed scoring: one block in memory at a time, for models larger than the device or the host.

Scoring needs only the unpruned model's block inputs and outputs, so the forward pass can be cut at block
boundaries. The skeleton is built on the meta device; only what runs before block 0 (embeddings, rotary tables) is
materialised. One forward pass of that skeleton records the exact call every block receives: each block's `forward`
is temporarily replaced by a recorder, so per-layer inputs such as Qwen3's or Gemma2's sliding-window masks are
captured too, not only block 0's (replaying them reproduces every layer output exactly). A recorder returns what a real block returns (a tensor, or a tuple led by
the hidden state, as Falcon's and RWKV's blocks do), learnt by running block 0 once first. Then, block by block: load
its tensors from the safetensors shards through transformers' weight conversion mapping (MoE experts are stored one
tensor per expert and fused on load), replay every recorded call through it, feed the shared `LayerAccumulator`, and
drop it. The next block loads in a background thread meanwhile, so disk reads overlap compute.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..data.calibration import CalibrationSet
from ..errors import one_line
from ..io import safetensors as st
from ..models.architectures import find_block_stack
from ..models.loading import DTYPES, ModelLoadError, resolve_model_path
from .block_influence import LayerAccumulator, LayerStats, ScoringError, _forward_kwargs, batch_layout

# Fraction of free memory that activations may take; the rest is for two blocks in flight and the kernels' scratch.
ACTIVATION_MEMORY_FRACTION = 0.5
# Streaming is chosen automatically when the model would take more than this fraction of the free memory.
AUTO_STREAM_FRACTION = 0.8


class StreamingError(ScoringError):
    """Streamed scoring refused or failed: a damaged checkpoint header or index, or an activation spill file that
    returned too few bytes. A ScoringError, so callers that catch scoring errors catch it too.
    """

    pass


@dataclass
class StreamedLayerStats(LayerStats):
    """LayerStats plus how the streamed run kept its activations and where its time went."""

    streaming: dict = field(default_factory=dict)


# ---- checkpoint access -----------------------------------------------------------------------------------------

def _checked(read, path: Path):
    """`read(path)` with a malformed header or index (shortgpt_fast.io.safetensors) reported as a StreamingError."""
    try:
        return read(path)
    except st.SafetensorsError as err:
        hint = "" if "re-save" in str(err) else "; re-download or re-save the checkpoint"
        raise StreamingError(f"{err}{hint}") from None


class CheckpointShards:
    """Tensor name -> shard file of a safetensors checkpoint folder, read lazily through mmap (safe_open)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        weight_map = _checked(st.read_weight_map, self.folder)
        if weight_map is None:
            raise StreamingError(f"{folder} holds no safetensors weights (model.safetensors or its index); streamed "
                                 "scoring reads only safetensors checkpoints")
        self.weight_map = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def total_bytes(self, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes of every tensor, as stored or, given `dtype`, after casting floating tensors to it."""
        total = 0
        for shard in sorted(set(self.weight_map.values())):
            # The reader refuses an unknown dtype by name: guessing its size would misjudge what fits in memory.
            for _name, stored_dtype, shape, begin, end in _checked(st.read_header, self.folder / shard)["tensors"]:
                if dtype is not None and stored_dtype in st.FLOAT_DTYPES:
                    count = 1
                    for dim in shape:
                        count *= dim
                    total += count * torch.empty(0, dtype=dtype).element_size()
                else:
                    total += end - begin
        return total

    def load(self, wanted: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
        """Read checkpoint tensors `wanted` (name -> template giving the dtype) straight onto `device`."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in wanted:
            if name not in self.weight_map:
                raise StreamingError(f"tensor {name} is not in the checkpoint {self.folder}; it may need a newer "
                                     "transformers or a family entry in shortgpt_fast/models/architectures.py")
            by_shard.setdefault(self.weight_map[name], []).append(name)
        loaded = {}
        # safe_open on a CUDA device copies each tensor straight from the mmap to the GPU.
        open_device = str(device) if torch.device(device).type == "cuda" else "cpu"
        for shard, names in by_shard.items():
            path = self.folder / shard
            # Opened per block, not kept open: touched mmap pages count as resident until the file is unmapped.
            try:
                handle = safe_open(str(path), framework="pt", device=open_device)
            except Exception as err:  # safetensors raises its own error types for every kind of damage
                raise StreamingError(self._damage_message(path, names[0], err)) from None
            with handle as fh:
                for name in names:
                    try:
                        tensor = fh.get_tensor(name)
                    except Exception as err:
                        raise StreamingError(self._damage_message(path, name, err)) from None
                    if tensor.is_floating_point():
                        if not bool(torch.isfinite(tensor).all()):
                            raise StreamingError(f"shard {shard} is corrupt: tensor {name} holds NaN or inf values; "
                                                 "re-download or re-save the checkpoint")
                        tensor = tensor.to(wanted[name].dtype)
                    tensor = tensor.to(device)
                    if tensor.device.type == "cpu":
                        # Own the bytes: a view into the shard's mmap would pin every page this shard map touched
                        # (RSS grew by a third of a block per block until the end of the pass).
                        tensor = tensor.clone()
                    loaded[name] = tensor
        return loaded

    def _damage_message(self, path: Path, name: str, err: Exception) -> str:
        """Name the tensor that lies where the file is damaged, which is not always the one being read."""
        try:
            st.read_header(path)
        except (st.SafetensorsError, OSError) as damage:
            # The header reader names the tensor a truncation falls in (the first one in data order it cuts).
            return f"{one_line(damage)}; re-download or re-save the checkpoint"
        reason = one_line(err)
        return (f"shard {path.name} is corrupt or truncated at tensor {name} ({reason}); re-download or re-save "
                "the checkpoint")


# ---- memory estimates ------------------------------------------------------------------------------------------

def available_memory_bytes(device) -> int:
    """Free memory in bytes (int) where `device` (str or torch.device) would hold tensors.

    cuda: the free memory torch.cuda.mem_get_info reports for that GPU. Otherwise: MemAvailable from /proc/meminfo,
    or psutil's available memory where /proc is missing. Example: available_memory_bytes("cpu").
    Raises ImportError when neither /proc/meminfo nor psutil is available, RuntimeError for an invalid device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # only where /proc is missing

    return int(psutil.virtual_memory().available)


def streaming_decision(model: str, dtype: str, device) -> tuple[bool, str]:
    """(stream?, the estimate behind it) for a local checkpoint: stream when it would not fit in free memory."""
    if dtype not in DTYPES:
        return False, f"unknown dtype {dtype!r}"  # the loader reports it with the valid choices
    folder = resolve_model_path(model)
    if not Path(folder).is_dir():
        return False, f"{model} is not a local checkpoint; loading it whole"
    if _checked(st.read_weight_map, Path(folder)) is None:
        return False, f"{model} has no safetensors weights to stream; loading it whole"
    # A damaged header or an unknown dtype is refused here, in one line, rather than guessed at or loaded whole.
    need = CheckpointShards(folder).total_bytes(DTYPES[dtype])
    have = available_memory_bytes(device)
    stream = need > AUTO_STREAM_FRACTION * have
    verdict = "scoring streamed, one block at a time" if stream else "loading it whole"
    return stream, (f"model needs about {need / 1e9:.2f} GB in {dtype}; {have / 1e9:.2f} GB free on {device}: "
                    f"{verdict}")


# ---- activations -------------------------------------------------------------------------------------------------

class ActivationStore:
    """Hidden states of every calibration batch between two blocks: on the device, in (pinned) host memory, or in a
    temporary file when neither can hold them."""

    def __init__(self, tier: str, device):
        self.tier = tier
        self.device = torch.device(device)
        self._held: dict[int, torch.Tensor] = {}
        self._file = None
        self._slots: dict[int, tuple[int, torch.Size, torch.dtype]] = {}
        self._end = 0
        if tier == "disk":
            self._file = tempfile.TemporaryFile(prefix="shortgpt-fast-activations-")

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        if self.tier == "device":
            self._held[batch] = hidden
        elif self.tier == "host":
            host = self._held.get(batch)
            if host is None or host.shape != hidden.shape or host.dtype != hidden.dtype:
                host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=self.device.type == "cuda")
                self._held[batch] = host
            host.copy_(hidden)
        else:
            data = hidden.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()
            if batch not in self._slots:
                self._slots[batch] = (self._end, hidden.shape, hidden.dtype)
                self._end += data.nbytes
            offset = self._slots[batch][0]
            os.pwrite(self._file.fileno(), data, offset)

    def get(self, batch: int) -> torch.Tensor:
        if self.tier == "device":
            return self._held[batch]
        if self.tier == "host":
            return self._held[batch].to(self.device, non_blocking=True)
        offset, shape, dtype = self._slots[batch]
        out = torch.empty(shape, dtype=dtype)
        view = out.view(torch.uint8).reshape(-1).numpy()
        read = os.preadv(self._file.fileno(), [view], offset)
        if read != view.nbytes:
            raise StreamingError(f"the activation spill file returned {read} of {view.nbytes} bytes; is the "
                                 "temporary folder full?")
        return out.to(self.device)

    def close(self) -> None:
        self._held.clear()
        if self._file is not None:
            self._file.close()


def choose_activation_tier(needed: int, device, budget: Optional[int]) -> tuple[str, str]:
    """Where the streamed pass keeps `needed` bytes of activations: ("device" | "host" | "disk", note).

    budget: bytes allowed on `device`, or None for ACTIVATION_MEMORY_FRACTION of its free memory. "device" when they
    fit (note ""); on CUDA, "host" (pinned memory) when they fit in that fraction of free host memory; else "disk"
    (a temporary file). The note says why for the user. Never refuses: the disk tier is the last resort.
    Example: choose_activation_tier(1 << 20, "cpu", None) == ("device", "") on a machine with a few MB free.
    """
    device = torch.device(device)
    device_budget = budget if budget is not None else int(ACTIVATION_MEMORY_FRACTION * available_memory_bytes(device))
    if needed <= device_budget:
        return "device", ""
    if device.type == "cuda":
        host_budget = int(ACTIVATION_MEMORY_FRACTION * available_memory_bytes("cpu"))
        if needed <= host_budget:
            return "host", (f"activations ({needed / 1e9:.2f} GB) exceed the device budget "
                            f"({device_budget / 1e9:.2f} GB); keeping them in pinned host memory")
    return "disk", (f"activations ({needed / 1e9:.2f} GB) exceed the memory budget ({device_budget / 1e9:.2f} GB); "
                    f"spilling them to a temporary file in {tempfile.gettempdir()} (slower; lower --samples or "
                    "--seq-len to avoid it)")


# ---- the streamed pass -----------------------------------------------------------------------------------------

def _return_freed_blocks_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB. By default it rises to the size of the largest chunk freed (up to 32 MiB),
    so once the first block is freed, later blocks' tensors come from the heap and their memory is kept after they
    are freed: on a 24-layer checkpoint peak RSS grew by 128 MiB instead of the ~40 MiB three blocks take."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(name).mallopt(-3, 1 << 20)  # -3 is M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc (musl has no mallopt); its allocator returns large chunks anyway


def _skeleton(folder: str, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..models.loading import _is_causal_lm

    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    # Parameters on meta; buffers real, because non-persistent ones (rotary inv_freq) are computed, never stored.
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype)
    return model.eval()


class WeightPlan:
    """Which checkpoint tensors make each model tensor, and how, by transformers' own weight conversion mapping.

    transformers 5 renames some checkpoint names on load (Mixtral's `block_sparse_moe` is `mlp`) and fuses others
    (MoE experts are stored one tensor per expert and loaded as one `gate_up_proj`/`down_proj` per layer). Streamed
    loading goes through the same renamings and converters as `from_pretrained`, only one block at a time, so a block
    holds exactly the weights the loaded model would.
    """

    def __init__(self, model: nn.Module, shards: CheckpointShards):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self._converters = {pattern: c for c in converters for pattern in c.source_patterns}
        self.templates = model.state_dict(keep_vars=True)
        # Adds or strips the base model's prefix, so a base-model checkpoint loads into a ForCausalLM and back.
        prefix = model.base_model_prefix
        # model key -> [(checkpoint name, converter source pattern or None)], grouped as from_pretrained groups them
        self.sources: dict[str, list[tuple[str, Optional[str]]]] = {}
        for name in sorted(shards.names(), key=dot_natural_key):
            key, pattern = rename_source_key(name, renamings, converters, prefix, self.templates)
            if key not in self.templates and name in self.templates:
                key, pattern = rename_source_key(name, [], [], prefix, self.templates)
            if key in self.templates:
                self.sources.setdefault(key, []).append((name, pattern))

    def _produces(self, key: str) -> list[str]:
        """Every model key that loading `key`'s sources sets: a one-to-many converter (a fused qkv) sets several."""
        pattern = self.sources[key][0][1]
        if pattern is None:
            return [key]
        targets = self._converters[pattern].target_patterns
        return [key.replace(targets[0], t) for t in targets]

    def for_module(self, module: nn.Module, module_prefix: str, skip: tuple[str, ...] = ()) -> dict:
        """The plan's entries for `module` (named `module_prefix` in the model), less the `skip`ped subtrees."""
        def skipped(full: str) -> bool:
            return any(full == s or full.startswith(s + ".") for s in skip)

        entries = {key: sources for key, sources in self.sources.items()
                   if key.startswith(module_prefix) and not skipped(key)}
        covered = {k for key in entries for k in self._produces(key)}
        for name, _ in module.named_parameters():
            full = module_prefix + name
            if full not in covered and not skipped(full):
                raise StreamingError(f"the checkpoint has no tensor for parameter {full}; it may need a newer "
                                     "transformers, or score this model in memory (drop --streamed)")
        return entries

    def checkpoint_names(self, entries: dict) -> dict[str, torch.Tensor]:
        """checkpoint name -> template whose dtype it loads in: that of the model tensor it becomes."""
        return {name: self.templates[key] for key, sources in entries.items() for name, _ in sources}

    def convert(self, entries: dict, loaded: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Model key -> tensor, from the loaded checkpoint tensors, through the converters from_pretrained uses."""
        out = {}
        for key, sources in entries.items():
            pattern = sources[0][1]
            if pattern is None:
                out[key] = loaded[sources[0][0]]  # two names for one tensor: the first wins, as in from_pretrained
                continue
            converter = deepcopy(self._converters[pattern])  # it collects tensors, so one instance per target
            for name, source_pattern in sources:
                converter.add_tensor(key, name, source_pattern, loaded[name])
            try:
                converted = converter.convert(key, model=model, config=model.config)
            except Exception as err:  # noqa: BLE001 - the ops raise whatever torch raises on mismatched inputs
                reason = one_line(err)
                raise StreamingError(f"cannot build {key} from its {len(sources)} checkpoint tensors ({reason}); the "
                                     "checkpoint may be incomplete: re-download or re-save it") from None
            for target, value in converted.items():
                out[target] = value[0] if isinstance(value, list) else value
        return out


def _materialise(module: nn.Module, module_prefix: str, state: dict[str, torch.Tensor], device) -> None:
    """Assign `state` (model key -> tensor, all under `module_prefix`) to `module` and move its buffers to `device`."""
    expected = module.state_dict(keep_vars=True)
    local = {}
    for key, tensor in state.items():
        if not key.startswith(module_prefix):
            raise StreamingError(f"the weight conversion set {key}, outside {module_prefix.rstrip('.') or 'the model'}"
                                 "; score this model in memory (drop --streamed)")
        name = key[len(module_prefix):]
        if name in expected and expected[name].shape != tensor.shape:
            raise StreamingError(f"the checkpoint gives {key} the shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(expected[name].shape)}; the checkpoint is incomplete or does not match its "
                                 "config.json: re-download or re-save it")
        local[name] = tensor
    module.load_state_dict(local, strict=False, assign=True)
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device.type != "meta" and buf.device != torch.device(device):
                sub._buffers[name] = buf.to(device)


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
    """Raised by a recorder once it has what it was installed for."""


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
) -> StreamedLayerStats:
    """Same LayerStats as `collect_layer_stats` on the loaded model, holding at most two blocks at a time."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ScoringError(f"--batch-size must be >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    device = torch.device(device)
    folder = resolve_model_path(model_path)
    if not Path(folder).is_dir():
        raise StreamingError(f"streamed scoring reads a local checkpoint folder; {model_path} is not one "
                             "(download it first, e.g. with `huggingface-cli download`)")
    started = time.perf_counter()
    _return_freed_blocks_to_the_os()
    shards = CheckpointShards(folder)
    model = _skeleton(folder, DTYPES[dtype])
    stack = find_block_stack(model)
    blocks = stack.blocks
    num_layers = len(blocks)
    model_type = getattr(model.config, "model_type", None)
    plan = WeightPlan(model, shards)

    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = tuple(name for name, mod in model.named_modules()
                 if output_embeddings is not None and mod is output_embeddings) + (stack.path,)
    # Everything outside the block stack except the output head: the embeddings and whatever the forward needs
    # before block 0. The head is never reached, and for large vocabularies it is the biggest tensor of all.
    outer = plan.for_module(model, "", skip=skip)
    _materialise(model, "", plan.convert(outer, shards.load(plan.checkpoint_names(outer), device), model), device)

    prefixes = [f"{stack.path}.{i}." for i in range(num_layers)]
    entries = [plan.for_module(blocks[i], prefixes[i]) for i in range(num_layers)]
    # On a GPU the loads go on their own stream, or they would queue behind the compute they are meant to overlap.
    load_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def load_block(i: int):
        began = time.perf_counter()
        if load_stream is None:
            tensors = plan.convert(entries[i], shards.load(plan.checkpoint_names(entries[i]), device), model)
        else:
            with torch.cuda.stream(load_stream):
                tensors = plan.convert(entries[i], shards.load(plan.checkpoint_names(entries[i]), device), model)
            load_stream.synchronize()  # the block is complete before the compute stream touches it
        return tensors, time.perf_counter() - began

    num_seqs = calib.num_sequences
    needs_positions = bool((calib.attention_mask == 0).any())
    starts = list(range(0, num_seqs, batch_size))

    def run_to_blocks(start: int) -> None:
        """The model's forward on one batch, until a recorder stops it."""
        stop = min(start + batch_size, num_seqs)
        ids = calib.input_ids[start:stop].to(device)
        mask2d = calib.attention_mask[start:stop].to(device)
        try:
            model(**_forward_kwargs(model, ids, mask2d, needs_positions))
        except _StopAtBlock:
            return
        except (RuntimeError, NotImplementedError) as err:
            if "meta" in str(err):
                raise StreamingError(
                    f"{type(model).__name__} ({model_type}) uses weights outside its block stack between "
                    f"blocks, so its blocks cannot be replayed one at a time: {one_line(err)}") from None
            raise
        raise StreamingError(f"the forward pass of {type(model).__name__} never reached its last block "
                             f"({stack.path}); it cannot be scored streamed")

    # ---- run block 0 once for real, to learn what a block returns -----------------------------------------------
    probe: dict = {}

    def probe_first_block(*args, **kwargs):
        probe["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        probe["call"] = (args[1:], kwargs)
        raise _StopAtBlock

    blocks[0].forward = probe_first_block
    try:
        run_to_blocks(starts[0])
    finally:
        blocks[0].__dict__.pop("forward", None)
    tensors, load_seconds = load_block(0)
    _materialise(blocks[0], prefixes[0], tensors, device)
    del tensors
    args, kwargs = probe["call"]
    like_block_output = _output_like(blocks[0](probe["hidden"], *args, **kwargs))
    probe.clear()
    del args, kwargs

    # ---- record every block's call for every batch --------------------------------------------------------------
    calls: list[list] = []  # [batch][layer] -> (args after hidden_states, kwargs)
    layouts = []
    first_hidden = []
    recorded: list = [None] * num_layers
    passed_on: list = [None]  # the hidden state the last recorder returned

    def recorder(layer: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if layer == 0:
                first_hidden.append(hidden)
            elif hidden is not passed_on[0] and not torch.equal(hidden, passed_on[0]):
                # Replay feeds each block the previous block's output; a forward that changes the hidden state
                # between blocks (RWKV's rescale_every halving) would be scored on inputs the model never sees.
                raise StreamingError(f"{type(model).__name__} ({model_type}) changes the hidden state between blocks "
                                     f"{layer - 1} and {layer}, so its blocks cannot be replayed one at a time; score "
                                     "it in memory (drop --streamed)")
            recorded[layer] = (args[1:], dict(kwargs))
            if layer == num_layers - 1:
                raise _StopAtBlock
            passed_on[0] = hidden
            return like_block_output(hidden)

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for start in starts:
            before = len(first_hidden)
            run_to_blocks(start)
            if len(first_hidden) != before + 1 or any(r is None for r in recorded):
                raise StreamingError(f"the forward pass of {type(model).__name__} does not call each block of "
                                     f"{stack.path} once per batch; score it in memory (drop --streamed)")
            calls.append(list(recorded))
            recorded[:] = [None] * num_layers
            stop = min(start + batch_size, num_seqs)
            layouts.append(batch_layout(calib.attention_mask[start:stop].to(device), start, device))
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    passed_on[0] = None

    hidden_size = first_hidden[0].shape[-1]
    element = first_hidden[0].element_size()
    needed = num_seqs * calib.input_ids.shape[1] * hidden_size * element
    tier, message = choose_activation_tier(needed, device, activation_budget)
    if message:
        print(f"shortgpt-fast: {message}", file=sys.stderr)
    store = ActivationStore(tier, device)
    for b, hidden in enumerate(first_hidden):
        store.put(b, hidden)
    first_hidden.clear()

    # ---- one block at a time, the next one loading meanwhile --------------------------------------------------
    accumulator = LayerAccumulator(num_layers, num_seqs, angular_span, device)
    compute_seconds = 0.0
    wait_seconds = load_seconds  # block 0's load overlapped nothing
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shortgpt-prefetch")
    try:
        pending = executor.submit(load_block, 1) if num_layers > 1 else None
        for i in tqdm(range(num_layers), desc="streamed scoring", unit="block", disable=not progress):
            if i > 0:  # block 0 is in place since the probe
                waited = time.perf_counter()
                tensors, seconds = pending.result()
                wait_seconds += time.perf_counter() - waited
                load_seconds += seconds
                if i + 1 < num_layers:
                    pending = executor.submit(load_block, i + 1)
                _materialise(blocks[i], prefixes[i], tensors, device)
                del tensors
            began = time.perf_counter()
            for b, layout in enumerate(layouts):
                hidden_in = store.get(b)
                args, kwargs = calls[b][i]
                output = blocks[i](hidden_in, *args, **kwargs)
                hidden_out = output if isinstance(output, torch.Tensor) else output[0]
                accumulator.add(i, hidden_in, hidden_out, layout)
                store.put(b, hidden_out)
                calls[b][i] = None  # its masks may be the only reference left
                del hidden_in, output, hidden_out
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compute_seconds += time.perf_counter() - began
            blocks[i].to("meta")  # frees the block's weights
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        store.close()
    stats = accumulator.finish(stack.path, started)
    return StreamedLayerStats(stats.per_sequence, stats.span_angular, stats.block_path, stats.seconds, streaming={
        "activations": tier, "activation_bytes": needed, "load_s": load_seconds, "compute_s": compute_seconds,
        "wait_for_load_s": wait_seconds, "num_layers": num_layers,
    })
