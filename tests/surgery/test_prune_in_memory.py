"""In-memory pruning leaves a model that saves, reloads bit-identically and generates the same with or without cache."""
from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_MODELS, random_ids
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from shortgpt_fast import api
from shortgpt_fast.models.architectures import find_block_stack
from shortgpt_fast.models.config_surgery import ConfigSurgeryError, prune_config_dict


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_pruned_model_saves_reloads_and_generates(family, tmp_path):
    model = TINY_MODELS[family]()
    original_types = list(getattr(model.config, "layer_types", None) or [])
    removed = [1, 3]
    api.prune(model, removed)
    n = model.config.num_hidden_layers
    blocks = find_block_stack(model).blocks
    assert len(blocks) == n
    for i, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == i, "layer_idx not renumbered: the KV cache would be indexed wrongly"
    if original_types:
        assert model.config.layer_types == [t for i, t in enumerate(original_types) if i not in removed]

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = random_ids(2, 17)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        prompt = random_ids(1, 9, seed=4)
        with_cache = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        without = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(with_cache, without)
        in_memory = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(in_memory, with_cache)


def test_qwen3_config_stays_consistent(tmp_path):
    model = TINY_MODELS["qwen3"](num_layers=6)
    assert model.config.max_window_layers == 3
    api.prune(model, [0, 4])
    assert model.config.num_hidden_layers == 4
    assert len(model.config.layer_types) == 4
    assert model.config.max_window_layers == 2  # kept layers 1 and 2 were below the old threshold 3


def test_moe_sparse_step_becomes_explicit():
    cfg = Qwen2MoeConfig(num_hidden_layers=6, decoder_sparse_step=2, num_experts=4, mlp_only_layers=[]).to_dict()
    out = prune_config_dict(cfg, [1])
    # Old MoE layers were 1, 3, 5; removing 1 leaves old 3 and 5 -> new 2 and 4. Dense: old 0, 2, 4 -> new 0, 1, 3.
    assert out["decoder_sparse_step"] == 1
    assert out["mlp_only_layers"] == [0, 1, 3]
    assert out["num_hidden_layers"] == 5


def test_config_surgery_rejects_bad_requests():
    cfg = {"num_hidden_layers": 4, "layer_types": ["a"] * 4}
    with pytest.raises(ConfigSurgeryError, match="repeat"):
        prune_config_dict(cfg, [1, 1])
    with pytest.raises(ConfigSurgeryError, match="out of range"):
        prune_config_dict(cfg, [4])
    with pytest.raises(ConfigSurgeryError, match="at least one layer"):
        prune_config_dict(cfg, [0, 1, 2, 3])
    with pytest.raises(ConfigSurgeryError, match="no layers"):
        prune_config_dict(cfg, [])
    with pytest.raises(ConfigSurgeryError, match="layer_types"):
        prune_config_dict({"num_hidden_layers": 4, "layer_types": ["a"] * 3}, [0])


def test_token_id_lists_are_not_sliced_as_per_layer():
    cfg = {"num_hidden_layers": 2, "eos_token_id": [5, 6], "layer_types": ["x", "y"]}
    out = prune_config_dict(cfg, [0])
    assert out["eos_token_id"] == [5, 6] and out["layer_types"] == ["y"]
