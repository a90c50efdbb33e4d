"""Remove blocks from a live model and leave it exactly as transformers would build it with fewer layers."""
from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

from ..models.architectures import find_block_stack, renumber_block_indices
from ..models.config_surgery import apply_to_config, validate_layers
from .verify_structure import INDEX_ATTRIBUTES, StructureMismatch, holds_layer_indices, verify_pruned_config


def _index_attributes(skeleton: nn.Module) -> list[tuple[str, str, object]]:
    """Every (module path, attribute, value) of a freshly built skeleton that holds a layer index.

    transformers decides these values, not us: a block with two attention sublayers (LongCat-Flash) numbers them
    2i and 2i+1 for the KV cache, and Zamba2's shared block maps global layer indices to adapter slots
    (`layer_dic`) and ties its weights across hybrid layers by name, which a plain "set every layer_idx to i" would
    get wrong.
    """
    entries = []
    for path, module in skeleton.named_modules():
        for attr, value in vars(module).items():
            if attr in INDEX_ATTRIBUTES and isinstance(value, int) and not isinstance(value, bool):
                entries.append((path, attr, value))
            elif attr in ("_tied_weights_keys", "all_tied_weights_keys") or \
                    (not attr.startswith("_") and holds_layer_indices(attr, value)):
                # The tie map names tensors by layer (Zamba2's shared block); save_pretrained reads it.
                entries.append((path, attr, copy.deepcopy(value)))
    return entries


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
        index_values = _index_attributes(new_skeleton)

    gone = set(removed)
    kept = nn.ModuleList(block for i, block in enumerate(stack.blocks) if i not in gone)
    setattr(parent, attr, kept)
    for c in configs:
        apply_to_config(c, removed)
    renumber_block_indices(kept, stack.index_attributes)
    for path, name, value in index_values or ():
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            continue  # a wrapper (e.g. peft) moved the module; the generic renumbering above covered it
        setattr(module, name, value)
    return model
