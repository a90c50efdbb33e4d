"""Prove, before anything is written, that a pruned config describes the original model minus the removed blocks.

Config surgery is a list of rules about fields, and transformers adds a layer-pattern field every few months; a rule
that misses one gives a checkpoint that loads cleanly and computes something else (a Gemma-3 config with an integer
`sliding_window_pattern` re-derives the kept layers' sliding/full types after a cut, and since sliding and full
layers have the same weights, nothing warns). So every prune and cut is checked by construction instead:

1. Build the original and the pruned model as skeletons on the meta device (no weights: seconds, little memory),
   through the installed transformers, exactly as `from_pretrained` would build them from each config.
2. Compare kept layer i of the original with layer map[i] of the pruned skeleton: module tree and classes, every
   parameter and buffer name, shape and dtype, and every scalar attribute a module stores (sliding window, layer
   type, rope or no rope, MoE or dense, scaling constants...). Only the layer's own index may differ.
3. Compare everything outside the block stack the same way (embeddings, norms, heads, shared blocks).
4. Compare every per-layer list of the normalised configs (as transformers expands them, so a pattern integer has
   become `layer_types`) at i and map[i]: models that read `config.layer_types[i]` at run time see the same value.
5. For a checkpoint: whatever differs between the original checkpoint's tensor names and shapes and the original
   skeleton's state dict (tied weights, quantization companions such as `weight_scale_inv`, fused-expert
   conversions, multi-token-prediction layers) must differ in exactly the same way, renamed, between the cut
   checkpoint and the pruned skeleton. Anything new (a shared block whose weights were stored under a removed
   layer's name, a renamed tensor the new config does not expect) is a refusal.

Any difference raises StructureMismatch with one line naming the layer and the field or tensor.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import types
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..errors import ShortGPTError, one_line

INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_number", "block_idx", "layer_index"})
# Model-level flags derived from the layer pattern as a whole ("is any layer sliding?") that only decide which masks
# or caches get built; the per-layer comparison already proves each kept layer keeps its own type.
_PATTERN_SUMMARY_ATTRIBUTES = frozenset({"has_sliding_layers", "_attn_implementation_autoset"})
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_MAX_LIST = 4096


class StructureMismatch(ShortGPTError):
    """The pruned model would not compute what the original computes with the removed blocks as identity."""


# ----------------------------------------------------------------------------------------------------------------
# Skeletons


def normalized_config(cfg: Mapping) -> dict:
    """The config as transformers expands it (pattern fields turned into `layer_types` and the like)."""
    return _config_object(cfg).to_dict()


def _config_object(cfg: Mapping):
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    d = copy.deepcopy(dict(cfg))
    # config.json spells inf/nan as {"__float__": "Infinity"}; from_pretrained decodes them, so do the same.
    decode = getattr(PretrainedConfig, "_decode_special_floats", None)
    if decode is not None:
        d = decode(d)
    # Quantization only changes how weights are stored; building a quantized skeleton needs the backend (often a
    # GPU), and the checkpoint comparison below carries the quantized names over as an accepted difference.
    d.pop("quantization_config", None)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise StructureMismatch("config.json has no model_type, so the model cannot be rebuilt to check the cut; "
                                "pass --no-verify if you have checked it yourself")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CONFIG_MAPPING[model_type].from_dict(dict(d, model_type=model_type))
    except Exception as err:  # noqa: BLE001 - any failure means we cannot prove the cut
        raise StructureMismatch(f"transformers cannot build a {model_type!r} config ({one_line(err, 200)}); "
                                "cannot verify the cut, pass --no-verify to skip the check") from None


def build_skeleton(cfg: Mapping):
    """The model `from_pretrained` would build from `cfg`, on the meta device (no weight memory)."""
    import torch
    import transformers

    config = _config_object(cfg)
    classes = []
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            classes.append(cls)
    classes += [transformers.AutoModelForCausalLM, transformers.AutoModel]
    errors = []
    for cls in classes:
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                if hasattr(cls, "from_config"):
                    return cls.from_config(config)
                return cls._from_config(config)
        except Exception as err:  # noqa: BLE001
            errors.append(f"{getattr(cls, '__name__', cls)}: {one_line(err, 200)}")
    raise StructureMismatch(f"cannot build a {config.model_type!r} model skeleton to verify the cut "
                            f"({'; '.join(errors)[:300]}); pass --no-verify to skip the check")


# ----------------------------------------------------------------------------------------------------------------
# Signatures


def _value(v: Any, depth: int = 0) -> Any:
    """A comparable form of an attribute, or None when it is not part of the signature."""
    import torch

    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return ("v", v)
    if isinstance(v, float):
        return ("f", "nan" if math.isnan(v) else v)
    if isinstance(v, torch.dtype):
        return ("dtype", str(v))
    if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
        return ("fn", getattr(v, "__module__", ""), getattr(v, "__qualname__", repr(v)))
    if depth < 3 and isinstance(v, (list, tuple)) and len(v) <= _MAX_LIST:
        items = [_value(x, depth + 1) for x in v]
        return None if any(i is None for i in items) else ("seq", tuple(items))
    if depth < 3 and isinstance(v, dict) and len(v) <= _MAX_LIST:
        items = [(str(k), _value(x, depth + 1)) for k, x in v.items()]
        return None if any(i[1] is None for i in items) else ("map", tuple(sorted(items)))
    return None


def holds_layer_indices(name: str, value: Any) -> bool:
    """An attribute that names layers by index (Zamba2's `layer_dic` {layer: slot}, `layer_block_map` [layers])."""
    if "layer" not in name.lower():
        return False
    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, int) and not isinstance(k, bool) for k in value)
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return False


def _renumbered(value: Any, mapping: Mapping[int, int]) -> Any:
    if isinstance(value, dict):
        return {mapping[k]: v for k, v in value.items() if k in mapping}
    return type(value)(mapping[v] for v in value if v in mapping)


def _renamed_paths(value: Any, stack_path: str, mapping: Mapping[int, int]) -> Any:
    """Tensor or module names under the block stack, renumbered; entries naming a removed layer are dropped.

    The tie map (`all_tied_weights_keys`, e.g. Zamba2's shared block tied across hybrid layers) names layers.
    """
    prefix = stack_path + "."

    def rename(text: str) -> Optional[str]:
        if not text.startswith(prefix):
            return text
        head, dot, tail = text[len(prefix):].partition(".")
        if not head.isdigit():
            return text
        return None if int(head) not in mapping else f"{prefix}{mapping[int(head)]}{dot}{tail}"

    if isinstance(value, str):
        return rename(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            k2 = rename(k) if isinstance(k, str) else k
            v2 = _renamed_paths(v, stack_path, mapping)
            if k2 is not None and v2 is not None:
                out[k2] = v2
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(x for x in (_renamed_paths(v, stack_path, mapping) for v in value) if x is not None)
    return value


def module_signature(root, skip: Iterable[str] = (), ignore_attributes: Iterable[str] = INDEX_ATTRIBUTES,
                     index_map: Optional[Mapping[int, int]] = None, stack_path: Optional[str] = None) -> dict:
    """{path: description} for every submodule class, parameter, buffer and stored scalar attribute under `root`.

    `skip` names dotted submodule paths (with their subtrees) left out, e.g. the block stack when comparing the rest.
    `index_map` (old -> new layer index) renumbers attributes that hold layer indices, so the original's
    signature reads as the pruned model's should.
    """
    skip = tuple(skip)
    ignore = frozenset(ignore_attributes)
    sig: dict[str, Any] = {}
    for path, module in root.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        where = path or "<root>"
        sig[f"{where} :class"] = f"{type(module).__module__}.{type(module).__qualname__}"
        for name, p in module.named_parameters(recurse=False):
            sig[f"{where}.{name} :param"] = (tuple(p.shape), str(p.dtype))
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                sig[f"{where}.{name} :buffer"] = (tuple(b.shape), str(b.dtype))
        for name, v in vars(module).items():
            if name.startswith("_") or name == "training" or name in ignore or name in _PATTERN_SUMMARY_ATTRIBUTES:
                continue
            if index_map is not None and holds_layer_indices(name, v):
                v = _renumbered(v, index_map)
            elif index_map is not None and stack_path and "tied" in name:
                # Names are relative to the module holding them: "layers.5..." inside "model".
                relative = stack_path if not path else \
                    stack_path[len(path) + 1:] if stack_path.startswith(path + ".") else None
                if relative:
                    v = _renamed_paths(v, relative, index_map)
            comparable = _value(v)
            if comparable is not None:
                sig[f"{where}.{name}"] = comparable
    return sig


def _diff(old: dict, new: dict) -> Optional[str]:
    for key in sorted(old.keys() | new.keys()):
        if key not in new:
            return f"{key} disappears"
        if key not in old:
            return f"{key} appears"
        if old[key] != new[key]:
            return f"{key} changes from {_show(old[key])} to {_show(new[key])}"
    return None


def _show(v: Any) -> str:
    text = repr(v[1] if isinstance(v, tuple) and len(v) == 2 and v[0] in ("v", "f", "dtype") else v)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------------------------------
# The checks


def _layer_dict(cfg: dict) -> dict:
    """The (sub-)config that owns the layer stack: the top level, or a multimodal wrapper's text_config."""
    if any(isinstance(cfg.get(k), int) for k in _LAYER_COUNT_KEYS):
        return cfg
    text = cfg.get("text_config")
    return text if isinstance(text, dict) else cfg


def compare_per_layer_config(old_norm: dict, new_norm: dict, mapping: Mapping[int, int]) -> None:
    old, new = _layer_dict(old_norm), _layer_dict(new_norm)
    n_old, n_new = max(mapping) + 1 if mapping else 0, len(mapping)
    n_old = next((old[k] for k in _LAYER_COUNT_KEYS if isinstance(old.get(k), int)), n_old)
    for key, value in old.items():
        after = new.get(key)
        if not (isinstance(value, (list, str)) and isinstance(after, (list, str)) and len(value) == n_old
                and len(after) == n_new and n_old != n_new):
            continue
        if holds_layer_indices("layer", value) and sorted(set(value)) == list(value) and value[-1] < n_old \
                and list(after) == _renumbered(list(value), mapping):
            continue  # a list of layer indices that happens to name every layer (llama4 Scout's moe_layers)
        if holds_layer_indices("layer", value) and all(0 <= value[i] < n_old and value[i] in mapping for i in mapping) \
                and list(after) == [mapping[value[i]] for i in sorted(mapping)]:
            continue  # one layer reference per layer (kolibri's kv_source_layers): each kept layer reads the same one
        for i, j in mapping.items():
            if value[i] != after[j]:
                raise StructureMismatch(f"config field {key!r}: layer {i} was {value[i]!r} but its new index {j} "
                                        f"says {after[j]!r}; the cut would change what that layer computes")


def _drop_layer_relative(old_sig: dict, new_sig: dict, block, old_i: int, new_i: int, mapping: Mapping[int, int],
                         n_old: int, n_new: int) -> None:
    """Remove from both signatures the attributes of kept layer old_i that only say where the layer sits.

    - Its own index under a name INDEX_ATTRIBUTES does not list (BigBird's `seed`, which is the layer index and
      only seeds training-time random attention): old value old_i, new value new_i.
    - The whole model's per-layer list kept in the layer (GPT-Neo's `attention_layers`, of which the layer reads its
      own entry): accepted only when every kept layer's entry is unchanged at its new index.
    - The layer count (MiniMax's `self_attn.num_hidden_layers`, used once at init for persistent buffers that the
      checkpoint carries): accepted only when the module's forward does not read it and the module has no
      non-persistent buffer (which a reload would recompute from the new count). A count that shapes the
      computation through a stored derived value (MiniCPM3's `residual_scale`) still shows as that value changing.
    Values that depend on the index in other ways (DiffLlama's `lambda_init`, Beam's `attn_residual_add_idx`) change
    what the layer computes and stay differences.
    """
    import inspect

    for key in list(old_sig):
        a, b = old_sig[key], new_sig.get(key)
        if " :" in key or a == b or not (isinstance(a, tuple) and isinstance(b, tuple)):
            continue
        where, _, name = key.rpartition(".")
        if a[0] == b[0] == "v" and type(a[1]) is int and type(b[1]) is int:
            if (a[1], b[1]) == (old_i, new_i) and old_i != new_i:
                del old_sig[key], new_sig[key]
            elif (a[1], b[1]) == (n_old, n_new) and n_old != n_new:
                module = block if where == "<root>" else block.get_submodule(where)
                try:
                    forward_source = inspect.getsource(type(module).forward)
                except (OSError, TypeError):
                    continue
                if f"self.{name}" not in forward_source and not getattr(module, "_non_persistent_buffers_set", None):
                    del old_sig[key], new_sig[key]
        elif a[0] == b[0] == "seq" and len(a[1]) == n_old and len(b[1]) == n_new \
                and all(a[1][i] == b[1][j] for i, j in mapping.items()):
            del old_sig[key], new_sig[key]


def carried_state_inputs(block) -> tuple[str, ...]:
    """Forward parameters of a block that take state handed down by the block before it, not the hidden state.

    transformers names them `prev_*` (GLM-MoE-DSA / HY-V4 / Mistral-Large-4 `prev_topk_indices`, ZAYA
    `prev_router_hidden_states`): the model's layer loop passes one block's extra output into the next block.
    """
    import inspect

    try:
        params = inspect.signature(type(block).forward).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(name for name in params if name.startswith("prev_"))


def _carried_state_sources(cfg: dict, n: int) -> list[Optional[int]]:
    """For each layer, the layer whose handed-down state it computes with (None: it uses none).

    DSA indexer modes are the one known pass-through: a "shared" layer uses and passes on the top-k of the latest
    "full" layer, a "full" layer computes its own. Without such knowledge every layer uses its predecessor's state.
    """
    types = cfg.get("indexer_types")
    if isinstance(types, list) and len(types) == n and set(types) <= {"full", "shared"}:
        sources, latest = [], None
        for i, kind in enumerate(types):
            sources.append(latest if kind == "shared" else None)
            if kind != "shared":
                latest = i
        return sources
    return [None] + list(range(n - 1))


def check_carried_state(old_blocks: Sequence, old_layer_cfg: dict, mapping: Mapping[int, int]) -> None:
    """Refuse when a kept block would receive state handed down by a block that is removed.

    Module trees, parameters and per-layer config values of every kept layer are the same before and after such a
    removal, so the comparisons above cannot see it; the oracle (the removed blocks return their input, their
    other outputs flow on) feeds the kept block the removed block's state, the pruned model an earlier block's.
    """
    carried = sorted({name for block in old_blocks for name in carried_state_inputs(block)})
    if not carried:
        return
    for i, source in enumerate(_carried_state_sources(old_layer_cfg, len(old_blocks))):
        if i in mapping and source is not None and source not in mapping:
            raise StructureMismatch(f"layer {i} (new index {mapping[i]}) computes with {', '.join(carried)} handed "
                                    f"down from layer {source}, which is removed; the pruned model would hand it "
                                    "another layer's state")


def verify_pruned_config(old_cfg: Mapping, new_cfg: Mapping, removed: Sequence[int],
                         old_skeleton=None) -> tuple[Any, Any, dict]:
    """Refuse (StructureMismatch) unless `new_cfg` builds the original model minus `removed` blocks.

    Returns (old skeleton, new skeleton, old -> new index map) for further checks.

    Example:
        verify_pruned_config(json.load(open("config.json")), pruned_cfg, [1, 4])
    """
    from ..models.architectures import find_block_stack

    old_skeleton = old_skeleton if old_skeleton is not None else build_skeleton(old_cfg)
    new_skeleton = build_skeleton(new_cfg)
    old_stack, new_stack = find_block_stack(old_skeleton), find_block_stack(new_skeleton)
    gone = set(removed)
    kept = [i for i in range(len(old_stack.blocks)) if i not in gone]
    if len(new_stack.blocks) != len(kept):
        raise StructureMismatch(f"the pruned config builds {len(new_stack.blocks)} layers, expected {len(kept)} "
                                f"({len(old_stack.blocks)} minus {len(gone)} removed)")
    mapping = {old: new for new, old in enumerate(kept)}
    for old_i, new_i in mapping.items():
        old_sig = module_signature(old_stack.blocks[old_i], index_map=mapping)
        new_sig = module_signature(new_stack.blocks[new_i])
        _drop_layer_relative(old_sig, new_sig, old_stack.blocks[old_i], old_i, new_i, mapping,
                             len(old_stack.blocks), len(kept))
        why = _diff(old_sig, new_sig)
        if why:
            raise StructureMismatch(f"layer {old_i} (new index {new_i}) would change: {why}")
    outside_old = module_signature(old_skeleton, skip=(old_stack.path,), index_map=mapping,
                                   stack_path=old_stack.path)
    outside_new = module_signature(new_skeleton, skip=(new_stack.path,))
    # Values that are the layer count itself legitimately change (e.g. a stored num_hidden_layers).
    for key in list(outside_old):
        if outside_old[key] == ("v", len(old_stack.blocks)) and outside_new.get(key) == ("v", len(kept)):
            del outside_old[key], outside_new[key]
    # Per-layer lists kept outside the layers (Zamba2's model.layers_block_type) must follow their layers.
    n_old, n_new = len(old_stack.blocks), len(kept)
    for key in list(outside_old):
        a, b = outside_old[key], outside_new.get(key)
        if isinstance(a, tuple) and isinstance(b, tuple) and a[0] == b[0] == "seq" and len(a[1]) == n_old \
                and len(b[1]) == n_new:
            for i, j in mapping.items():
                if a[1][i] != b[1][j]:
                    raise StructureMismatch(f"outside the layers, {key} says {_show(a[1][i])} for layer {i} but "
                                            f"{_show(b[1][j])} for its new index {j}")
            del outside_old[key], outside_new[key]
    why = _diff(outside_old, outside_new)
    if why:
        raise StructureMismatch(f"outside the layers, the pruned model would change: {why}")
    old_norm = _config_object(old_cfg).to_dict()
    compare_per_layer_config(old_norm, _config_object(new_cfg).to_dict(), mapping)
    check_carried_state(old_stack.blocks, _layer_dict(old_norm), mapping)
    return old_skeleton, new_skeleton, mapping


def _expected_tensors(skeleton) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}


def verify_checkpoint_tensors(old_skeleton, new_skeleton, old_tensors: Mapping[str, Sequence[int]],
                              renames: Mapping[str, Optional[str]], layer_map: Mapping[int, int]) -> None:
    """Refuse unless the cut checkpoint fits the pruned skeleton exactly as the original fits the original.

    old_tensors: original checkpoint name -> shape; renames: original name -> new name (None when removed).
    """
    from ..models.architectures import find_block_stack

    stack_path = find_block_stack(old_skeleton).path

    def differences(expected: dict, stored: Mapping[str, Sequence[int]]) -> set:
        out = set()
        for name in expected.keys() | stored.keys():
            a, b = expected.get(name), stored.get(name)
            b = tuple(b) if b is not None else None
            if a != b:
                out.add((name, a, b))
        return out

    new_tensors = {renames[n]: tuple(s) for n, s in old_tensors.items() if renames.get(n) is not None}
    before = differences(_expected_tensors(old_skeleton), old_tensors)
    after = differences(_expected_tensors(new_skeleton), new_tensors)
    # Carry each original difference through the rename: a tensor the original checkpoint stores under a name the
    # model does not expect (e.g. an MTP layer, a weight_scale_inv) is fine if the cut stores it the same way.
    carried = set()
    for name, expected, stored in before:
        if name in old_tensors:
            new_name = renames.get(name, name)
        else:
            # A name only the model uses (the checkpoint stores that layer under converted names, or not at all):
            # it follows its layer through the index map.
            new_name = _renamed_paths(name, stack_path, layer_map)
        if new_name is not None:
            carried.add((new_name, expected, stored))
    new_only = after - carried
    if new_only:
        name, expected, stored = sorted(new_only, key=lambda d: d[0])[0]
        if stored is None:
            what = f"the pruned model expects tensor '{name}' {list(expected)}, which the cut checkpoint lacks"
        elif expected is None:
            what = f"the cut checkpoint holds '{name}', which the pruned model does not expect"
        else:
            what = f"tensor '{name}' has shape {list(stored)} but the pruned model expects {list(expected)}"
        raise StructureMismatch(f"{what} ({len(new_only)} difference(s)); the cut would not load as the original "
                                "minus the removed layers")


def verify_cut(old_config: Mapping, new_config: Mapping, removed: Sequence[int],
               old_tensors: Mapping[str, Sequence[int]], renames: Mapping[str, Optional[str]]) -> None:
    """Both checks for an on-disk cut; raises StructureMismatch with one line, returns None when proven."""
    old_skeleton, new_skeleton, mapping = verify_pruned_config(old_config, new_config, removed)
    verify_checkpoint_tensors(old_skeleton, new_skeleton, old_tensors, renames, layer_map=mapping)


# ----------------------------------------------------------------------------------------------------------------
# Child-process entry: the torch-free cut engine runs the check here, so its own memory stays small.


def _main() -> int:
    request = json.load(sys.stdin)
    try:
        verify_cut(**request)
    except StructureMismatch as err:
        print(str(err), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_main())
