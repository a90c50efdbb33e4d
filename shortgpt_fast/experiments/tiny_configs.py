"""Tiny configs for every causal-LM model type transformers ships, from the config class's own defaults.

`tiny_config(model_type)` starts from `CONFIG_MAPPING[model_type]()` and rewrites well-known size fields (widths,
heads, layers, experts, LoRA ranks, state sizes, vocabulary) by name, recursing into sub-configs, so a type added to
transformers next month is tried without anyone writing its config. What the name rules cannot know goes in
`OVERRIDES`, one small dict per type. Nothing here imports torch: building the config is cheap and a type whose
config cannot be shrunk is reported, not skipped.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

VOCAB = 211
LAYERS = 6
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
FFN = 48
EXPERT_FFN = 16
EXPERTS = 4
TOP_K = 2
POSITIONS = 128
DROP = object()  # an override value that removes the key, so the config class derives it

# Layer-count spellings of the decoder stack that gets pruned.
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")
# Stacks the causal LM carries but does not prune (encoder of an encoder-decoder, vision and audio towers).
SIDE_LAYER_KEYS = ("encoder_layers", "num_encoder_layers")
SUB_CONFIG_KEYS = ("vision_config", "audio_config", "vq_config", "audio_encoder_config", "depth_decoder_config",
                   "patcher_config", "encoder_config", "decoder_config", "global_config")

_SIZE = {
    # widths
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "dim": HIDDEN, "embed_dim": HIDDEN,
    "embedding_size": HIDDEN, "embedding_dim": HIDDEN, "emb_dim": HIDDEN, "word_embed_proj_dim": HIDDEN, "attention_hidden_size": HIDDEN,
    "hidden_size_per_layer_input": 8, "backbone_hidden_size": HIDDEN, "lru_width": HIDDEN,
    # feed-forward
    "intermediate_size": FFN, "ffn_dim": FFN, "n_inner": FFN, "d_ff": FFN, "ffn_hidden_size": FFN, "dim_ff": FFN,
    "dff": FFN, "decoder_ffn_dim": FFN, "encoder_ffn_dim": FFN, "intermediate_size_mlp": FFN, "d_inner": FFN,
    "feed_forward_size": FFN, "dense_intermediate_size": FFN,
    "moe_intermediate_size": EXPERT_FFN, "shared_expert_intermediate_size": EXPERT_FFN,
    "shared_intermediate_size": EXPERT_FFN, "shared_experts_intermediate_size": EXPERT_FFN,
    "moe_shared_expert_intermediate_size": EXPERT_FFN, "expert_ffn_hidden_size": EXPERT_FFN,
    # attention
    "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS, "n_heads": HEADS, "attention_heads": HEADS,
    "decoder_attention_heads": HEADS, "encoder_attention_heads": HEADS, "swa_num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "num_kv_heads": KV_HEADS, "n_kv_heads": KV_HEADS,
    "multi_query_group_num": KV_HEADS, "swa_num_key_value_heads": KV_HEADS, "num_query_groups": KV_HEADS,
    "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_dim": HEAD_DIM, "swa_head_dim": HEAD_DIM,
    "attention_head_size": HEAD_DIM, "dim_head": HEAD_DIM, "d_head": HEAD_DIM, "qk_head_dim": 16,
    # multi-head latent attention and sparse indexers
    "q_lora_rank": 16, "kv_lora_rank": 16, "o_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "rotary_dim": 4, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 4,
    # experts
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": TOP_K, "num_experts_per_token": TOP_K, "moe_topk": TOP_K, "moe_k": TOP_K,
    "n_group": 2, "num_expert_group": 2, "topk_group": 1, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    # linear attention / gated delta nets
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_heads": 4, "linear_head_dim": 8,
    # state-space and convolution
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "time_step_rank": 4, "mamba_dt_rank": 4,
    "chunk_size": 16, "mamba_chunk_size": 16, "n_groups": 1, "mamba_n_groups": 1, "mamba_ngroups": 1,
    # low-rank adapters
    "adapter_rank": 4, "laurel_rank": 4, "gated_norm_rank": 4, "loop_gate_rank": 4, "hc_lowrank": 4,
    # positions
    "max_position_embeddings": POSITIONS, "n_positions": POSITIONS, "n_ctx": POSITIONS, "max_seq_len": POSITIONS,
    "seq_length": POSITIONS, "context_length": POSITIONS, "max_target_positions": POSITIONS,
    "original_max_position_embeddings": POSITIONS,
    # vocabularies
    "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB, "decoder_vocab_size": VOCAB,
    "shape_vocab_size": VOCAB, "pronunciation_vocab_size": VOCAB, "shape_embed_dim": 8, "pronunciation_embed_dim": 8,
    # windows: shorter than the test sequences so sliding layers differ from full ones
    "sliding_window": 5, "sliding_window_size": 5, "attention_window_size": 5, "attention_chunk_size": 6,
    "local_attention_window_len": 5, "window_size": 5,
}

# Fields whose None default means "derive me" in some config classes but is read unguarded by their model code.
_DERIVED_WHEN_NONE = ("head_dim", "num_key_value_heads")

# Vision/audio towers only have to exist; one narrow layer each.
_TOWER = {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": HEADS, "num_heads": HEADS,
          "num_hidden_layers": 1, "num_layers": 1, "depth": 1, "image_size": 28, "patch_size": 14,
          "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "embed_dim": HIDDEN, "out_hidden_size": HIDDEN,
          "projection_dim": HIDDEN, "vision_output_dim": HIDDEN}


def _mamba_fields(cfg: dict) -> dict:
    """Mamba-2 style mixers need heads x head_dim == expand x hidden; derive them instead of guessing."""
    out = {}
    expand = cfg.get("mamba_expand", cfg.get("expand"))
    if not isinstance(expand, int):
        return out
    inner = expand * HIDDEN
    for heads_key, dim_key in (("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim"),
                               ("n_mamba_heads", "mamba_headdim")):
        if heads_key in cfg and dim_key in cfg:
            out[heads_key], out[dim_key] = inner // 8, 8
    if "mamba_d_ssm" in cfg and cfg["mamba_d_ssm"] is not None:
        out["mamba_d_ssm"] = inner
    return out


def _per_layer_size(cfg: dict, key: str, value: Any) -> Any:
    """A per-layer override's size field: the stack's own head counts (MLA ties K/V heads to heads), else the table."""
    if not isinstance(value, int) or isinstance(value, bool) or key not in _SIZE:
        return value
    if key in ("num_attention_heads", "num_key_value_heads") and isinstance(cfg.get(key), int):
        return cfg[key]
    return _SIZE[key]


def _resize_per_layer(value: list, old_layers: int, new_layers: int) -> list:
    """A per-layer list of the default config keeps its own pattern, cut to the new depth."""
    return list(value[:new_layers]) + [value[-1]] * max(0, new_layers - len(value))


def shrink_dict(cfg: dict, *, tower: bool = False, layers: int = LAYERS) -> dict:
    """Small sizes for one config dict (not nested ones except the known sub-config keys and text_config)."""
    cfg = copy.deepcopy(cfg)
    old_layers = next((cfg[k] for k in LAYER_KEYS if isinstance(cfg.get(k), int)), None)
    table = dict(_SIZE, **_TOWER) if tower else _SIZE
    for key, small in table.items():
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            cfg[key] = min(value, small) if key in ("sliding_window", "attention_chunk_size") else small
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            cfg[key] = [small] * len(value)  # per-layer sizes (gemma3n's intermediate_size)
    if not tower:
        for key in LAYER_KEYS:
            if isinstance(cfg.get(key), int):
                cfg[key] = layers
        for key in SIDE_LAYER_KEYS:
            if isinstance(cfg.get(key), int):
                cfg[key] = 1
    for key in _DERIVED_WHEN_NONE:
        if key in cfg and cfg[key] is None:
            cfg[key] = _SIZE[key]
    if not tower and isinstance(cfg.get("kv_lora_rank"), int):
        # Multi-head latent attention expands one latent into every head: no grouped K/V heads.
        for key in ("num_key_value_heads", "num_kv_heads"):
            if key in cfg:
                cfg[key] = cfg.get("num_attention_heads", HEADS)
    if "is_decoder" in cfg and not tower:
        # Encoder families used as causal LMs attend bidirectionally unless told otherwise, and then a cached
        # generation cannot match an uncached one.
        cfg["is_decoder"] = True
    cfg.update(_mamba_fields(cfg))
    vocab = cfg.get("vocab_size") if isinstance(cfg.get("vocab_size"), int) else VOCAB
    for key, value in list(cfg.items()):
        if key.endswith(("_token_id", "_token_index")) and isinstance(value, int) and value >= vocab:
            # Special ids beyond the tiny vocabulary: park them at its top, away from the random test ids.
            cfg[key] = vocab - 1 - (hash(key) % 8)
        elif key.endswith("_token_id") and isinstance(value, list):
            cfg[key] = [v if not isinstance(v, int) or v < vocab else vocab - 1 for v in value]
        elif (old_layers and not tower and isinstance(value, str) and len(value) == old_layers != layers
              and key.endswith("pattern")):
            cfg[key] = value[:layers]  # one character per layer (Nemotron-H's hybrid_override_pattern)
        elif (old_layers and not tower and isinstance(value, list) and len(value) == old_layers
              and old_layers != layers and key not in ("architectures",)):
            cfg[key] = _resize_per_layer(value, old_layers, layers)
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            # Per-layer overrides keyed by layer index ("05": {...}): keep the layers that still exist.
            cfg[key] = {k: {f: _per_layer_size(cfg, f, x)
                            for f, x in v.items()} if isinstance(v, dict) else v
                        for k, v in value.items() if int(k) < (1 if tower else layers)}
        elif (not tower and old_layers and isinstance(value, list) and value and key.endswith(("_layers", "_idxs",
              "_layer_ids")) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            # Index lists: keep only indices that still exist.
            cfg[key] = [v for v in value if v < layers]
    for key in SUB_CONFIG_KEYS:
        if isinstance(cfg.get(key), dict):
            cfg[key] = shrink_dict(cfg[key], tower=True)
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = shrink_dict(cfg["text_config"], layers=layers)
    return cfg


# Per-type corrections the name rules cannot know: widths that must match, patterns chosen so that removing layers
# 1 and 4 changes them, and config keys with type-specific meaning. Keep each entry a few keys.
OVERRIDES: dict[str, dict[str, Any]] = {
    "mamba2": {"num_heads": 8, "head_dim": 8},
    # Its default pattern has four layers; this one has all four block kinds and loses an attention and a mamba.
    "nemotron_h": {"hybrid_override_pattern": "M*E-M*", "layers_block_type": DROP, "num_hidden_layers": DROP},
    "deepseek_v2": {"num_experts_per_tok": TOP_K, "n_group": 2, "topk_group": 1},
    # Its defaults list attention and MLP as separate entries (halved on load); six explicit layers instead.
    "dory": {"n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2, "num_hidden_layers": LAYERS,
             "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention",
                             "sliding_attention", "sliding_attention"]},
    "zaya": {"num_experts_per_tok": 1},  # the only value its config accepts
    # With a top-k smaller than the sequence, the sparse indexer's ReLU scores tie at exactly 0 and the unpruned
    # model itself generates differently with and without a cache (seen with perturbation seeds 5 and 7); a top-k
    # covering every position keeps the generate check about pruning, not about upstream tie-breaking.
    "glm_moe_dsa": {"index_topk": 64},
    # Sliding layers use plain heads as wide as the latent ones (nope + rope).
    "dots3_note_text": {"head_dim": 16},
    "dots3_note": {"text_config.head_dim": 16},
    # Keys and values are rounded to NVFP4 in blocks of 16; the indexer reads at most the query heads of one KV head.
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 2},
    "xlstm": {"num_blocks": LAYERS, "num_heads": 2},
    "reformer": {"is_decoder": True},
    "dots1": {"n_routed_experts": EXPERTS, "n_shared_experts": 1, "num_experts_per_tok": TOP_K,
              "first_k_dense_replace": 1},
    # Attention at 1 and 3: removing 1 and 4 keeps one (a cache of conv states only breaks generate) and shifts it.
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention", "conv", "conv"],
                 "num_dense_layers": 1},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention",
                                    "linear_attention", "linear_attention"]},
    "granitemoehybrid": {"layer_types": ["mamba", "attention", "mamba", "attention", "mamba", "mamba"]},
    "gemma3n_text": {"num_kv_shared_layers": 2, "layer_types": ["sliding_attention", "full_attention",
                     "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]},
    "zamba": {"layers_block_type": DROP, "attn_layer_period": 2, "attn_layer_offset": 0},
    "dbrx": {"attn_config": {"kv_n_heads": KV_HEADS}, "ffn_config": {"ffn_hidden_size": FFN, "moe_num_experts":
             EXPERTS, "moe_top_k": TOP_K}},
}


def tiny_config(model_type: str, overrides: Optional[dict] = None):
    """A `PretrainedConfig` of `model_type` small enough to build in well under a second."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fixes = {**OVERRIDES.get(model_type, {}), **(overrides or {})}
    try:
        defaults = cls().to_dict()
    except Exception:  # noqa: BLE001 - a few classes reject their own defaults; the overrides make them valid
        defaults = cls(**{k: v for k, v in fixes.items() if "." not in k and v is not DROP}).to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "model_type", "id2label", "label2id",
                "dtype", "torch_dtype"):
        defaults.pop(key, None)
    small = shrink_dict(defaults)
    for key, value in fixes.items():
        _set_path(small, key, value)
    return cls(**small)


def _set_path(cfg: dict, dotted: str, value: Any) -> None:
    """`text_config.num_experts` style keys reach into sub-configs; DROP deletes a key."""
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = cfg.setdefault(part, {})
    if value is DROP:
        cfg.pop(last, None)
    else:
        cfg[last] = value
