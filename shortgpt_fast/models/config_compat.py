"""Configs that transformers 4.x and 5.x read as the same model.

transformers 5 writes RoPE settings only as `rope_parameters` ({"rope_theta", "rope_type", scaling fields,
"partial_rotary_factor"}); 4.x ignores that key and reads the top-level `rope_theta` (default 10 000),
`rope_scaling` and `partial_rotary_factor`. A 5.x-written SmolLM2 config (θ = 100 000) therefore loads in 4.57 as a
silently different model. Writing the top-level fields as well fixes that: 5.x prefers `rope_parameters` when both
are present (checked in tests/models/test_config_compat.py), so its reading does not change.
"""
from __future__ import annotations

from typing import Any

# Keys of a flat `rope_parameters` that 4.x reads at the top level of the config under the same name.
_TOP_LEVEL = ("rope_theta", "partial_rotary_factor")


def legacy_rope_fields(cfg: dict) -> dict:
    """The top-level fields a transformers 4.x config reader needs to see `cfg`'s 5.x `rope_parameters`, minus
    those `cfg` already has. {} when there is no flat `rope_parameters` (per-layer-type RoPE dicts, as in Gemma 3,
    have no single 4.x spelling and are left alone)."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict) or not isinstance(params.get("rope_theta"), (int, float)):
        return {}
    fields = {key: params[key] for key in _TOP_LEVEL if key in params}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        fields["rope_scaling"] = {k: v for k, v in params.items() if k not in _TOP_LEVEL}
    return {k: v for k, v in fields.items() if cfg.get(k) is None}


def with_legacy_rope_fields(cfg: dict) -> dict:
    """`cfg` plus legacy_rope_fields(cfg), for itself and its `text_config`; the input is not modified."""
    out = dict(cfg, **legacy_rope_fields(cfg))
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = with_legacy_rope_fields(out["text_config"])
    return out


def add_legacy_rope_fields(config: Any) -> None:
    """Set legacy_rope_fields on a live transformers config, so save_pretrained writes them."""
    for key, value in legacy_rope_fields(config.to_dict()).items():
        setattr(config, key, value)
    text_config = getattr(config, "text_config", None)
    if text_config is not None and hasattr(text_config, "to_dict"):
        add_legacy_rope_fields(text_config)
