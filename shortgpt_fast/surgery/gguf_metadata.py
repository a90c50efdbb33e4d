"""What a layer cut changes in a GGUF file's metadata, as llama.cpp reads it.

llama.cpp derives each layer's kind from metadata: per-layer arrays (`head_count_kv` of LFM2, whose 0 marks a
convolution layer; `feed_forward_length`; sliding-window flags), leading counts (`leading_dense_block_count`), MTP
blocks after the last layer (`nextn_predict_layers`), and periodic rules (a sliding-window period, a full-attention
interval, an interleaved-MoE step) applied to the layer index. After a cut, every kept layer must come out with the
kind it had. Arrays are sliced, counts recounted, and periodic rules rewritten to the explicit per-layer array that
llama.cpp reads in their place (`attention.sliding_window_pattern` as bools, `attention.recurrent_layers`); a rule
with no explicit form is kept only when the cut leaves every kept layer's kind unchanged, and refused otherwise.
The rules are the ones of llama.cpp's src/models/*.cpp (the version llama-cpp-python 0.3.36 vendors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..io.gguf import ARRAY, BOOL, INTEGER_TYPES, GGUFHeader
from .untrusted import SurgeryError

# Architectures that apply a default sliding-window period when `{arch}.attention.sliding_window_pattern` is absent
# (llama.cpp's load_swa_pattern(n, dense_first)): the period must become an explicit array before layers move.
SWA_DEFAULT_PERIOD: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
    "cohere2": (4, False), "cohere2moe": (4, True), "exaone4": (4, False), "exaone-moe": (4, False),
    "llama4": (4, False), "olmo2": (4, False), "gpt-oss": (2, False), "smallthinker": (4, True), "afmoe": (4, False),
    "modern-bert": (3, True), "plamo3": (8, False), "laguna": (4, True), "mellum": (4, False),
    "muse-glimmer": (4, False),
}
# Architectures whose full-attention interval has an explicit replacement, `{arch}.attention.recurrent_layers`
# (read first by get_key_or_arr), with llama.cpp's default interval.
FULL_ATTENTION_DEFAULT: dict[str, int] = {"qwen3next": 4, "qwen35": 4, "qwen35moe": 4, "minimax-01": 8, "qwen4exp": 4}

# Periodic rules with no explicit form: (key suffix, default, rule(layer, n) -> kind). Kept only if no kind changes.
PERIODIC_KEYS: dict[str, Callable[[int, int], bool]] = {
    "interleave_moe_layer_step": lambda i, n: n > 0 and (i + 1) % n == 0,
    "moe_every_n_layers": lambda i, n: n > 0 and i % n == 1,
    "rescale_every_n_layers": lambda i, n: n != 0 and (i + 1) % n == 0,
}
# Hard-coded periods of llama.cpp models (no metadata at all): llama4's and smollm3's no-RoPE layers.
IMPLICIT_PERIODS: dict[str, list[tuple[str, int, Callable[[int, int], bool]]]] = {
    "llama4": [("no-RoPE layer every 4th", 4, lambda i, n: (i + 1) % n == 0)],
    "smollm3": [("no-RoPE layer every 4th", 4, lambda i, n: (i + 1) % n == 0)],
}
# Layer-referencing keys whose meaning a cut would change in ways not modelled here: refused by name.
UNSUPPORTED_LAYER_KEYS = ("n_deepstack_layers", "attention.shared_kv_layers", "target_layers", "hash_layer_count",
                          "hrm.layers_per_stack", "decoder_block_count", "ple.layers", "attn_res.block_size")
# Arrays under the architecture prefix that are never per layer, even when a tiny model's layer count equals their
# length.
NOT_PER_LAYER = ("rope.dimension_sections", "classifier.output_labels", "ple.layer_multipliers")

CUT_RECORD_KEY = "shortgpt_fast.cut"


@dataclass
class MetadataEdit:
    """New values for existing keys (None: delete the key) and keys to add, as (type, elem_type, value)."""

    replace: dict[str, Optional[tuple[int, int, Any]]]
    add: dict[str, tuple[int, int, Any]]


def _swa_flags(n_all: int, n_trunk: int, period: int, dense_first: bool) -> list[bool]:
    if dense_first:
        flags = [period == 0 or i % period != 0 for i in range(n_trunk)]
    else:
        flags = [period == 0 or i % period < period - 1 for i in range(n_trunk)]
    return flags + [False] * (n_all - n_trunk)


def _deepseek2_heuristics(header: GGUFHeader, arch: str, n_trunk: int) -> tuple[bool, bool]:
    """llama.cpp's deepseek2 loader guesses the variant from the layer count: "lite" (26 or 27 layers, or 48 with a
    128256 vocabulary) skips the q-LoRA rank, and 47/48 layers with a 154880 vocabulary pick sigmoid gating when the
    gating key is absent. A cut that changes a guess loads as another model."""
    vocab = header.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = header.kvs.get("tokenizer.ggml.tokens")
        vocab = tokens.count if tokens is not None else 0
    lite = n_trunk in (26, 27) or (n_trunk == 48 and vocab == 128256)
    glm_lite = f"{arch}.expert_gating_func" not in header.kvs and n_trunk in (47, 48) and vocab == 154880
    return lite, glm_lite


def plan_metadata(header: GGUFHeader, arch: str, n_all: int, n_trunk: int, removed: list[int]) -> MetadataEdit:
    """The metadata edit of cutting trunk layers `removed` (sorted) from a model of `n_all` blocks, the last
    `n_all - n_trunk` of them MTP blocks; SurgeryError naming the key when llama.cpp would see another model."""
    gone = set(removed)
    kept_all = [i for i in range(n_all) if i not in gone]
    kept_trunk = [i for i in range(n_trunk) if i not in gone]
    new_trunk = len(kept_trunk)
    edit = MetadataEdit(replace={}, add={})
    prefix = f"{arch}."

    def refuse(why: str) -> SurgeryError:
        return SurgeryError(f"{header.path}: {why}; cutting layers {removed} would change the kind of a kept layer "
                            "in llama.cpp. Choose layers that keep the pattern, or cut the safetensors checkpoint")

    def kinds_kept(rule: Callable[[int, int], bool], n: int) -> bool:
        return all(rule(old, n) == rule(new, n) for new, old in enumerate(kept_trunk))

    for suffix in UNSUPPORTED_LAYER_KEYS:
        if prefix + suffix in header.kvs:
            raise SurgeryError(f"{header.path}: {prefix + suffix} refers to layers in a way this cut does not "
                               "rewrite; refusing rather than writing a model llama.cpp would misread")

    block = header.kvs.get(prefix + "block_count")
    edit.replace[block.key] = (block.type, 0, len(kept_all))

    for kv in header.kvs.values():
        if not kv.key.startswith(prefix) or kv.type != ARRAY or kv.value is None:
            continue
        if kv.key[len(prefix):] in NOT_PER_LAYER:
            continue
        if kv.count == n_all:
            edit.replace[kv.key] = (ARRAY, kv.elem_type, [kv.value[i] for i in kept_all])
        elif n_all != n_trunk and kv.count == n_trunk:
            edit.replace[kv.key] = (ARRAY, kv.elem_type, [kv.value[i] for i in kept_trunk])

    dense = header.kvs.get(prefix + "leading_dense_block_count")
    if dense is not None and dense.type in INTEGER_TYPES:
        edit.replace[dense.key] = (dense.type, 0, sum(1 for i in kept_trunk if i < dense.value))

    swa_key = prefix + "attention.sliding_window_pattern"
    swa = header.kvs.get(swa_key)
    window = header.get(prefix + "attention.sliding_window")
    if swa is not None and swa.type in INTEGER_TYPES:
        dense_first = SWA_DEFAULT_PERIOD.get(arch, (0, False))[1]
        flags = _swa_flags(n_all, n_trunk, int(swa.value), dense_first)
        edit.replace[swa_key] = (ARRAY, BOOL, [flags[i] for i in kept_all])
    elif swa is None and arch in SWA_DEFAULT_PERIOD and (window is None or window):
        period, dense_first = SWA_DEFAULT_PERIOD[arch]
        kept_flags = [_swa_flags(n_all, n_trunk, period, dense_first)[i] for i in kept_all]
        # Only when the default period, applied to the new numbering, would give a kept layer another kind.
        if kept_flags != _swa_flags(len(kept_all), new_trunk, period, dense_first):
            edit.add[swa_key] = (ARRAY, BOOL, kept_flags)

    if arch in FULL_ATTENTION_DEFAULT and prefix + "attention.recurrent_layers" not in header.kvs:
        interval_key = prefix + "full_attention_interval"
        interval = header.get(interval_key, FULL_ATTENTION_DEFAULT[arch])
        if not isinstance(interval, int) or interval <= 0:
            raise SurgeryError(f"{header.path}: {interval_key} is {interval!r}, not a positive interval")
        recurrent = [i < n_trunk and (i + 1) % interval != 0 for i in range(n_all)]
        edit.add[prefix + "attention.recurrent_layers"] = (ARRAY, BOOL, [recurrent[i] for i in kept_all])
        if interval_key in header.kvs:
            edit.replace[interval_key] = None  # the explicit array says it all; a stale interval would mislead

    for suffix, rule in PERIODIC_KEYS.items():
        kv = header.kvs.get(prefix + suffix)
        if kv is not None and kv.type in INTEGER_TYPES and not kinds_kept(rule, int(kv.value)):
            raise refuse(f"{kv.key}={kv.value} assigns layer kinds by index and llama.cpp has no per-layer form of it")
    for what, n, rule in IMPLICIT_PERIODS.get(arch, []):
        if not kinds_kept(rule, n):
            raise refuse(f"llama.cpp's {arch} puts a {what} (hard-coded, not in the metadata)")

    if arch == "deepseek2":
        before = _deepseek2_heuristics(header, arch, n_trunk)
        after = _deepseek2_heuristics(header, arch, new_trunk)
        if before != after:
            raise refuse(f"llama.cpp guesses the deepseek2 variant from the layer count ({n_trunk} -> {new_trunk} "
                         "layers changes its guess)")
    return edit
