"""Remove blocks from a live model and leave it exactly as transformers would build it with fewer layers."""
from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

from ..models.architectures import find_block_stack, renumber_block_indices
from ..models.config_surgery import apply_to_config, validate_layers
from .verify_structure import INDEX_ATTRIBUTES, StructureMismatch, verify_pruned_config


def _index_attributes(skeleton_blocks) -> list[list[tuple[str, str, int]]]:
    """Per block of a freshly built skeleton: every (submodule path, attribute, value) that holds a layer index.

    transformers decides these values, not us: a block with two attention sublayers (LongCat-Flash) numbers them
    2i and 2i+1 for the KV cache, which a plain "set every layer_idx to i" would get wrong.
    """
    out = []
    for block in skeleton_blocks:
        entries = []
        for path, module in block.named_modules():
            for attr in INDEX_ATTRIBUTES:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    entries.append((path, attr, value))
        out.append(entries)
    return out


def prune_model(model: nn.Module, layers: Sequence[int], verify: bool = True) -> nn.Module:
    """Drop `layers` (indices in the current model) in place and return the model.

    The removal is transactional: the new config is computed on a copy and, with `verify` (the default), proven to
    build the original minus the removed blocks (see verify_structure) before the model is touched; a refusal
    leaves the model exactly as it was. Then the blocks are dropped, the config is sliced and every layer index
    (`self_attn.layer_idx` is what the KV cache is indexed by) is set to the value transformers itself gives the
    pruned config, so `save_pretrained` output reloads with no missing keys and identical logits.

    Example:
        prune_model(model, [21, 22, 25])   # model.config.num_hidden_layers drops by 3
    """
    stack = find_block_stack(model)
    removed = validate_layers(layers, len(stack.blocks))
    parent_path, _, attr = stack.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    config = getattr(model, "config", None)
    inner = getattr(parent, "config", None)
    # A base model usually shares the CausalLM's config; a multimodal wrapper's language model holds the wrapper's
    # own text_config, which pruning the wrapper's config already covers. Only a truly separate config is pruned too.
    configs = [c for c in (config, inner) if c is not None]
    configs = [c for i, c in enumerate(configs)
               if all(c is not d and c is not getattr(d, "text_config", None) for d in configs[:i])]

    # Everything that can refuse runs on copies first.
    for c in configs:
        apply_to_config(copy.deepcopy(c), removed)
    index_values = None
    if verify:
        if config is None or not hasattr(config, "to_dict"):
            raise StructureMismatch(f"{type(model).__name__} has no transformers config, so the pruned model cannot "
                                    "be rebuilt to prove it; pass verify=False (--no-verify) to prune unverified")
        before = config.to_dict()
        pruned = copy.deepcopy(config)
        apply_to_config(pruned, removed)
        _, new_skeleton, _ = verify_pruned_config(before, pruned.to_dict(), removed)
        index_values = _index_attributes(find_block_stack(new_skeleton).blocks)

    gone = set(removed)
    kept = nn.ModuleList(block for i, block in enumerate(stack.blocks) if i not in gone)
    setattr(parent, attr, kept)
    for c in configs:
        apply_to_config(c, removed)
    renumber_block_indices(kept, stack.index_attributes)
    if index_values is not None:
        for block, entries in zip(kept, index_values):
            for path, name, value in entries:
                try:
                    module = block.get_submodule(path) if path else block
                except AttributeError:
                    continue  # a wrapper (e.g. peft) moved the module; the generic renumbering above covered it
                setattr(module, name, value)
    return model
