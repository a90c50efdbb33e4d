"""LaCo, layer collapse (Yang et al. 2024, arXiv 2402.11187): the baseline the ShortGPT paper compares against.

RDSC ("reserve differences while seeking common"): a layer absorbs the parameter differences of the next m layers,
θ*_l = θ_l + Σ_{k=1..m} (θ_{l+k} − θ_l), and those m layers are removed. Merges are tried from the top of the stack
down; one is kept when the final hidden states of the merged model still have a mean cosine similarity above a
threshold to the original's on calibration text (the paper's Algorithm 1, as in the authors' notebooks: merge size C,
interval I, lowest/highest layer, threshold T).

Two choices where the authors' notebook and the paper differ, both taken from the paper:
- The notebook accumulates in place (`base += other - base` per absorbed layer), which leaves the base layer equal
  to the LAST absorbed layer; the paper's formula, used here, sums every difference against the original base.
- Only the matrices (tensors of 2 or more dimensions: attention and MLP weights, the ones the notebook merges)
  absorb differences; 1-D tensors (norm scales, biases) stay the base layer's, as in the notebook.

A plan records every output layer as coefficients over ORIGINAL layers, so merges of merged layers compose exactly
and the same plan is applied in memory (`collapse_model`) and on a safetensors checkpoint (`collapse_checkpoint`,
streamed one tensor at a time: the layers to drop go through the ordinary cut, with its structure proof, and the
merged matrices are then written over their kept copies). The cut's numeric identity oracle does not apply: the
weights change by design, so the result is checked against a float64 recomputation of the merge instead.
"""
from __future__ import annotations

import copy
import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ShortGPTError
from ..io.durable import staged_folder
from ..io.safetensors import read_header, read_weight_map
from ..models.architectures import checkpoint_layer_prefix, find_block_stack, layer_of_tensor
from ..models.config_surgery import layer_count, mtp_layer_count
from . import untrusted
from .in_memory import prune_model

PLAN_FILE = "laco.json"
# Stored dtypes whose values can be summed; a quantized or integer checkpoint cannot be merged arithmetically.
_MERGEABLE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class LacoError(ShortGPTError):
    """A LaCo plan or checkpoint that cannot be collapsed as asked."""


@dataclass(frozen=True)
class CollapsedLayer:
    """One output layer: it sits where original layer `keeps` sat and keeps that layer's 1-D tensors; each of its
    matrices is Σ weights[k] · (original layer k's matrix). An untouched layer is {keeps: 1.0}."""

    keeps: int
    weights: dict = field(default_factory=dict)

    @property
    def merged(self) -> bool:
        return self.weights != {self.keeps: 1.0}


def rdsc(layers: Sequence[CollapsedLayer]) -> CollapsedLayer:
    """The first layer absorbing the differences of the others: θ_0 + Σ_k (θ_k − θ_0), as coefficients."""
    base = layers[0]
    weights = dict(base.weights)
    for other in layers[1:]:
        for k, c in other.weights.items():
            weights[k] = weights.get(k, 0.0) + c
        for k, c in base.weights.items():
            weights[k] = weights.get(k, 0.0) - c
    return CollapsedLayer(base.keeps, {k: c for k, c in sorted(weights.items()) if c != 0.0})


@dataclass
class LacoPlan:
    """The collapsed stack (output layers in order) of a model with `num_layers` layers, and the search log."""

    num_layers: int
    layers: list
    trials: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @classmethod
    def identity(cls, num_layers: int) -> "LacoPlan":
        return cls(num_layers, [CollapsedLayer(i, {i: 1.0}) for i in range(num_layers)])

    @property
    def removed(self) -> list[int]:
        kept = {layer.keeps for layer in self.layers}
        return [i for i in range(self.num_layers) if i not in kept]

    def to_json(self) -> dict:
        return {"method": "laco (RDSC, arXiv 2402.11187)", "num_layers": self.num_layers, "removed": self.removed,
                "merged": [{"layer": layer.keeps, "weights": {str(k): c for k, c in layer.weights.items()}}
                           for layer in self.layers if layer.merged],
                "settings": self.settings, "trials": self.trials}


def merge_tensors(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """Σ c_i · t_i accumulated in float64 and rounded once to the inputs' dtype (all inputs share shape and dtype)."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for tensor, c in zip(tensors, coefficients):
        total += c * tensor.detach().to("cpu", torch.float64)
    return total.to(tensors[0].dtype)


@torch.no_grad()
def collapse_model(model: nn.Module, plan: LacoPlan) -> nn.Module:
    """A collapsed copy of `model` (which is left untouched): merged matrices written, absorbed layers removed
    through prune_model (config sliced, layer indices renumbered, structure proven)."""
    blocks = find_block_stack(model).blocks
    if len(blocks) != plan.num_layers:
        raise LacoError(f"the plan is for {plan.num_layers} layers but the model has {len(blocks)}")
    out = copy.deepcopy(model)
    out_blocks = find_block_stack(out).blocks
    originals = [dict(block.named_parameters()) for block in blocks]
    for layer in plan.layers:
        if not layer.merged:
            continue
        for name, param in out_blocks[layer.keeps].named_parameters():
            if param.dim() >= 2:
                sources = [originals[k][name] for k in layer.weights]
                param.copy_(merge_tensors(sources, list(layer.weights.values())).to(param.device))
    return prune_model(out, plan.removed)


@torch.no_grad()
def _final_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> list:
    device = next(model.parameters()).device
    states = []
    for i in range(input_ids.shape[0]):
        ids = input_ids[i:i + 1].to(device)
        mask = attention_mask[i:i + 1].to(device) if attention_mask is not None else None
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][0].to(torch.float64)
        states.append(hidden[mask[0].bool()] if mask is not None else hidden)
    return states


def _similarity(reference: list, states: list) -> float:
    # The authors' measure: cosine of the whole sequence's flattened final hidden states, averaged over sequences.
    sims = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
            for a, b in zip(reference, states)]
    return sum(sims) / len(sims)


def search(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
           merge_layers: int = 4, interval: int = 1, lowest: int = 0, highest: Optional[int] = None,
           threshold: float = 0.45, remove: Optional[int] = None, threshold_step: float = 0.05,
           log=None) -> LacoPlan:
    """The paper's merge search on calibration sequences (`input_ids` [n, seq], optional 0/1 `attention_mask`).

    merge_layers (C): layers combined per merge (the base and C-1 after it); interval (I): how far down the next
    try starts after a kept merge; lowest/highest: the layer range (default the whole stack); threshold (T): keep a
    merge when the mean cosine similarity of final hidden states to the original's exceeds it.
    remove: stop once this many layers are gone (a merge absorbs fewer layers if that would overshoot), so LaCo
    can be compared with other methods at the same ratio; when a pass ends short of it, the pass is rerun with the
    threshold lowered by `threshold_step` (recorded in the plan's settings). Without it, one pass as in the paper.
    """
    num_layers = len(find_block_stack(model).blocks)
    highest = num_layers - 1 if highest is None else highest
    if merge_layers < 2 or interval < 1 or not 0 <= lowest <= highest < num_layers:
        raise LacoError(f"need merge_layers >= 2, interval >= 1 and 0 <= lowest <= highest < {num_layers}; got "
                        f"{merge_layers}, {interval}, {lowest}, {highest}")
    if remove is not None and not 0 <= remove < num_layers:
        raise LacoError(f"remove must be in [0, {num_layers}), got {remove}")
    reference = _final_states(model, input_ids, attention_mask)
    settings = {"merge_layers": merge_layers, "interval": interval, "lowest": lowest, "highest": highest,
                "threshold": threshold, "remove": remove, "calibration_sequences": int(input_ids.shape[0])}
    while True:
        plan = _one_pass(model, input_ids, attention_mask, reference, num_layers, merge_layers, interval, lowest,
                         highest, threshold, remove, log)
        settings["threshold_used"] = threshold
        plan.settings = settings
        if remove is None or len(plan.removed) == remove or threshold < -1.0:
            return plan
        threshold = round(threshold - threshold_step, 10)


def _one_pass(model, input_ids, attention_mask, reference, num_layers, merge_layers, interval, lowest, highest,
              threshold, remove, log) -> LacoPlan:
    plan = LacoPlan.identity(num_layers)
    layer = highest - merge_layers
    while layer >= lowest:
        absorb = min(merge_layers - 1, len(plan.layers) - layer - 1)
        if remove is not None:
            absorb = min(absorb, remove - len(plan.removed))
            if absorb <= 0 and len(plan.removed) == remove:
                break
        if absorb <= 0:
            layer -= 1
            continue
        stack = plan.layers
        candidate = LacoPlan(num_layers, stack[:layer] + [rdsc(stack[layer:layer + absorb + 1])]
                             + stack[layer + absorb + 1:], plan.trials)
        sim = _similarity(reference, _final_states(collapse_model(model, candidate), input_ids, attention_mask))
        kept = sim > threshold
        plan.trials.append({"base": stack[layer].keeps, "absorbed": [s.keeps for s in stack[layer + 1:layer + absorb + 1]],
                            "similarity": sim, "threshold": threshold, "kept": kept})
        if log:
            log(f"laco: layer {stack[layer].keeps} absorbing {absorb}: similarity {sim:.4f} "
                f"{'>' if kept else '<='} {threshold:g}")
        if kept:
            plan.layers = candidate.layers
            layer -= interval
            if layer >= len(plan.layers):
                layer = len(plan.layers) - 1 - merge_layers
        else:
            layer -= 1
    return plan


# ---- on disk ----------------------------------------------------------------------------------------------------
def collapse_checkpoint(src: Union[str, os.PathLike], plan: LacoPlan, out: Union[str, os.PathLike],
                        check: bool = True) -> dict:
    """Write the collapsed model of the safetensors checkpoint folder `src` to the new folder `out`.

    The absorbed layers are cut (surgery's copy mode, with its structure proof when `check`); then every merged
    matrix is computed from the source tensors one at a time (float64 sum, rounded once to the stored dtype) and
    written over its kept copy at the same offset, so memory stays at a few tensors. `out` appears complete or not
    at all; `src` is only read. Refuses a plan for another layer count, a non-float stored matrix (quantized
    checkpoints cannot be summed) and source layers whose matrices differ in name, shape or dtype.
    Returns {"removed", "merged_tensors", "output"}.
    """
    from .checkpoint import cut_checkpoint

    src, out = Path(src), Path(out)
    cfg = untrusted.load_json(src / "config.json", src, what="config")
    num_layers = layer_count(cfg)
    if num_layers != plan.num_layers:
        raise LacoError(f"the plan is for {plan.num_layers} layers but {src / 'config.json'} has {num_layers}")
    source_map = read_weight_map(src)
    if source_map is None:
        raise LacoError(f"{src} holds no safetensors weights; LaCo on disk needs a safetensors checkpoint")
    prefix = checkpoint_layer_prefix(source_map, num_layers, cfg.get("model_type"),
                                     extra_layers=mtp_layer_count(cfg))
    with staged_folder(out) as staging:
        cut_dir = staging.path / "collapsed"
        result = cut_checkpoint(src, plan.removed, out=cut_dir, check=check, chosen_by="laco",
                                extra_files={PLAN_FILE: (json.dumps(plan.to_json(), indent=1) + "\n").encode()})
        merged = _write_merged(src, cut_dir, source_map, prefix, result.index_map, plan)
        for entry in sorted(cut_dir.iterdir()):
            os.rename(entry, staging.path / entry.name)
        cut_dir.rmdir()
    return {"removed": plan.removed, "merged_tensors": merged, "output": str(out)}


def _write_merged(src: Path, dst: Path, source_map: dict, prefix: str, mapping: dict, plan: LacoPlan) -> int:
    with ExitStack() as files:
        return _write_merged_from(files, src, dst, source_map, prefix, mapping, plan)


def _write_merged_from(files: ExitStack, src: Path, dst: Path, source_map: dict, prefix: str, mapping: dict,
                       plan: LacoPlan) -> int:
    from safetensors import safe_open

    target_map = read_weight_map(dst)
    headers = {shard: read_header(dst / shard) for shard in sorted(set(target_map.values()))}
    readers: dict = {}

    def read(name: str) -> torch.Tensor:
        shard = source_map[name]
        if shard not in readers:
            readers[shard] = files.enter_context(safe_open(str(src / shard), framework="pt"))
        return readers[shard].get_tensor(name)

    written = 0
    for layer in (layer for layer in plan.layers if layer.merged):
        new_index = mapping[layer.keeps]
        for shard, header in headers.items():
            for name, dtype, shape, begin, end in header["tensors"]:
                if layer_of_tensor(name, prefix) != new_index or len(shape) < 2:
                    continue
                suffix = name[len(f"{prefix}.{new_index}"):]
                sources = []
                for k in layer.weights:
                    source = f"{prefix}.{k}{suffix}"
                    if source not in source_map:
                        raise LacoError(f"layer {layer.keeps} absorbs layer {k}, which has no '{source}'; LaCo "
                                        "merges layers of one structure only")
                    sources.append(read(source))
                if any(t.shape != tuple(shape) or t.dtype != sources[0].dtype for t in sources):
                    raise LacoError(f"'{name}': the merged layers' matrices differ in shape or dtype; LaCo merges "
                                    "layers of one structure only")
                if dtype not in _MERGEABLE:
                    raise LacoError(f"'{name}' is stored as {dtype}; LaCo sums weights, which needs a float "
                                    "checkpoint (dequantize it first)")
                data = merge_tensors(sources, list(layer.weights.values())).contiguous()
                raw = data.view(torch.uint8).numpy().tobytes()
                if len(raw) != end - begin:
                    raise LacoError(f"'{name}': merged tensor has {len(raw)} bytes, the slot {end - begin}")
                path = dst / shard
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    if os.fstat(fd).st_nlink != 1:
                        # A hard link would share its bytes with the source: writing would change the source.
                        raise LacoError(f"{path} is hard-linked; refusing to write merged weights into it")
                    os.pwrite(fd, raw, header["data_start"] + begin)  # staged_folder fsyncs the whole result
                finally:
                    os.close(fd)
                written += 1
    return written
