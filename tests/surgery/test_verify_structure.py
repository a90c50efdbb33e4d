"""Verification by construction: a prune or cut that would compute something else is refused before anything changes.

Each test plants the kind of silent error config surgery could make (or the checkpoint could hide) and asserts the
refusal names the layer and the field, that nothing was written, and that the model in memory is untouched.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from tiny_models import random_ids, tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig

from shortgpt_fast.models import config_surgery
from shortgpt_fast.models.architectures import find_block_stack, renamed_tensor
from shortgpt_fast.models.identity_oracle import identity_logits
from shortgpt_fast.surgery import in_memory, plan
from shortgpt_fast.surgery.checkpoint import SurgeryError, cut_checkpoint
from shortgpt_fast.surgery.in_memory import prune_model
from shortgpt_fast.surgery.verify_structure import (
    StructureMismatch,
    build_skeleton,
    compare_per_layer_config,
    verify_checkpoint_tensors,
    verify_pruned_config,
)

REMOVED = [1, 4]


def _tiny(model_type: str, **config):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()


def _gemma3(layers: int = 7):
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=211, hidden_size=48, intermediate_size=72, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=5,
                              layer_types=["full_attention" if i % 3 == 2 else "sliding_attention"
                                           for i in range(layers)], pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).eval()


def _forgetful_surgery(real):
    """Config surgery that re-derives the layer pattern for the new count instead of slicing it: the classic bug."""
    def prune_config_dict(cfg, removed, num_layers=None):
        out = real(cfg, removed, num_layers)
        if "layer_types" in cfg:
            out["layer_types"] = cfg["layer_types"][:len(out["layer_types"])]
        return out
    return prune_config_dict


def test_planted_pattern_error_is_refused_before_the_cut_writes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _gemma3().save_pretrained(src)
    monkeypatch.setattr(plan, "prune_config_dict", _forgetful_surgery(config_surgery.prune_config_dict))
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match=r"layer \d+ \(new index \d+\) would change: .*(sliding|type)") as err:
        cut_checkpoint(src, REMOVED, out=out)
    assert "\n" not in str(err.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
    # The same plan goes through once the proof is waived: the check, not the engine, refused it.
    cut_checkpoint(src, REMOVED, out=out, check=False)
    assert out.is_dir()


def test_planted_pattern_error_is_refused_in_place_and_the_folder_is_untouched(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _gemma3().save_pretrained(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    monkeypatch.setattr(plan, "prune_config_dict", _forgetful_surgery(config_surgery.prune_config_dict))
    with pytest.raises(SurgeryError, match="would change"):
        cut_checkpoint(src, REMOVED, in_place=True)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_in_memory_prune_is_transactional(monkeypatch):
    model = _gemma3()
    blocks = list(find_block_stack(model).blocks)
    config_before = model.config.to_dict()
    monkeypatch.setattr(in_memory, "apply_to_config", _forgetful_apply(in_memory.apply_to_config))
    with pytest.raises(StructureMismatch, match="would change"):
        prune_model(model, REMOVED)
    assert list(find_block_stack(model).blocks) == blocks
    assert model.config.to_dict() == config_before
    assert [b.self_attn.layer_idx for b in blocks] == list(range(len(blocks)))


def _forgetful_apply(real):
    def apply_to_config(config, removed):
        types_before = list(config.layer_types)
        mapping = real(config, removed)
        config.layer_types = types_before[:len(mapping)]
        return mapping
    return apply_to_config


def test_a_config_surgery_refusal_also_leaves_the_model_whole():
    model = tiny_llama(num_layers=6)
    model.config.layer_types = ["full_attention"] * 5  # one short: surgery cannot slice it
    blocks = list(find_block_stack(model).blocks)
    with pytest.raises(ValueError, match="layer_types"):
        prune_model(model, REMOVED)
    assert list(find_block_stack(model).blocks) == blocks and model.config.num_hidden_layers == 6


def test_two_attention_sublayers_keep_their_own_cache_slots():
    # LongCat-Flash blocks hold two attention sublayers indexed 2i and 2i+1 in the KV cache; numbering both i made
    # generation with a cache diverge from generation without one.
    model = _tiny("longcat_flash", vocab_size=211, hidden_size=64, num_layers=6, num_attention_heads=4,
                  ffn_hidden_size=64, expert_ffn_hidden_size=32, n_routed_experts=4, moe_topk=2, kv_lora_rank=16,
                  q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8,
                  zero_expert_num=2)
    ids = random_ids(2, 11)
    expected = identity_logits(model, REMOVED, ids, use_cache=False)
    prune_model(model, REMOVED)
    for j, block in enumerate(find_block_stack(model).blocks):
        assert [attn.layer_idx for attn in block.self_attn] == [2 * j, 2 * j + 1]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, expected)
        prompt = ids[:1, :5]
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(prompt, use_cache=True, **kwargs),
                           model.generate(prompt, use_cache=False, **kwargs))


def test_per_layer_config_values_must_follow_their_layer():
    old = {"num_hidden_layers": 4, "layer_types": ["a", "b", "a", "b"], "other": [1, 2]}
    compare_per_layer_config(old, {"num_hidden_layers": 3, "layer_types": ["a", "a", "b"], "other": [1, 2]},
                             {0: 0, 2: 1, 3: 2})
    with pytest.raises(StructureMismatch, match=r"'layer_types': layer 2 was 'a' but its new index 1 says 'b'"):
        compare_per_layer_config(old, {"num_hidden_layers": 3, "layer_types": ["a", "b", "a"]}, {0: 0, 2: 1, 3: 2})


def _llama_checkpoint_names(model):
    sd = model.state_dict()
    return {k: list(v.shape) for k, v in sd.items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}


def test_checkpoint_companions_and_mtp_layers_are_carried_but_lost_weights_are_refused():
    model = tiny_llama(num_layers=6)
    cfg = model.config.to_dict()
    new_cfg = config_surgery.prune_config_dict(cfg, REMOVED)
    old_skeleton, new_skeleton, mapping = verify_pruned_config(cfg, new_cfg, REMOVED)
    stored = _llama_checkpoint_names(model)
    # FP8-style scale companions on every layer's projections and one multi-token-prediction layer after the last
    # decoder layer: names the model does not expect, which the cut must carry over renamed, exactly as they were.
    for i in range(6):
        stored[f"model.layers.{i}.mlp.down_proj.weight_scale_inv"] = [1, 1]
    stored["model.layers.6.eh_proj.weight"] = [72, 144]
    full_map = {**mapping, 6: len(mapping)}
    renames = {name: renamed_tensor(name, "model.layers", full_map) for name in stored}
    verify_checkpoint_tensors(old_skeleton, new_skeleton, stored, renames, layer_map=mapping)

    # A kept layer's weight that the cut drops (the Zamba2 shared-block trap) is refused by name.
    lost = {**renames, "model.layers.2.mlp.up_proj.weight": None}
    with pytest.raises(StructureMismatch, match=r"expects tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        verify_checkpoint_tensors(old_skeleton, new_skeleton, stored, lost, layer_map=mapping)
    # A renamed tensor landing on a name the pruned model does not expect is refused too.
    stray = {**renames, "model.layers.5.mlp.up_proj.weight": "model.layers.9.mlp.up_proj.weight"}
    with pytest.raises(StructureMismatch, match=r"layers\.3\.mlp\.up_proj\.weight.* lacks \(2 difference"):
        verify_checkpoint_tensors(old_skeleton, new_skeleton, stored, stray, layer_map=mapping)


def test_skeletons_are_built_without_weight_memory():
    cfg = tiny_llama(num_layers=3).config.to_dict()
    skeleton = build_skeleton(dict(cfg, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                                   num_key_value_heads=8, head_dim=128, vocab_size=128256))
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_cli_cut_proves_in_a_child_process_and_no_verify_waives_it(tmp_path):
    # A model type transformers does not know cannot be rebuilt, so the default refuses it in one line; the torch-
    # free CLI runs the proof in a child process, which is what this exercises.
    src = tmp_path / "src"
    tiny_llama(num_layers=5).save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "homegrown_llama"
    cfg["architectures"] = ["HomegrownForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "shortgpt_fast.cli", "cut", str(src), "--layers", "1,3", "--out"]
    refused = subprocess.run(cmd + [str(tmp_path / "a")], capture_output=True, text=True)
    assert refused.returncode != 0 and not (tmp_path / "a").exists()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "homegrown_llama" in lines[0] and "--no-verify" in lines[0], refused.stderr
    waived = subprocess.run(cmd + [str(tmp_path / "b"), "--no-verify"], capture_output=True, text=True)
    assert waived.returncode == 0, waived.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_hidden_layers"] == 3


def test_verified_cut_of_a_real_pattern_matches_the_oracle(tmp_path):
    model = _gemma3()
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src, max_shard_size="60KB")
    ids = random_ids(2, 13)
    expected = identity_logits(model, REMOVED, ids, use_cache=False)
    cut_checkpoint(src, REMOVED, out=out)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids, use_cache=False).logits, expected)
    pruned = copy.deepcopy(model)
    prune_model(pruned, REMOVED)
    with torch.no_grad():
        assert torch.equal(pruned(input_ids=ids, use_cache=False).logits, expected)


@pytest.mark.parametrize("model_type", ["hy_v4", "zaya"])
def test_planted_lost_handed_down_state_is_refused(model_type, tmp_path, monkeypatch):
    """Config surgery that forgets a layer hands state to the next (DSA top-k, ZAYA router state) is caught."""
    from shortgpt_fast.experiments.tiny_configs import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    monkeypatch.delitem(config_surgery._PATTERN_RULES, model_type)
    refusal = r"layer 2 \(new index 1\) computes with prev_\w+ handed down from layer 1, which is removed"
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match=refusal) as err:
        cut_checkpoint(src, REMOVED, out=out)
    assert "\n" not in str(err.value) and not out.exists()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StructureMismatch, match=refusal):
        prune_model(model, REMOVED)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
