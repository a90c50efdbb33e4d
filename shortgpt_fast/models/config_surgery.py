"""Keep a model config consistent after layers are removed.

Updating only `num_hidden_layers` is the classic bug: transformers 5.x rejects a config whose
`layer_types` no longer matches, and several tools shipped unloadable checkpoints that way. This module is the one
place that knows how every per-layer field is sliced or renumbered; the in-memory pruner and the checkpoint
surgery both call it, so the two can never disagree.

A field is handled only when its meaning is known: per-layer lists are sliced, index lists renumbered, patterns
(periods, intervals, start/end indices) rewritten into an explicit form transformers accepts for that model type,
or refused when no config can describe the kept layers. A list whose meaning is unknown but whose length equals
the layer count is refused rather than guessed (falcon_h1's five `ssm_multipliers` look per-layer on a 5-layer
model and are not). Checkpoint surgery imports this module without torch, so it must stay import-light.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from ..errors import ShortGPTError, quote
from .config_compat import with_legacy_rope_fields

# Keys that name the layer count. GPT-2 style configs spell it differently.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Sub-configs that hold the decoder stack of a wrapper model (multimodal, omni). Other nested configs with their
# own layer count (vision_config, audio_config, ...) are different stacks and are left alone.
TEXT_SUBCONFIG_KEYS = ("text_config", "language_config", "llm_config", "thinker_config", "text_decoder_config")

# Lists with one entry per layer, sliced by the kept indices.
PER_LAYER_LIST_KEYS = (
    "layer_types",
    "mlp_layer_types",
    "no_rope_layers",  # llama4: 1 = this layer uses rope (flags, despite the name)
    "block_configs",
    "layers_block_type",
    "attention_types_per_layer",
    "moe_layers_enabled",
    "sliding_window_layers",
    "intermediate_size_per_layer",
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
    "indexer_types",
    "activation_sparsity_pattern",
    "layer_rope_theta",
    "attention_layers",
    "swiglu_limits",
    "swiglu_limits_shared",
    "expert_swiglu_limit_list",  # bailing_hybrid: the serialized names of the two above
    "share_expert_swiglu_limit_list",
    "intermediate_size",  # gemma3n_text: an int, or a list with one width per layer (sliced only when a list)
    "attn_layers",  # reformer: the attention kind of each layer
)

# Lists of 0-based layer *indices*: renumbered, removed entries dropped. Their length may equal the layer count
# (llama4 Scout lists every layer in `moe_layers`) and they are still indices, never sliced.
LAYER_INDEX_LIST_KEYS = (
    "mlp_only_layers",
    "moe_layers",
    "full_attn_idxs",
    "attn_layer_indices",
    "swa_layers",
    "global_attn_layers",
    "hybrid_layer_ids",
    "local_layer_ids",
    "cross_attention_layers",
    "index_layers",  # kolibri1_1: the indexed-attention layers that run their own indexer
)

# Lists with one entry per layer whose values are layer indices (kolibri1_1 `kv_source_layers`: the layer whose K/V
# each layer reads): sliced, then renumbered. A kept layer that reads a removed layer's K/V cannot be described.
LAYER_SOURCE_LIST_KEYS = ("kv_source_layers",)

# Integers meaning "the first k layers": becomes the number of kept layers below k.
LEADING_COUNT_KEYS = ("max_window_layers", "first_k_dense_replace", "num_dense_layers")

# Class defaults of "first k layers" fields, per model type: a config.json that omits the field means the default,
# which after removal would cover other layers (DeepSeek-V3 without `first_k_dense_replace` has 3 dense layers), so
# the field is written out before it is rewritten. Read from transformers 5.24's configuration classes.
LEADING_COUNT_DEFAULTS: dict[str, dict[str, int]] = {
    **{t: {"first_k_dense_replace": 3} for t in ("deepseek_v3", "deepseek_v32", "glm_moe_dsa")},
    **{t: {"first_k_dense_replace": 1} for t in ("exaone_moe", "glm4_moe", "glm4v_moe_text", "mistral_large4",
                                                 "sarvam_mla", "sarvam_moe", "kimi_linear")},
    "bailing_hybrid": {"first_k_dense_replace": 2},
    "afmoe": {"num_dense_layers": 1},
    "lfm2_moe": {"num_dense_layers": 2},
    **{t: {"max_window_layers": 28} for t in ("qwen2", "qwen2_moe", "qwen3", "deepseek_ocr2")},
    **{t: {"max_window_layers": 80} for t in ("qwen2_vl_text", "qwen2_5_vl_text")},
    "dots1": {"max_window_layers": 62},
}

# Strings with one character per layer (Nemotron-H style hybrid patterns).
PER_LAYER_STRING_KEYS = ("hybrid_override_pattern",)

# DeepSeek-V3 / GLM-4.5 keep their multi-token-prediction layers after the decoder layers, as `model.layers.{N+j}`.
MTP_COUNT_KEYS = ("num_nextn_predict_layers", "num_mtp_layers")

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
        # falcon_h1: per-component scales (5 for the SSM, 2 for the MLP), shared by every layer.
        "ssm_multipliers",
        "mlp_multipliers",
        "time_step_limit",
        "quantization_config",
        "linear_attn_config",
        "norm_mean",
        "norm_std",
        "image_mean",
        "image_std",
        "mtp_layer_types",  # MTP layers have their own list, sized by the MTP count
        "mtp_mlp_layer_types",
        "mtp_layers_block_type",
        "mtp_local_layer_ids",
        "languages",
        "langs",
        "vocab_list",
        "encoder_hash_byte_group_size",  # blt
    }
)


class ConfigSurgeryError(ShortGPTError):
    pass


def layer_count(cfg: dict) -> int:
    for key in LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise ConfigSurgeryError(
        f"config has none of {LAYER_COUNT_KEYS}; cannot tell how many layers the model has"
    )


def mtp_layer_count(cfg: dict) -> int:
    """Number of multi-token-prediction layers stored after the decoder layers (`model.layers.{N}`..), else 0."""
    for key in MTP_COUNT_KEYS:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    sub = _text_subconfig(cfg)
    return mtp_layer_count(cfg[sub]) if sub is not None else 0


_LAYER_PART = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", re.ASCII)


def parse_layers(layers: Union[str, Iterable[int]], num_layers: int) -> list[int]:
    """The one parser of a layer request ("21,22,25", "21-25", or ints), used by every command and the API.

    Layer indices in request order, each checked against [0, num_layers) before any range is expanded, and
    duplicates caught on the way (a set, so linear), so `0-1000000000` or `0-60000,0-60000` cost nothing."""
    out: list[int] = []
    seen: set[int] = set()

    def check(i: int) -> None:
        if not 0 <= i < num_layers:
            raise ConfigSurgeryError(f"layer indices [{quote(i, 30)}] are out of range; the model has layers "
                               f"0..{num_layers - 1}")

    def add(i: int) -> None:
        check(i)
        if i in seen:
            raise ConfigSurgeryError(f"layer indices repeat: [{i}]; list each layer once")
        seen.add(i)
        out.append(i)

    if isinstance(layers, str):
        for part in layers.split(","):
            if not part.strip():
                continue
            m = _LAYER_PART.fullmatch(part)
            if not m:
                raise ConfigSurgeryError(f"--layers {quote(layers)} is not a list of layer indices; write e.g. 21,22,25 or "
                                   "21-25 (ASCII digits)")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ConfigSurgeryError(f"--layers range {quote(part.strip())} runs backwards; write it low-high")
            check(lo)
            check(hi)  # both ends are checked before the range in between is expanded
            for i in range(lo, hi + 1):
                add(i)  # stops at the first repeat, so expansion never exceeds num_layers + 1 steps
        return out
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ConfigSurgeryError(f"layers must be integers, got {quote(i)}")
        add(i)
    return out


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


def index_map(removed: Sequence[int], num_layers: int, extra_layers: int = 0) -> dict[int, int]:
    """old index -> new index for every kept layer.

    `extra_layers` trailing layers stored after the decoder stack (MTP layers at N..N+k-1) are never removed and
    follow the kept layers: old N+j -> new (kept count)+j.
    """
    gone = set(removed)
    kept = [i for i in range(num_layers) if i not in gone]
    mapping = {old: new for new, old in enumerate(kept)}
    for j in range(extra_layers):
        mapping[num_layers + j] = len(kept) + j
    return mapping


def _text_subconfig(cfg: dict) -> Optional[str]:
    for key in TEXT_SUBCONFIG_KEYS:
        sub = cfg.get(key)
        if isinstance(sub, dict) and (any(isinstance(sub.get(k), int) for k in LAYER_COUNT_KEYS)
                                      or _text_subconfig(sub) is not None):
            return key
    return None


def _has_count(cfg: dict) -> bool:
    return any(isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool) for k in LAYER_COUNT_KEYS)


# ----------------------------------------------------------------------------------------------------------------
# Patterns that transformers derives from the layer count. Each rule reads the ORIGINAL config, writes the explicit
# per-layer form for the original layer count (sliced afterwards like any per-layer list), or rewrites a pattern
# into one that describes the kept layers, or refuses.


def _every_nth(pattern: int, n: int, hit: str, miss: str) -> list[str]:
    # transformers' own spelling: `miss if bool((i + 1) % pattern) else hit`
    return [miss if (i + 1) % pattern else hit for i in range(n)]


def _explicit_layer_types_from_interval(key: str, default: int, miss: str) -> Callable[[dict, int, list], None]:
    def rule(cfg: dict, n: int, kept: list) -> None:
        if cfg.get("layer_types") is not None:
            return
        pattern = cfg.get(key, default)
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise ConfigSurgeryError(f"config field {key!r} is {pattern!r}, not a positive integer; set "
                                     "'layer_types' explicitly in config.json before pruning")
        cfg["layer_types"] = _every_nth(pattern, n, "full_attention", miss)
    return rule


def _fixed_every_nth(pattern: int, miss: str) -> Callable[[dict, int, list], None]:
    def rule(cfg: dict, n: int, kept: list) -> None:
        if cfg.get("layer_types") is None:
            cfg["layer_types"] = _every_nth(pattern, n, "full_attention", miss)
    return rule


def _llama4_rule(cfg: dict, n: int, kept: list) -> None:
    # Llama4TextConfig.__post_init__ derives all three when absent; after removal they would be re-derived for the
    # new count and point at other layers, so pin them for the original count (renumbered/sliced later).
    if cfg.get("moe_layers") is None:
        step = cfg.get("interleave_moe_layer_step", 1)
        cfg["moe_layers"] = list(range(step - 1, n, step))
    if not cfg.get("no_rope_layers"):
        interval = cfg.get("no_rope_layer_interval", 4)
        cfg["no_rope_layers"] = [int((i + 1) % interval != 0) for i in range(n)]
    if cfg.get("layer_types") is None:
        chunked = cfg.get("attention_chunk_size", 8192) is not None
        cfg["layer_types"] = ["chunked_attention" if r and chunked else "full_attention" for r in cfg["no_rope_layers"]]


def _period_offset(flags: list[bool]) -> Optional[tuple[int, int]]:
    """(period, offset) with `flags[i] == (i % period == offset)` for every i, offset < period; None if none."""
    n = len(flags)
    hits = [i for i, f in enumerate(flags) if f]
    if not hits:
        return n + 1, n  # no layer index reaches the offset
    for period in range(1, n + 2):
        offset = hits[0] % period
        if all(flags[i] == (i % period == offset) for i in range(n)):
            return period, offset
    return None


def _jamba_rule(cfg: dict, n: int, kept: list) -> None:
    # JambaConfig exposes `layers_block_type` / `layers_num_experts` only as properties computed from period and
    # offset (no explicit list is accepted), so the kept pattern must be a period again, or nothing can describe it.
    for what, period_key, offset_key, default in (("attention", "attn_layer_period", "attn_layer_offset", (8, 4)),
                                                  ("expert", "expert_layer_period", "expert_layer_offset", (2, 1))):
        period = cfg.get(period_key, default[0])
        offset = cfg.get(offset_key, default[1])
        flags = [i % period == offset for i in kept]
        found = _period_offset(flags)
        if found is None:
            old = [i for i in kept if i % period == offset]
            raise ConfigSurgeryError(
                f"jamba: after removal the {what} layers (old indices {old}) are not every k-th layer, which "
                f"{period_key}/{offset_key} cannot express; remove a different set of layers"
            )
        cfg[period_key], cfg[offset_key] = found


def _ernie_moe_rule(cfg: dict, n: int, kept: list) -> None:
    # Ernie4_5_Moe: layer i is MoE iff (i + 1) % interval == 0 and start <= i <= end (end -1 = the last layer).
    start = cfg.get("moe_layer_start_index", 1)
    end = cfg.get("moe_layer_end_index", -1)
    interval = cfg.get("moe_layer_interval", 1)
    if end == -1:
        end = n - 1
    moe = [(i + 1) % interval == 0 and start <= i <= end for i in kept]
    hits = [j for j, f in enumerate(moe) if f]
    if not hits:
        cfg["moe_layer_start_index"], cfg["moe_layer_end_index"], cfg["moe_layer_interval"] = len(kept), len(kept), 1
        return
    lo, hi = hits[0], hits[-1]
    for k in range(1, len(kept) + 2):
        if all(moe[j] == ((j + 1) % k == 0 and lo <= j <= hi) for j in range(len(kept))):
            cfg["moe_layer_start_index"], cfg["moe_layer_end_index"], cfg["moe_layer_interval"] = lo, hi, k
            return
    old = [i for i, f in zip(kept, moe) if f]
    raise ConfigSurgeryError(
        f"ernie4_5_moe: after removal the MoE layers (old indices {old}) cannot be written as "
        "moe_layer_start_index/moe_layer_end_index/moe_layer_interval; remove a different set of layers"
    )


def _kimi_rule(cfg: dict, n: int, kept: list) -> None:
    # Released Kimi-Linear configs keep the attention pattern in a nested dict as 1-BASED layer numbers, which
    # KimiLinearConfig reads only when `layer_types` is absent.
    mapping = {old: new for new, old in enumerate(kept)}
    nested = cfg.get("linear_attn_config")
    if isinstance(nested, dict):
        for key in ("full_attn_layers", "kda_layers"):
            value = nested.get(key)
            if isinstance(value, list):
                bad = [v for v in value if not isinstance(v, int) or not 1 <= v <= n]
                if bad:
                    raise ConfigSurgeryError(f"linear_attn_config.{key} has {bad}, outside the 1-based layer "
                                             f"numbers 1..{n}; fix the source config before pruning")
                nested[key] = [mapping[v - 1] + 1 for v in value if v - 1 in mapping]
    if cfg.get("layer_types") is None and not (isinstance(nested, dict) and "full_attn_layers" in nested
                                               and "kda_layers" in nested):
        cfg["layer_types"] = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    if cfg.get("mlp_layer_types") is None:
        first = cfg.get("first_k_dense_replace", 1)
        cfg["mlp_layer_types"] = ["dense" if i < first else "sparse" for i in range(n)]


def _zamba2_rule(cfg: dict, n: int, kept: list) -> None:
    # The shared transformer block is stored once, under the first hybrid layer's names, and holds one adapter
    # slot per hybrid layer in hybrid order; removing a hybrid layer would have to delete and renumber adapter
    # slots inside that block (and re-cycle the `num_mem_blocks` ties), which a layer rename cannot do.
    types = cfg.get("layers_block_type")
    if types is None:
        raise ConfigSurgeryError("zamba2: config has no 'layers_block_type'; re-save it with transformers >= 5 so "
                                 "the hybrid layers are listed explicitly, then prune")
    hybrid = [i for i, t in enumerate(types) if t == "hybrid"]
    gone = sorted(set(hybrid) - set(kept))
    if gone:
        raise ConfigSurgeryError(
            f"zamba2: layers {gone} are hybrid layers (layers_block_type), whose shared-block adapters cannot be "
            f"removed; remove only non-hybrid layers (hybrid layers are {hybrid})"
        )
    cfg["hybrid_layer_ids"] = hybrid  # renumbered with the other index lists


def _moe_layer_freq_rule(cfg: dict, n: int, kept: list) -> Optional[set]:
    # DeepSeek-V2 style: MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0. Express or refuse.
    freq = cfg.get("moe_layer_freq", 1)
    if not isinstance(freq, int) or freq == 1:
        return
    first = cfg.get("first_k_dense_replace", 0) or 0
    moe = [i >= first and i % freq == 0 for i in kept]
    m = len(kept)
    for k in range(1, m + 2):
        for f in range(0, m + 1):
            if all(moe[j] == (j >= f and j % k == 0) for j in range(m)):
                cfg["moe_layer_freq"], cfg["first_k_dense_replace"] = k, f
                return {"first_k_dense_replace"}  # already in new numbering
    raise ConfigSurgeryError(
        "after removal the MoE layers cannot be written as first_k_dense_replace/moe_layer_freq; "
        "remove a different set of layers"
    )


def _indexer_types(cfg: dict, n: int) -> Optional[list]:
    """The per-layer DSA indexer modes ("full" / "shared") as the config class derives them when absent."""
    types = cfg.get("indexer_types")
    if types is not None:
        return types
    model_type = cfg.get("model_type")
    if model_type in ("hy_v4", "hy_v4_vl_text"):  # HYV4Config: full at 0, 1, 5, 9, ...
        return ["full" if i == 0 or (i - 1) % 4 == 0 else "shared" for i in range(n)]
    pattern = cfg.get("index_topk_pattern")  # GlmMoeDsaConfig / MistralLarge4Config
    if pattern is not None:
        return [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    freq = max(cfg.get("index_topk_freq", 1), 1)
    offset = cfg.get("index_skip_topk_offset", 2)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]


def _dsa_indexer_rule(cfg: dict, n: int, kept: list) -> None:
    # A "shared" layer runs no indexer: it reuses the top-k the latest "full" layer handed down the layer loop
    # (`prev_topk_indices`). Pin the modes for the original count (re-derived for the new count they would point
    # elsewhere), then refuse when a kept shared layer's source is removed: the pruned model would hand it an
    # earlier full layer's top-k, or none at all.
    types = _indexer_types(cfg, n)
    if not isinstance(types, list) or len(types) != n:
        return  # the generic pass reports a wrong length
    cfg["indexer_types"] = list(types)
    cfg.pop("index_topk_pattern", None)
    source, keep = None, set(kept)
    for i, kind in enumerate(types):
        if kind != "shared":
            source = i
        elif i in keep and source is not None and source not in keep:
            raise ConfigSurgeryError(
                f"config field 'indexer_types': layer {i} is 'shared' and reuses the top-k of 'full' layer {source}, "
                f"which would be removed; keep layer {source} or remove its shared layers too"
            )


def _zaya_rule(cfg: dict, n: int, kept: list) -> None:
    # ZayaRouter adds the previous layer's router state (`prev_router_hidden_states`, EDA) to its own, so every
    # layer after a removed one would be routed from a different state; no config field describes that chain.
    gone = sorted(set(range(n)) - set(kept))
    after = [i for i in kept if i > gone[0]]
    if after:
        raise ConfigSurgeryError(
            f"zaya: layer {after[0]} routes with the router state of the layer before it (prev_router_hidden_states), "
            f"so removing layer {max(i for i in gone if i < after[0])} would change its routing; only trailing "
            "layers can be removed"
        )


_PATTERN_RULES: dict[str, Callable[[dict, int, list], Optional[set]]] = {
    "gemma3_text": _explicit_layer_types_from_interval("sliding_window_pattern", 6, "sliding_attention"),
    "cohere2": _explicit_layer_types_from_interval("sliding_window_pattern", 4, "sliding_attention"),
    "cohere_compass": _explicit_layer_types_from_interval("sliding_window_pattern", 4, "sliding_attention"),
    "qwen3_next": _explicit_layer_types_from_interval("full_attention_interval", 4, "linear_attention"),
    "gemma2": _fixed_every_nth(2, "sliding_attention"),
    "gpt_oss": _fixed_every_nth(2, "sliding_attention"),
    "llama4_text": _llama4_rule,
    "jamba": _jamba_rule,
    "ernie4_5_moe": _ernie_moe_rule,
    "kimi_linear": _kimi_rule,
    "zamba2": _zamba2_rule,
    "deepseek_v2": _moe_layer_freq_rule,
    "deepseek_v3": _moe_layer_freq_rule,
    **{t: _dsa_indexer_rule for t in ("hy_v4", "hy_v4_vl_text", "glm_moe_dsa", "mistral_large4",
                                      "glm5_next_text")},
    "zaya": _zaya_rule,
}


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


# ----------------------------------------------------------------------------------------------------------------
# Module names inside quantization configs (`modules_to_not_convert`, compressed-tensors `ignore` / `targets`,
# GPTQ `dynamic` keys): "model.layers.3.mlp.gate" must follow layer 3 to its new number, or vanish with it.

# Decoder-stack prefixes as they appear in module names from the top-level model; anchored at the start of the
# name so a vision tower's "model.vision_tower.encoder.layers.3" is never mistaken for decoder layer 3.
_STACK_PREFIXES = ("model.language_model.layers", "language_model.model.layers", "model.decoder.layers",
                   "model.layers", "transformer.h", "backbone.layers", "gpt_neox.layers", "layers", "h")
_MODULE_PREFIX_RE = re.compile(r"^(?:re:|[+-]:)?")
_LAYER_REF_RE = re.compile(
    r"^(?P<head>(?:re:|[+-]:)?\^?(?:"
    + "|".join(r"\\?\.".join(re.escape(part) for part in p.split(".")) for p in _STACK_PREFIXES)
    + r")\\?\.)(?P<idx>\d+)(?P<tail>\\?\.|\$|$)"
)
_REGEX_META = re.compile(r"[*?\[\]()|\\^$+{}]")
_PROBE_PREFIXES = ("model.layers", "model.language_model.layers")
_PROBE_SUFFIXES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate", "mlp.down_proj", "mlp.experts.0.down_proj",
                   "mlp.shared_experts.down_proj", "linear_attn.in_proj_qkvz", "mamba.in_proj", "input_layernorm")


def _layer_dependent_pattern(text: str, num_layers: int) -> bool:
    body = _MODULE_PREFIX_RE.sub("", text, count=1)
    if not _REGEX_META.search(body):
        return False
    try:
        pattern = re.compile(body)
    except re.error:
        return False
    for prefix in _PROBE_PREFIXES:
        for suffix in _PROBE_SUFFIXES:
            seen = {bool(pattern.search(f"{prefix}.{i}.{suffix}")) for i in range(num_layers)}
            if len(seen) > 1:
                return True
    return False


def _renumber_module_ref(text: str, mapping: dict[int, int], num_layers: int, where: str) -> Optional[str]:
    """The name/pattern with its decoder-layer number renumbered; None when it names a removed layer."""
    m = _LAYER_REF_RE.match(text)
    if m is None:
        if _layer_dependent_pattern(text, num_layers):
            raise ConfigSurgeryError(
                f"{where} entry {text!r} selects decoder layers by a pattern that cannot be renumbered; rewrite it "
                "with explicit layer numbers (e.g. 'model.layers.3.') before pruning"
            )
        return text
    old = int(m.group("idx"))
    if old not in mapping:
        return None
    return m.group("head") + str(mapping[old]) + text[m.end("idx"):]


def _renumber_quantization(node: Any, mapping: dict[int, int], num_layers: int, where: str) -> Any:
    if isinstance(node, str):
        new = _renumber_module_ref(node, mapping, num_layers, where)
        if new is None:
            raise ConfigSurgeryError(f"{where} is {node!r}, which names a removed layer; it cannot be dropped "
                                     "from a single-valued field; edit quantization_config before pruning")
        return new
    if isinstance(node, list):
        out = []
        for item in node:
            if isinstance(item, str):
                new = _renumber_module_ref(item, mapping, num_layers, where)
                if new is not None:  # entries for removed layers go with them
                    out.append(new)
            else:
                out.append(_renumber_quantization(item, mapping, num_layers, where))
        return out
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            new_key = _renumber_module_ref(key, mapping, num_layers, where) if isinstance(key, str) else key
            if new_key is None:  # GPTQ `dynamic` override for a removed layer
                continue
            out[new_key] = _renumber_quantization(value, mapping, num_layers, f"{where}.{key}")
        return out
    return node


# ----------------------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prune_stack_config(cfg: dict, removed: list[int], num_layers: int, mapping: dict[int, int]) -> None:
    """Rewrite, in place, the config that owns the decoder stack (`cfg` is already a private copy)."""
    kept = [i for i in range(num_layers) if i not in set(removed)]
    new_count = len(kept)

    for key, default in LEADING_COUNT_DEFAULTS.get(cfg.get("model_type"), {}).items():
        if cfg.get(key) is None:
            cfg[key] = default
    rule = _PATTERN_RULES.get(cfg.get("model_type"))
    # A rule may return the keys it already wrote in the new numbering, which the generic pass must not touch.
    done = (rule(cfg, num_layers, kept) if rule is not None else None) or set()
    dense_layers = _sparse_moe_dense_layers(cfg, num_layers)

    for key in LAYER_COUNT_KEYS:
        if cfg.get(key) == num_layers:
            cfg[key] = new_count

    for key, value in list(cfg.items()):
        if key in NOT_PER_LAYER_KEYS or key in done:
            continue
        if key in LAYER_INDEX_LIST_KEYS and isinstance(value, (list, tuple)):
            bad = [i for i in value if not _is_int(i) or not 0 <= i < num_layers]
            if bad:
                raise ConfigSurgeryError(f"config field {key!r} lists {bad}, which are not layer indices "
                                         f"0..{num_layers - 1}; fix the source config before pruning")
            cfg[key] = [mapping[i] for i in value if i in mapping]
        elif key in LAYER_SOURCE_LIST_KEYS and isinstance(value, (list, tuple)):
            if len(value) != num_layers or not all(_is_int(i) and 0 <= i < num_layers for i in value):
                raise ConfigSurgeryError(f"config field {key!r} must name one layer index 0..{num_layers - 1} per "
                                         "layer; fix the source config before pruning")
            orphans = [i for i in kept if value[i] not in mapping]
            if orphans:
                raise ConfigSurgeryError(
                    f"config field {key!r}: kept layers {orphans} read the K/V of removed layers "
                    f"{sorted({value[i] for i in orphans})}; remove those readers too, or keep their sources")
            cfg[key] = [mapping[value[i]] for i in kept]
        elif key in LEADING_COUNT_KEYS and _is_int(value):
            cfg[key] = sum(1 for i in kept if i < value)
        elif key in PER_LAYER_STRING_KEYS and isinstance(value, str) and len(value) == num_layers:
            cfg[key] = "".join(value[i] for i in kept)
        elif key in PER_LAYER_LIST_KEYS and isinstance(value, (list, tuple)):
            if len(value) != num_layers:
                raise ConfigSurgeryError(
                    f"config field {key!r} has {len(value)} entries but the model has {num_layers} layers; "
                    "fix the source config before pruning"
                )
            cfg[key] = [value[i] for i in kept]
        elif isinstance(value, (list, tuple)) and len(value) == num_layers and key not in TEXT_SUBCONFIG_KEYS:
            raise ConfigSurgeryError(
                f"config field {key!r} has one entry per layer ({num_layers}) but its meaning is unknown, so it is "
                "neither sliced nor kept; add it to PER_LAYER_LIST_KEYS or NOT_PER_LAYER_KEYS in "
                "shortgpt_fast/models/config_surgery.py"
            )

    if dense_layers is not None:
        cfg["mlp_only_layers"] = [mapping[i] for i in dense_layers if i in mapping]
        cfg["decoder_sparse_step"] = 1


def prune_config_dict(cfg: dict, removed: Sequence[int], num_layers: int | None = None) -> dict:
    """Return a new config dict with `removed` layers taken out and every per-layer field made consistent.

    The input is never modified. Wrappers without their own layer count are pruned through the sub-config that
    holds the decoder stack (`text_config`, ...); a sub-config with the same layer count as the top level describes
    the same stack and is pruned with it. `quantization_config` module names are renumbered wherever it sits.

    Raises:
        ConfigSurgeryError: one line naming the field, for anything the pruned config could not express.
    """
    cfg = copy.deepcopy(cfg)
    if num_layers is None and not _has_count(cfg):
        sub = _text_subconfig(cfg)
        if sub is None:
            layer_count(cfg)  # raises the standard message
        stack = cfg[sub]
        while not _has_count(stack):
            stack = stack[_text_subconfig(stack)]
        inner_n = layer_count(stack)
        cfg[sub] = prune_config_dict(cfg[sub], removed)
        mapping = index_map(validate_layers(removed, inner_n), inner_n, mtp_layer_count(stack))
        _prune_quantization(cfg, mapping, inner_n)
        return with_legacy_rope_fields(cfg)
    if num_layers is None:
        num_layers = layer_count(cfg)
    removed = validate_layers(removed, num_layers)
    mapping = index_map(removed, num_layers, mtp_layer_count(cfg))
    _prune_stack_config(cfg, removed, num_layers, mapping)
    for key in TEXT_SUBCONFIG_KEYS:
        sub = cfg.get(key)
        if isinstance(sub, dict) and _has_count(sub) and layer_count(sub) == num_layers:
            cfg[key] = prune_config_dict(sub, removed)
    _prune_quantization(cfg, mapping, num_layers)
    return with_legacy_rope_fields(cfg)  # so transformers 4.x reads the same RoPE


def _prune_quantization(cfg: dict, mapping: dict[int, int], num_layers: int) -> None:
    for key in ("quantization_config", "compression_config"):
        if isinstance(cfg.get(key), dict):
            cfg[key] = _renumber_quantization(cfg[key], mapping, num_layers + _extra(mapping, num_layers), key)


def _extra(mapping: dict[int, int], num_layers: int) -> int:
    return sum(1 for i in mapping if i >= num_layers)


def _set_config_value(config: Any, key: str, value: Any) -> None:
    current = getattr(config, key, None)
    if isinstance(value, dict) and current is not None and not isinstance(current, dict) \
            and hasattr(current, "to_dict"):
        # A live quantization config object: update its fields rather than replace it with a plain dict.
        for k, v in value.items():
            if getattr(current, k, None) != v:
                setattr(current, k, v)
        return
    setattr(config, key, value)


def apply_to_config(config: Any, removed: Sequence[int]) -> dict[int, int]:
    """Prune a live `PretrainedConfig` in place; returns the old -> new index map.

    Nothing is changed when config surgery refuses, so a failed prune leaves the config as it was.
    """
    before = config.to_dict()
    # Remote-code configs (Baichuan-style) may store the count under their own name and expose the standard one only
    # through attribute_map; the live config says which, and setting the standard name writes the real field.
    # Encoder-decoder families alias it to one half (`encoder_layers` in BART, Whisper), which is not the decoder
    # stack a causal-LM prune removes from, so those keep refusing for want of a count.
    alias = (getattr(type(config), "attribute_map", None) or {}).get("num_hidden_layers")
    if (alias and not alias.startswith(("encoder_", "decoder_")) and not _has_count(before)
            and _is_int(before.get(alias))):
        before = dict(before, num_hidden_layers=before[alias])
    num_layers = layer_count(before) if _has_count(before) else None
    after = prune_config_dict(before, removed, num_layers)
    changed = [key for key, value in after.items() if before.get(key) != value]
    # Pattern pairs are validated together by strict configs (jamba: offset < period), so set periods first.
    changed.sort(key=lambda k: (not k.endswith("_period"), not k.endswith("_interval")))
    for key in changed:
        value = after[key]
        if key in TEXT_SUBCONFIG_KEYS and hasattr(getattr(config, key, None), "to_dict"):
            apply_to_config(getattr(config, key), removed)
        else:
            _set_config_value(config, key, value)
    if num_layers is not None:
        n = num_layers
    else:
        stack = before
        while not _has_count(stack):
            stack = stack[_text_subconfig(stack)]
        n = layer_count(stack)
    return index_map(validate_layers(removed, n), n)
