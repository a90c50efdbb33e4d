"""Where a streamed pass gets its weights: a checkpoint read one block (or one group of experts) at a time.

Two layers. A *weight source* knows a checkpoint's tensors by name and reads any subset of them onto a device,
dequantized (`SafetensorsSource` here, `GGUFSource` in gguf_weights.py; three methods: `names`, `total_bytes`,
`load`). `StreamedWeights` puts transformers' own weight conversion mapping on top (renamings, and the fusion of
per-expert tensors into one 3-D tensor per layer), so it can hand out the model tensors of the non-layer part, of one
block by layer index, of one block less its routed experts, and of a contiguous group of a block's experts.
"""
from __future__ import annotations

import re
import time
from contextlib import ExitStack, contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import nn

from ..errors import one_line
from ..io import safetensors as st
from .block_influence import ScoringError


class StreamingError(ScoringError):
    """Streamed scoring refused or failed: a damaged checkpoint header or index, a block that cannot be split under
    the memory budget, or an activation spill file that returned too few bytes. A ScoringError, so callers that catch
    scoring errors catch it too.
    """

    pass


class WeightSource(Protocol):
    """A checkpoint's tensors by name. `load` returns real (dequantized) tensors in the templates' dtypes."""

    folder: Path

    def names(self) -> list[str]:
        """Every tensor name a model may ask for (quantization scales and packed parts are not listed)."""

    def total_bytes(self, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes of every tensor as stored, or, given `dtype`, with floating tensors in that dtype."""

    def load(self, wanted: dict[str, "TensorRequest"], device) -> dict[str, torch.Tensor]:
        """name -> tensor on `device`, for each requested name (rows sliced where the request says so; written into
        the request's `out` where the source can, else a tensor of its own)."""


@dataclass(frozen=True)
class TensorRequest:
    """What to read for one checkpoint name: the dtype it becomes, and optionally only rows [start, stop) of dim 0
    (one group of experts out of a tensor that stores them all)."""

    dtype: torch.dtype
    rows: Optional[tuple[int, int]] = None
    # Where to write it (one expert's rows of a fused tensor), so it is not built apart and copied; a source may
    # ignore it and return its own tensor, which the caller then copies.
    out: Optional[torch.Tensor] = field(default=None, compare=False)


# ---- the safetensors source ----------------------------------------------------------------------------------

def _checked(read, path: Path):
    """`read(path)` with a malformed header or index (shortgpt_fast.io.safetensors) reported as a StreamingError."""
    try:
        return read(path)
    except st.SafetensorsError as err:
        hint = "" if "re-save" in str(err) else "; re-download or re-save the checkpoint"
        raise StreamingError(f"{err}{hint}") from None


class SafetensorsSource:
    """Tensor name -> shard file of a safetensors checkpoint folder, read lazily through mmap (safe_open).

    `dequantizer` (see scoring/dequantize.py) folds a quantized weight and its companions (scales, zero points,
    packed shape) into one floating tensor under the weight's name as each one loads, on the scoring device.
    """

    def __init__(self, folder: str, dequantizer=None):
        self.folder = Path(folder)
        weight_map = _checked(st.read_weight_map, self.folder)
        if weight_map is None:
            raise StreamingError(f"{folder} holds no safetensors weights (model.safetensors or its index); streamed "
                                 "scoring reads only safetensors checkpoints")
        self.weight_map = weight_map
        self.dequantizer = dequantizer
        # logical name -> (stored root name, stored companion names) for every quantized weight
        self._quantized: dict[str, tuple[str, tuple[str, ...]]] = {}
        if dequantizer is not None:
            for name in weight_map:
                parts = dequantizer.parts(name)
                if parts is not None:
                    logical, companions = parts
                    self._quantized[logical] = (name, tuple(companions))
        hidden = {n for root, companions in self._quantized.values() for n in (root, *companions)}
        self._names = [n for n in weight_map if n not in hidden] + list(self._quantized)
        # Seconds spent reading (and copying onto the device) and dequantizing, over the whole pass.
        self.seconds = {"read": 0.0, "dequantize": 0.0}

    def names(self) -> list[str]:
        return list(self._names)

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

    def load(self, wanted: dict[str, TensorRequest], device) -> dict[str, torch.Tensor]:
        """Read checkpoint tensors `wanted` (name -> TensorRequest) straight onto `device`, dequantized; a request's
        `out` is written in place and returned."""
        stored: dict[str, Optional[tuple[int, int]]] = {}
        into: dict[str, torch.Tensor] = {}
        for name, request in wanted.items():
            for part in (self._quantized[name][0], *self._quantized[name][1]) if name in self._quantized else (name,):
                if part not in self.weight_map:
                    raise StreamingError(f"tensor {part} is not in the checkpoint {self.folder}; it may need a newer "
                                         "transformers or a family entry in shortgpt_fast/models/architectures.py")
                stored[part] = request.rows
            if request.out is not None and name not in self._quantized:
                into[name] = request.out
        began = time.perf_counter()
        loaded = {}
        with self._mapped(stored, device, into) as raw:
            self.seconds["read"] += time.perf_counter() - began
            began = time.perf_counter()
            mapped = {t.untyped_storage().data_ptr() for n, t in raw.items()
                      if t.device.type == "cpu" and n not in into}
            for name, request in wanted.items():
                if name in self._quantized:
                    root, companions = self._quantized[name]
                    parts = {part: raw.pop(part) for part in (root, *companions)}
                    # The dequantizer reads the mapped bytes where they lie: cloning them first cost as much again
                    # as the FP8 kernel itself.
                    tensor = self.dequantizer.dequantize(name, root, parts, request.dtype, request.out)
                    del parts
                else:
                    tensor = raw.pop(name)
                    if tensor.is_floating_point():
                        tensor = tensor.to(request.dtype)
                if name not in into and tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in mapped:
                    # Own the bytes: a view into the shard's mmap would pin every page this shard map touched (RSS
                    # grew by a third of a block per block until the end of the pass), and dies with the mapping.
                    tensor = tensor.clone()
                # Checked in the dtype it is computed in: a value beyond float16's range becomes inf in the cast.
                if tensor.is_floating_point():
                    self._check_finite(name, tensor, self.weight_map[self._quantized[name][0] if name in
                                                                      self._quantized else name])
                loaded[name] = tensor
        self.seconds["dequantize"] += time.perf_counter() - began
        return loaded

    @staticmethod
    def _check_finite(name: str, tensor: torch.Tensor, shard: str) -> None:
        from ..ops.finite import all_finite

        if not all_finite(tensor):
            raise StreamingError(f"shard {shard}: tensor {name} holds NaN or inf values in "
                                 f"{str(tensor.dtype).replace('torch.', '')}; the shard is corrupt or the compute dtype "
                                 "too narrow: re-download or re-save the checkpoint, or compute in float32")

    @contextmanager
    def _mapped(self, stored: dict[str, Optional[tuple[int, int]]], device,
                into: Optional[dict[str, torch.Tensor]] = None):
        """name -> tensor as stored, valid inside the `with` only: on the CPU a view into the shard's mmap, which is
        unmapped on exit. A name in `into` is copied (and cast) from the file straight into that tensor instead."""
        from safetensors import safe_open

        into = into or {}
        by_shard: dict[str, list[str]] = {}
        for name in stored:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        # safe_open on a CUDA device copies each tensor straight from the mmap to the GPU.
        open_device = str(device) if torch.device(device).type == "cuda" else "cpu"
        out = {}
        with ExitStack() as files:
            for shard, names in by_shard.items():
                path = self.folder / shard
                # Opened per part, not kept open: touched mmap pages count as resident until the file is unmapped.
                try:
                    fh = files.enter_context(safe_open(str(path), framework="pt", device=open_device))
                except Exception as err:  # safetensors raises its own error types for every kind of damage
                    raise StreamingError(self._damage_message(path, names[0], err)) from None
                for name in names:
                    rows = stored[name]
                    try:
                        tensor = fh.get_tensor(name) if rows is None else fh.get_slice(name)[rows[0]:rows[1]]
                    except Exception as err:
                        raise StreamingError(self._damage_message(path, name, err)) from None
                    if name in into and into[name].shape == tensor.shape:
                        tensor = into[name].copy_(tensor)
                    out[name] = tensor.to(device)
            try:
                yield out
            finally:
                out.clear()  # no view outlives its mapping

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


# The name streamed scoring used before sources were pluggable.
CheckpointShards = SafetensorsSource


# ---- the model skeleton and how checkpoint tensors become its tensors -----------------------------------------

def skeleton(folder: str, dtype: torch.dtype) -> nn.Module:
    """The model of `folder`'s config.json with parameters on the meta device (buffers real) and no quantization:
    quantized weights are dequantized as they load, so the model computes in `dtype`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..models.loading import _is_causal_lm

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    auto = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    # Parameters on meta; buffers real, because non-persistent ones (rotary inv_freq) are computed, never stored.
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype)
    return model.eval()


_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


class WeightPlan:
    """Which checkpoint tensors make each model tensor, and how, by transformers' own weight conversion mapping.

    transformers 5 renames some checkpoint names on load (Mixtral's `block_sparse_moe` is `mlp`) and fuses others
    (MoE experts are stored one tensor per expert and loaded as one `gate_up_proj`/`down_proj` per layer). Streamed
    loading goes through the same renamings and converters as `from_pretrained`, only one block at a time, so a block
    holds exactly the weights the loaded model would.
    """

    def __init__(self, model: nn.Module, source: WeightSource):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self._converters = {pattern: c for c in converters for pattern in c.source_patterns}
        self.templates = model.state_dict(keep_vars=True)
        # Adds or strips the base model's prefix, so a base-model checkpoint loads into a ForCausalLM and back.
        prefix = model.base_model_prefix
        # model key -> [(checkpoint name, converter source pattern or None)], grouped as from_pretrained groups them.
        # Names that become no model tensor (a DeepSeek MTP layer past num_hidden_layers) are never read.
        self.sources: dict[str, list[tuple[str, Optional[str]]]] = {}
        for name in sorted(source.names(), key=dot_natural_key):
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

    def requests(self, entries: dict, rows: Optional[dict[str, tuple[int, int]]] = None) -> dict[str, TensorRequest]:
        """checkpoint name -> TensorRequest in the dtype of the model tensor it becomes; `rows` names the tensors
        stored with all experts fused, of which only one group's rows are read."""
        rows = rows or {}
        return {name: TensorRequest(self.templates[key].dtype, rows.get(name))
                for key, sources in entries.items() for name, _ in sources}

    def stacked_sources(self, key: str) -> Optional[list[list[str]]]:
        """The checkpoint names of `key`, one list per source pattern in concatenation order, each in stacking order,
        when its converter only stacks per-expert tensors along a new dim 0 and concatenates the stacks along dim 1
        (transformers' MoE expert fusion: [MergeModulelist(dim=0)] or [MergeModulelist(dim=0), Concatenate(dim=1)]);
        None for every other converter, or when the patterns do not hold one tensor per expert each.

        Such a tensor can be filled in place, one expert at a time, instead of holding every per-expert tensor, the
        stacks and their concatenation at once (2.7x the fused tensor, measured on the DeepSeek-V3-shaped bench).
        """
        from transformers.core_model_loading import Concatenate, MergeModulelist

        sources = self.sources[key]
        pattern = sources[0][1]
        if pattern is None:
            return None
        converter = self._converters[pattern]
        # Exact types, not isinstance: a subclass may convert differently.
        ops = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        if len(converter.target_patterns) != 1 or ops not in ([(MergeModulelist, 0)],
                                                              [(MergeModulelist, 0), (Concatenate, 1)]):
            return None
        if len(ops) == 1 and len(converter.source_patterns) != 1:
            return None  # MergeModulelist alone maps several patterns to several targets
        by_pattern: dict[str, list[str]] = {p: [] for p in converter.source_patterns}
        for name, source_pattern in sources:
            by_pattern[source_pattern].append(name)
        lists = list(by_pattern.values())
        if not lists[0] or any(len(names) != len(lists[0]) for names in lists):
            return None  # the converter reports what is missing
        return lists

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


def materialise(module: nn.Module, module_prefix: str, state: dict[str, torch.Tensor], device) -> None:
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


# ---- one block, or one block in parts ------------------------------------------------------------------------

def _nbytes(template: torch.Tensor) -> int:
    return template.numel() * template.element_size()


# A tensor built by one of transformers' converters has its inputs, the intermediate stacks and itself in memory at
# once: 2.67x the output for DeepSeek-V3's fused experts (measured on bench/bench_giant.py's shapes). Per-expert
# stacks are filled in place instead (StreamedWeights._load_stacked, 1.05x measured), and plain tensors load as they
# are, so only converted tensors are planned at this factor.
CONVERTED_LOADING_FACTOR = 3


def experts_modules(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name in the block, module) of each routed-experts module: transformers' fused experts, whose parameters all
    lead with the expert dimension (`num_experts`), at least one of them 3-D (a router's weight is 2-D)."""
    found = []
    for name, module in block.named_modules():
        count = getattr(module, "num_experts", None)
        params = list(module.named_parameters(recurse=False))
        if (isinstance(count, int) and count > 1 and any(p.dim() == 3 for _, p in params)
                and all(p.dim() >= 2 and p.shape[0] == count for _, p in params)):
            found.append((name, module))
    return found


class StreamedWeights:
    """The model tensors of a checkpoint, handed out by part: the non-layer part, a block by layer index, a block less
    its routed experts, or a contiguous group [start, stop) of one experts module's experts."""

    def __init__(self, model: nn.Module, source: WeightSource, stack_path: str, blocks, skip: tuple[str, ...]):
        self.model = model
        self.source = source
        self.plan = WeightPlan(model, source)
        self.skip = skip
        self.prefixes = [f"{stack_path}.{i}." for i in range(len(blocks))]
        self.blocks = blocks
        self._entries = [self.plan.for_module(blocks[i], self.prefixes[i]) for i in range(len(blocks))]

    def _load(self, entries: dict, device, rows=None) -> dict[str, torch.Tensor]:
        rows = rows or {}
        stacked = {}
        for key, sources in entries.items():
            layout = self.plan.stacked_sources(key) if not any(name in rows for name, _ in sources) else None
            # The plan's layout covers all of the layer's experts; a group loads a subset of them.
            if layout is not None:
                picked = {name for name, _ in sources}
                layout = [[name for name in names if name in picked] for names in layout]
                if all(len(names) == len(layout[0]) > 0 for names in layout):
                    stacked[key] = layout
        out = {key: self._load_stacked(key, layout, device) for key, layout in stacked.items()}
        rest = {key: sources for key, sources in entries.items() if key not in stacked}
        if rest:
            out.update(self.plan.convert(rest, self.source.load(self.plan.requests(rest, rows), device), self.model))
        return out

    def _load_stacked(self, key: str, layout: list[list[str]], device) -> torch.Tensor:
        """Model tensor `key` as transformers' expert fusion builds it (see WeightPlan.stacked_sources), filled one
        expert at a time: out[e] is the concatenation along dim 0 of expert e's tensor from each source pattern."""
        dtype = self.plan.templates[key].dtype
        count = len(layout[0])
        out, widths = None, []
        for e in range(count):
            names = [names[e] for names in layout]
            slices = {}
            if out is not None:
                offsets = [sum(widths[:i]) for i in range(len(widths))]
                slices = {name: out[e, a:a + w] for name, a, w in zip(names, offsets, widths)}
            # One load per expert: the shard stays mapped for the whole call, so only one expert's stored pages are
            # resident at a time.
            loaded = self.source.load({name: TensorRequest(dtype, out=slices.get(name)) for name in names}, device)
            parts = [loaded.pop(name) for name in names]
            if out is None:  # the first expert's tensors give the widths; later ones are written in place
                widths = [part.shape[0] if part.dim() else 0 for part in parts]
                per_expert = (sum(widths), *parts[0].shape[1:])
                expected = tuple(self.plan.templates[key].shape[1:])
                if per_expert != expected:  # refused before anything the size of the group is allocated
                    raise StreamingError(f"cannot build {key} from its checkpoint tensors ({', '.join(names)} give "
                                         f"{per_expert} per expert, the model expects {expected}); the checkpoint is "
                                         "incomplete or does not match its config.json: re-download or re-save it")
                out = torch.empty((count, *per_expert), dtype=dtype, device=device)
            offset = 0
            for name, part, width in zip(names, parts, widths):
                if part.dtype != dtype or part.dim() + 1 != out.dim() or part.shape != (width, *out.shape[2:]):
                    raise StreamingError(f"cannot build {key} from its checkpoint tensors ({name} is {part.dtype} "
                                         f"{tuple(part.shape)}, expected {dtype} {(width, *out.shape[2:])}); the "
                                         "checkpoint may be incomplete: re-download or re-save it")
                target = out[e, offset:offset + width]
                if part.data_ptr() != target.data_ptr():  # a source that built it apart
                    target.copy_(part)
                offset += width
            del parts
        return out

    def outer_bytes(self) -> int:
        """Bytes the tensors `outer` hands out take: held for the whole pass."""
        return sum(_nbytes(self.plan.templates[k]) for key in self.plan.for_module(self.model, "", skip=self.skip)
                   for k in self.plan._produces(key))

    def outer(self, device) -> dict[str, torch.Tensor]:
        """Everything outside the block stack except `skip` (the output head): model key -> tensor."""
        return self._load(self.plan.for_module(self.model, "", skip=self.skip), device)

    def block(self, layer: int, device) -> dict[str, torch.Tensor]:
        """All of block `layer`'s tensors: model key -> tensor on `device`."""
        return self._load(self._entries[layer], device)

    def block_bytes(self, layer: int) -> int:
        """Bytes block `layer` takes in memory (its model tensors in the model's dtypes)."""
        return sum(_nbytes(self.plan.templates[k]) for key in self._entries[layer] for k in self.plan._produces(key))

    def _loading_bytes(self, entries: dict) -> int:
        total = 0
        for key, sources in entries.items():
            size = sum(_nbytes(self.plan.templates[k]) for k in self.plan._produces(key))
            converted = sources[0][1] is not None and self.plan.stacked_sources(key) is None
            total += size * (CONVERTED_LOADING_FACTOR if converted else 1)
        return total

    def block_loading_bytes(self, layer: int) -> int:
        """Peak bytes while block `layer` loads (see CONVERTED_LOADING_FACTOR)."""
        return self._loading_bytes(self._entries[layer])

    def expert_loading_bytes(self, layer: int, experts_name: str, count: int) -> int:
        """Peak bytes per expert while a group of that module's experts loads."""
        keys = set(self.expert_keys(layer, experts_name))
        return self._loading_bytes({k: v for k, v in self._entries[layer].items() if k in keys}) // count

    def expert_keys(self, layer: int, experts_name: str) -> list[str]:
        prefix = self.prefixes[layer] + experts_name + "."
        return [key for key in self._entries[layer] if key.startswith(prefix)]

    def block_without_experts(self, layer: int, experts: list[str], device) -> dict[str, torch.Tensor]:
        """Block `layer` less the routed experts modules named `experts` (in the block): attention or mixer, norms,
        router, shared experts."""
        return self._load(self._without(layer, experts), device)

    def without_experts_bytes(self, layer: int, experts: list[str]) -> int:
        return sum(_nbytes(self.plan.templates[k]) for key in self._without(layer, experts)
                   for k in self.plan._produces(key))

    def _without(self, layer: int, experts: list[str]) -> dict:
        inside = tuple(self.prefixes[layer] + name + "." for name in experts)
        return {key: src for key, src in self._entries[layer].items() if not key.startswith(inside)}

    def expert_bytes(self, layer: int, experts_name: str, count: int) -> int:
        """Bytes one expert of that module takes in memory."""
        return sum(_nbytes(self.plan.templates[key]) for key in self.expert_keys(layer, experts_name)) // count

    def expert_group(self, layer: int, experts_name: str, start: int, stop: int, device) -> dict[str, torch.Tensor]:
        """The experts [start, stop) of block `layer`'s experts module: model key -> tensor with stop - start rows.

        Per-expert checkpoint tensors (`...experts.7.w1.weight`) are read for those experts only and fused by
        transformers' own converter; a tensor stored fused (gpt-oss) is read as a slice of its rows.
        """
        entries, rows = {}, {}
        for key in self.expert_keys(layer, experts_name):
            sources = self._entries[layer][key]
            if len(sources) == 1:
                entries[key] = sources
                rows[sources[0][0]] = (start, stop)
                continue
            picked = []
            for name, pattern in sources:
                match = _EXPERT_INDEX.search(name)
                if match is None:
                    raise StreamingError(f"cannot tell which expert checkpoint tensor {name} belongs to; give a "
                                         "memory budget that holds a whole block of this model")
                if start <= int(match.group(1)) < stop:
                    picked.append((name, pattern))
            entries[key] = picked
        return self._load(entries, device, rows)
