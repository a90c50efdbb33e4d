"""Configs we write read the same RoPE in transformers 5.x (rope_parameters) and 4.x (top-level fields)."""
from __future__ import annotations

import copy
import json

import pytest
from tiny_models import tiny_llama
from transformers import AutoConfig, LlamaConfig

from shortgpt_fast.models.config_compat import add_legacy_rope_fields, legacy_rope_fields, with_legacy_rope_fields
from shortgpt_fast.models.config_surgery import prune_config_dict
from shortgpt_fast.surgery.in_memory import prune_model

SMOLLM2_ROPE = {"rope_theta": 100000.0, "rope_type": "default"}  # as transformers 5 writes SmolLM2's config
LLAMA3_ROPE = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def theta_read_by_4x(cfg: dict) -> float:
    # transformers 4.45-4.57 LlamaConfig.__init__(..., rope_theta=10000.0, rope_scaling=None, ...): the top-level
    # key or the default; an unknown `rope_parameters` key is kept as an attribute and never read.
    return cfg.get("rope_theta", 10000.0)


def theta_read_by_5x(cfg: dict) -> float:
    return LlamaConfig.from_dict(copy.deepcopy(cfg)).rope_parameters["rope_theta"]


def _config(rope: dict, **extra) -> dict:
    return dict(LlamaConfig(num_hidden_layers=6, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                            vocab_size=101).to_dict(), rope_parameters=dict(rope), **extra)


def test_a_5x_config_alone_reads_differently_in_4x():
    cfg = _config(SMOLLM2_ROPE)
    assert "rope_theta" not in cfg  # what transformers 5 writes: the bug this module fixes
    assert theta_read_by_5x(cfg) == 100000.0 != theta_read_by_4x(cfg)


@pytest.mark.parametrize("rope", [SMOLLM2_ROPE, LLAMA3_ROPE], ids=["default", "llama3"])
def test_pruned_config_reads_the_same_rope_in_both(rope):
    pruned = prune_config_dict(_config(rope), [2, 3])
    assert theta_read_by_4x(pruned) == theta_read_by_5x(pruned) == rope["rope_theta"]
    if rope["rope_type"] != "default":
        assert pruned["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    else:
        assert "rope_scaling" not in pruned or pruned["rope_scaling"] is None
    # 5.x prefers rope_parameters when both spellings are present: its reading is unchanged.
    assert LlamaConfig.from_dict(pruned).rope_parameters == LlamaConfig.from_dict(_config(rope)).rope_parameters


def test_existing_top_level_fields_are_kept_and_nested_rope_is_left_alone():
    assert legacy_rope_fields(dict(_config(SMOLLM2_ROPE), rope_theta=100000.0)) == {}
    gemma3_style = {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}
    assert legacy_rope_fields(gemma3_style) == {}
    wrapped = with_legacy_rope_fields({"text_config": {"rope_parameters": dict(SMOLLM2_ROPE)}})
    assert wrapped["text_config"]["rope_theta"] == 100000.0


def test_save_pretrained_of_a_pruned_and_of_a_healed_model_writes_both_spellings(tmp_path):
    model = tiny_llama(num_layers=5)
    model.config.rope_parameters = dict(SMOLLM2_ROPE)
    prune_model(model, [1])  # the in-memory prune path: its config goes through prune_config_dict
    model.save_pretrained(tmp_path / "pruned")
    written = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert theta_read_by_4x(written) == theta_read_by_5x(written) == 100000.0
    # Loading drops the top-level copy again (5.x folds it into rope_parameters), so every later writer adds it.
    reloaded = AutoConfig.from_pretrained(tmp_path / "pruned")
    assert "rope_theta" not in reloaded.to_dict()
    add_legacy_rope_fields(reloaded)
    reloaded.save_pretrained(tmp_path / "healed")
    written = json.loads((tmp_path / "healed" / "config.json").read_text())
    assert theta_read_by_4x(written) == theta_read_by_5x(written) == 100000.0
