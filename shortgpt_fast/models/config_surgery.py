"""Keep a model config consistent after layers are removed.

Updating only `num_hidden_layers` is the classic bug (NOTES §2): transformers 5.x rejects a config whose
`layer_types` no longer matches, and several tools shipped unloadable checkpoints that way. This module is the one
place that knows how every per-layer field is sliced or renumbered; the in-memory pruner and the checkpoint
surgery both call it, so the two can never disagree.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

# Keys that name the layer count. GPT-2 style configs spell it differently.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Lists with one entry per layer, sliced by the kept indices.
PER_LAYER_LIST_KEYS = (
    "layer_types",
    "mlp_layer_types",
    "no_rope_layers",
    "block_configs",
    "layers_block_type",
    "attention_types_per_layer",
    "moe_layers_enabled",
    "sliding_window_layers",
    "intermediate_size_per_layer",
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
)

# Lists of layer *indices*: renumbered, removed entries dropped.
LAYER_INDEX_LIST_KEYS = ("mlp_only_layers", "full_attn_idxs", "attn_layer_indices", "swa_layers", "global_attn_layers")

# Integers meaning "the first k layers": becomes the number of kept layers below k.
LEADING_COUNT_KEYS = ("max_window_layers", "first_k_dense_replace", "num_dense_layers")

# Strings with one character per layer (Nemotron-H style hybrid patterns).
PER_LAYER_STRING_KEYS = ("hybrid_override_pattern",)

# Lists that may happen to have as many entries as there are layers but are not per-layer.
NOT_PER_LAYER_KEYS = frozenset(
    {
        "architectures",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "bad_words_ids",
        "begin_suppress_tokens",
        "suppress_tokens",
        "forced_decoder_ids",
        "image_size",
        "patch_size",
        "aspect_ratios",
        "mrope_section",
        "rope_scaling",
        "rope_parameters",
        "label2id",
        "id2label",
        "auto_map",
        "transformers_version",
        "dtype",
        "torch_dtype",
    }
)


class ConfigSurgeryError(ValueError):
    pass


def layer_count(cfg: dict) -> int:
    for key in LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise ConfigSurgeryError(
        f"config has none of {LAYER_COUNT_KEYS}; cannot tell how many layers the model has"
    )


def validate_layers(removed: Iterable[int], num_layers: int) -> list[int]:
    """Sorted unique indices, or a one-line error that says what is wrong with the request."""
    removed = list(removed)
    if not removed:
        raise ConfigSurgeryError("no layers to remove; pass at least one layer index (or --remove N with N >= 1)")
    if len(set(removed)) != len(removed):
        dup = sorted({i for i in removed if removed.count(i) > 1})
        raise ConfigSurgeryError(f"layer indices repeat: {dup}; list each layer once")
    bad = [i for i in removed if not isinstance(i, int) or i < 0 or i >= num_layers]
    if bad:
        raise ConfigSurgeryError(f"layer indices {bad} are out of range; the model has layers 0..{num_layers - 1}")
    if len(removed) >= num_layers:
        raise ConfigSurgeryError(
            f"cannot remove {len(removed)} of {num_layers} layers; at least one layer must remain"
        )
    return sorted(removed)


def index_map(removed: Sequence[int], num_layers: int) -> dict[int, int]:
    """old index -> new index for every kept layer."""
    gone = set(removed)
    kept = [i for i in range(num_layers) if i not in gone]
    return {old: new for new, old in enumerate(kept)}


def _sparse_moe_dense_layers(cfg: dict, num_layers: int) -> list[int] | None:
    """Qwen2/3-MoE mark MoE layers by a step (`(i+1) % decoder_sparse_step == 0`), which removal breaks.

    Returns the old indices of dense (non-MoE) layers when the step pattern is in use, so the caller can rewrite
    it as an explicit `mlp_only_layers` list with step 1.
    """
    step = cfg.get("decoder_sparse_step")
    # Qwen2-MoE names the expert count `num_experts`; Qwen3-MoE in transformers 5 names it `num_local_experts`.
    if not isinstance(step, int) or step <= 1 or not (cfg.get("num_experts") or cfg.get("num_local_experts")):
        return None
    only = set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(num_layers) if i in only or (i + 1) % step != 0]


def prune_config_dict(cfg: dict, removed: Sequence[int], num_layers: int | None = None) -> dict:
    """Return a new config dict with `removed` layers taken out and every per-layer field made consistent.

    Recurses into `text_config` when the layer stack belongs to it (multimodal wrappers).
    """
    cfg = copy.deepcopy(cfg)
    if num_layers is None:
        if not any(isinstance(cfg.get(k), int) for k in LAYER_COUNT_KEYS) and isinstance(cfg.get("text_config"), dict):
            cfg["text_config"] = prune_config_dict(cfg["text_config"], removed)
            return cfg
        num_layers = layer_count(cfg)
    removed = validate_layers(removed, num_layers)
    mapping = index_map(removed, num_layers)
    kept = sorted(mapping)
    new_count = len(kept)

    dense_layers = _sparse_moe_dense_layers(cfg, num_layers)

    for key in LAYER_COUNT_KEYS:
        if cfg.get(key) == num_layers:
            cfg[key] = new_count

    for key, value in list(cfg.items()):
        if key in NOT_PER_LAYER_KEYS:
            continue
        if key in LAYER_INDEX_LIST_KEYS and isinstance(value, list):
            cfg[key] = [mapping[i] for i in value if i in mapping]
        elif key in LEADING_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
            cfg[key] = sum(1 for i in kept if i < value)
        elif key in PER_LAYER_STRING_KEYS and isinstance(value, str) and len(value) == num_layers:
            cfg[key] = "".join(value[i] for i in kept)
        elif isinstance(value, (list, tuple)) and len(value) == num_layers:
            # Any other list with one entry per layer is per-layer by the only definition we can check.
            cfg[key] = [value[i] for i in kept]
        elif key in PER_LAYER_LIST_KEYS and isinstance(value, (list, tuple)):
            raise ConfigSurgeryError(
                f"config field {key!r} has {len(value)} entries but the model has {num_layers} layers; "
                "fix the source config before pruning"
            )

    if dense_layers is not None:
        cfg["mlp_only_layers"] = [mapping[i] for i in dense_layers if i in mapping]
        cfg["decoder_sparse_step"] = 1
    return cfg


def apply_to_config(config: Any, removed: Sequence[int]) -> dict[int, int]:
    """Prune a live `PretrainedConfig` in place; returns the old -> new index map."""
    before = config.to_dict()
    num_layers = layer_count(before) if any(isinstance(before.get(k), int) for k in LAYER_COUNT_KEYS) else None
    after = prune_config_dict(before, removed, num_layers)
    for key, value in after.items():
        if before.get(key) != value:
            if key == "text_config" and hasattr(config, "text_config"):
                apply_to_config(config.text_config, removed)
            else:
                setattr(config, key, value)
    n = layer_count(before) if num_layers is not None else layer_count(before["text_config"])
    return index_map(validate_layers(removed, n), n)
