"""Architecture registry: where a model keeps its block stack, and how its layers are named in checkpoints.

Every other part of the pipeline asks this module, never hard-codes `model.layers`. Families that the registry does
not know go through a generic fallback (largest ModuleList of identical blocks; layer-name pattern inferred from the
checkpoint), which warns once that it is guessing.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

from ..errors import ShortGPTError

if TYPE_CHECKING:  # checkpoint surgery uses the name patterns here and must not pay torch's import (~200 MB)
    from torch import nn


class ArchitectureError(ShortGPTError):
    pass


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    # Dotted paths of the block ModuleList, tried in order from the top-level model (CausalLM or base model).
    block_paths: tuple[str, ...]
    # Attribute names inside a block that hold its own index and must follow renumbering.
    index_attributes: tuple[str, ...] = ("layer_idx",)
    notes: str = ""


_COMMON_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number", "block_idx", "layer_index")

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "mixtral",
                           "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2", "olmo", "olmo2", "granite",
                           "smollm3", "cohere", "starcoder2", "stablelm", "phi"),
                 ("model.layers", "layers", "model.language_model.layers", "language_model.model.layers")),
    Architecture("gpt2", ("gpt2", "gpt_bigcode", "gptj", "codegen", "imagegpt"), ("transformer.h", "h")),
    Architecture("gpt_neox", ("gpt_neox", "gpt_neox_japanese"), ("gpt_neox.layers", "layers")),
    Architecture("opt", ("opt",), ("model.decoder.layers", "decoder.layers")),
    Architecture("falcon", ("falcon",), ("transformer.h", "h")),
    Architecture("bloom", ("bloom",), ("transformer.h", "h")),
    Architecture("mamba", ("mamba", "mamba2", "falcon_mamba"), ("backbone.layers", "layers")),
    Architecture("rwkv", ("rwkv",), ("rwkv.blocks", "blocks")),
    Architecture("bert", ("bert", "roberta", "xlm-roberta", "distilbert", "electra"),
                 ("bert.encoder.layer", "roberta.encoder.layer", "encoder.layer", "distilbert.transformer.layer",
                  "transformer.layer")),
)

GENERIC_BLOCK_PATHS = tuple(dict.fromkeys(p for a in ARCHITECTURES for p in a.block_paths))


def architecture_for(model_type: Optional[str]) -> Optional[Architecture]:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    return None


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class BlockStack:
    """The located block stack of a live model."""

    path: str  # dotted path from the model root, also the checkpoint tensor-name prefix
    blocks: nn.ModuleList
    family: str
    guessed: bool = False
    index_attributes: tuple[str, ...] = field(default=_COMMON_INDEX_ATTRS)


def _largest_identical_modulelist(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    from torch import nn

    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = Counter(type(m) for m in module)
            if len(kinds) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    return best


_warned_guess: set = set()


def find_block_stack(model: nn.Module) -> BlockStack:
    from torch import nn

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = architecture_for(model_type)
    paths = (arch.block_paths if arch else ()) + GENERIC_BLOCK_PATHS
    for path in paths:
        obj = _get_path(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            # An entry's own index attributes come first, but the common names still apply: blocks nest modules
            # from several code bases (a Mamba mixer's `layer_idx` inside an otherwise custom block).
            attrs = tuple(dict.fromkeys((arch.index_attributes if arch else ()) + _COMMON_INDEX_ATTRS))
            return BlockStack(path, obj, arch.family if arch else "generic", guessed=arch is None,
                              index_attributes=attrs)
    found = _largest_identical_modulelist(model)
    if found is not None and len(found[1]) > 1:
        name, blocks = found
        key = (type(model).__name__, name)
        if key not in _warned_guess:
            _warned_guess.add(key)
            warnings.warn(
                f"{type(model).__name__} ({model_type}) is not in the architecture registry; guessing that "
                f"'{name}' ({len(blocks)} x {type(blocks[0]).__name__}) is the block stack",
                stacklevel=2,
            )
        return BlockStack(name, blocks, "generic", guessed=True)
    lists = [f"{n} ({len(m)} x {', '.join(sorted({type(c).__name__ for c in m}))})"
             for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    raise ArchitectureError(
        f"cannot find a block stack in {type(model).__name__} (model_type={model_type!r}); tried {list(paths)}; "
        f"ModuleLists found: {lists or 'none'}. Add an entry to shortgpt_fast/models/architectures.py"
    )


def renumber_block_indices(blocks: Iterable[nn.Module], attributes: Iterable[str] = _COMMON_INDEX_ATTRS) -> None:
    """Set each block's own index attributes (e.g. `self_attn.layer_idx`, used by the KV cache) to its position."""
    attributes = tuple(attributes)
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            for attr in attributes:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(module, attr, new_index)


def checkpoint_layer_prefix(tensor_names: Iterable[str], num_layers: int, model_type: Optional[str] = None,
                            extra_layers: int = 0) -> str:
    """The tensor-name prefix P such that layer i's tensors are named `P.i.*`.

    Tries the registry's paths first, then any prefix whose indices are exactly 0..num_layers-1. `extra_layers`
    is the number of layers the config declares after the decoder stack (DeepSeek-V3 / GLM-4.5 keep their
    multi-token-prediction layers at `model.layers.{N}`..; see `config_surgery.mtp_layer_count`): indices
    0..num_layers+extra_layers-1 are then accepted too, and `index_map(..., extra_layers)` moves them to the new N.
    """
    names = list(tensor_names)
    indices_by_prefix: dict[str, set[int]] = {}
    pattern = re.compile(r"^(.*?)\.(\d+)\.")
    for name in names:
        m = pattern.match(name)
        if m:
            indices_by_prefix.setdefault(m.group(1), set()).add(int(m.group(2)))
    wants = [set(range(num_layers))]
    if extra_layers > 0:
        # A checkpoint saved by transformers drops the MTP layers, so both layouts are legitimate.
        wants.append(set(range(num_layers + extra_layers)))
    arch = architecture_for(model_type)
    for path in (arch.block_paths if arch else ()) + GENERIC_BLOCK_PATHS:
        if indices_by_prefix.get(path) in wants:
            return path
    matches = [p for p, idx in indices_by_prefix.items() if idx in wants]
    if len(matches) == 1:
        return matches[0]
    seen = {p: (min(i), max(i), len(i)) for p, i in indices_by_prefix.items()}
    declared = f" (+{extra_layers} MTP layers declared)" if extra_layers else ""
    raise ArchitectureError(
        f"cannot tell which tensors belong to the {num_layers} layers{declared}: prefixes with numeric indices are "
        f"{seen or 'none'}; add the family to shortgpt_fast/models/architectures.py, or declare trailing MTP layers "
        "with num_nextn_predict_layers in config.json"
    )


def layer_of_tensor(name: str, prefix: str) -> Optional[int]:
    """Layer index of a tensor name under `prefix`, or None for non-layer tensors."""
    if not name.startswith(prefix + "."):
        return None
    rest = name[len(prefix) + 1:]
    head = rest.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def renamed_tensor(name: str, prefix: str, mapping: dict[int, int]) -> Optional[str]:
    """New name of a tensor after removal (None if its layer was removed). Non-layer names are unchanged."""
    layer = layer_of_tensor(name, prefix)
    if layer is None:
        return name
    if layer not in mapping:
        return None
    return f"{prefix}.{mapping[layer]}" + name[len(prefix) + 1 + len(str(layer)):]
