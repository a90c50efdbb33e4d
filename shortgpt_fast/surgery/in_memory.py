"""Remove blocks from a live model and leave it exactly as transformers would build it with fewer layers."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..models.architectures import find_block_stack, renumber_block_indices
from ..models.config_surgery import apply_to_config, validate_layers


def prune_model(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Drop `layers` (indices in the current model) in place and return the model.

    Renumbers every per-layer index (`self_attn.layer_idx` is what the KV cache is indexed by) and slices every
    per-layer config field, so `save_pretrained` output reloads with no missing keys and identical logits.
    """
    stack = find_block_stack(model)
    removed = set(validate_layers(layers, len(stack.blocks)))
    kept = nn.ModuleList(block for i, block in enumerate(stack.blocks) if i not in removed)
    parent_path, _, attr = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, kept)
    renumber_block_indices(kept, stack.index_attributes)
    config = getattr(model, "config", None)
    if config is not None:
        apply_to_config(config, sorted(removed))
        # A base model inside a CausalLM usually shares the config object; when it does not, keep both in step.
        inner = getattr(parent, "config", None)
        if inner is not None and inner is not config:
            apply_to_config(inner, sorted(removed))
    return model
