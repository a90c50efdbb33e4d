"""Config surgery and tensor renaming for the families whose layer patterns need more than slicing, judged against the identity-skip oracle.

Each case builds a tiny random model with transformers' own config class, computes the logits of the original model
with the removed blocks turned into the identity, and requires in-memory prune + save/reload and a copy-mode cut +
reload to give exactly those logits with no missing or unexpected keys, or a one-line refusal naming the field.
The older config forms (no `layer_types`, a pattern integer instead) are produced the way they occur on the hub:
a checkpoint saved by transformers, with its config.json rewritten to the older spelling.
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from shortgpt_fast.models.architectures import ArchitectureError, checkpoint_layer_prefix, renamed_tensor
from shortgpt_fast.models.config_surgery import (
    ConfigSurgeryError,
    index_map,
    mtp_layer_count,
    prune_config_dict,
)
from shortgpt_fast.models.identity_oracle import identity_logits
from shortgpt_fast.surgery.checkpoint import SurgeryError, cut_checkpoint
from shortgpt_fast.surgery.in_memory import prune_model

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

IDS = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
             head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(config):
    torch.manual_seed(0)
    # from_config keeps the config object, and pruning edits it; every build gets its own.
    return AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@torch.no_grad()
def _logits(model):
    return model(input_ids=IDS, use_cache=False).logits


def _saved(config, tmp_path, old_form=None):
    """(expected logits for `layers` removed -> fn, checkpoint dir): a saved tiny model, config optionally rewritten."""
    model = _build(config)
    src = tmp_path / "src"
    model.save_pretrained(src)
    if old_form is not None:
        path = src / "config.json"
        cfg = json.loads(path.read_text())
        old_form(cfg)
        path.write_text(json.dumps(cfg))
    return model, src


def check_cut(config, layers, tmp_path, old_form=None):
    model, src = _saved(config, tmp_path, old_form)
    expected = identity_logits(model, layers, IDS, use_cache=False)
    cut_checkpoint(src, layers, out=tmp_path / "cut")
    assert torch.equal(_logits(_load(tmp_path / "cut")), expected)
    return json.loads((tmp_path / "cut" / "config.json").read_text())


def check_in_memory(config, layers, tmp_path):
    model = _build(config)
    expected = identity_logits(model, layers, IDS, use_cache=False)
    prune_model(model, layers)
    assert torch.equal(_logits(model), expected)
    model.save_pretrained(tmp_path / "pruned")
    assert torch.equal(_logits(_load(tmp_path / "pruned")), expected)


def check_both(config, layers, tmp_path, old_form=None):
    check_in_memory(config, layers, tmp_path)
    return check_cut(config, layers, tmp_path, old_form)


def assert_refused(config, layers, tmp_path, match):
    model, src = _saved(config, tmp_path)
    with pytest.raises(SurgeryError, match=match) as cut_err:
        cut_checkpoint(src, layers, out=tmp_path / "cut")
    assert "\n" not in str(cut_err.value)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigSurgeryError, match=match) as mem_err:
        prune_model(model, layers)
    assert "\n" not in str(mem_err.value)
    assert model.state_dict().keys() == before.keys()  # refusal leaves the model whole
    assert not (tmp_path / "cut").exists() or not any((tmp_path / "cut").iterdir())


# ----------------------------------------------------------------------------------------------------------------
# llama4_text: `moe_layers` holds layer indices, even when it lists every layer (Scout).


def llama4(step):
    return AutoConfig.for_model("llama4_text", **SMALL, num_hidden_layers=6, interleave_moe_layer_step=step,
                                num_local_experts=2, intermediate_size_mlp=32, attention_chunk_size=4,
                                no_rope_layer_interval=2)


@pytest.mark.parametrize("step", [2, 1], ids=["interleaved", "scout_all_moe"])
def test_llama4_moe_layers_are_renumbered_not_sliced(step, tmp_path):
    cfg = check_both(llama4(step), [1, 4], tmp_path)
    # Interleaved: MoE at old 1, 3, 5 -> old 3, 5 survive as new 2, 3. Scout: every layer stays MoE.
    assert cfg["moe_layers"] == ([2, 3] if step == 2 else [0, 1, 2, 3])
    assert cfg["no_rope_layers"] == [1, 1, 0, 0]


def test_llama4_derived_fields_are_pinned_for_the_original_count(tmp_path):
    def hub_form(cfg):  # as released: the patterns only, every list derived by Llama4TextConfig
        for key in ("moe_layers", "no_rope_layers", "layer_types"):
            cfg.pop(key)
    cfg = check_cut(llama4(2), [1, 4], tmp_path, old_form=hub_form)
    assert cfg["moe_layers"] == [2, 3] and cfg["no_rope_layers"] == [1, 1, 0, 0]
    assert cfg["layer_types"] == ["chunked_attention"] * 2 + ["full_attention"] * 2


# ----------------------------------------------------------------------------------------------------------------
# jamba: only period/offset exist; keep the kept pattern as a period or refuse.


def jamba():
    return AutoConfig.for_model("jamba", vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                num_key_value_heads=1, num_hidden_layers=6, attn_layer_period=2, attn_layer_offset=1,
                                expert_layer_period=3, expert_layer_offset=2, num_experts=2, use_mamba_kernels=False,
                                mamba_d_state=4, mamba_dt_rank=4, pad_token_id=0)


def test_jamba_period_and_offset_are_rewritten(tmp_path):
    # Experts at old 2, 5: removing 2 and 3 leaves old 5 as new 3, i.e. period 4 offset 3 on 4 layers.
    cfg = check_both(jamba(), [2, 3], tmp_path)
    assert (cfg["attn_layer_period"], cfg["attn_layer_offset"]) == (2, 1)
    assert (cfg["expert_layer_period"], cfg["expert_layer_offset"]) == (4, 3)


def test_jamba_pattern_that_is_no_period_is_refused(tmp_path):
    # Attention at old 1, 3, 5; removing 1 and 4 leaves attention at new 2, 3: no period/offset says that.
    assert_refused(jamba(), [1, 4], tmp_path, match=r"jamba: .*attn_layer_period/attn_layer_offset")


# ----------------------------------------------------------------------------------------------------------------
# zamba2: hybrid layers carry the shared block; removing plain mamba layers renumbers `hybrid_layer_ids`.


def zamba2():
    return AutoConfig.for_model(
        "zamba2", vocab_size=64, hidden_size=16, num_hidden_layers=6, num_attention_heads=2, mamba_d_state=4,
        n_mamba_heads=2, mamba_expand=2, chunk_size=4, adapter_rank=4, use_mamba_kernels=False, pad_token_id=0,
        layers_block_type=["mamba", "mamba", "hybrid", "mamba", "mamba", "hybrid"])


def test_zamba2_hybrid_ids_follow_their_layers(tmp_path):
    cfg = check_cut(zamba2(), [1, 4], tmp_path)
    assert cfg["hybrid_layer_ids"] == [1, 3] and cfg["num_hidden_layers"] == 4


def test_zamba2_in_memory(tmp_path):
    # Zamba2MLP keeps a {global layer index: hybrid slot} dict built at construction; the pruned model takes it
    # from the rebuilt skeleton, as transformers numbers it for the new config.
    check_in_memory(zamba2(), [1, 4], tmp_path)


def test_zamba2_removing_a_hybrid_layer_is_refused(tmp_path):
    assert_refused(zamba2(), [1, 2], tmp_path, match=r"zamba2: layers \[2\] are hybrid layers")


# ----------------------------------------------------------------------------------------------------------------
# Older config forms: an integer pattern instead of `layer_types`. transformers re-derives the pattern for the new
# layer count, which silently changes the kept layers' attention types unless the original types are written out.


def _old_pattern_form(key, value):
    def rewrite(cfg):
        cfg.pop("layer_types")
        cfg[key] = value
    return rewrite


@pytest.mark.parametrize("model_type, key, extra", [
    ("gemma3_text", "sliding_window_pattern", dict(sliding_window=3, query_pre_attn_scalar=8)),
    ("cohere2", "sliding_window_pattern", dict(sliding_window=3)),
])
def test_integer_sliding_window_pattern_becomes_explicit_layer_types(model_type, key, extra, tmp_path):
    types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(6)]
    config = AutoConfig.for_model(model_type, **SMALL, num_hidden_layers=6, layer_types=types, **extra)
    cfg = check_both(config, [1, 4], tmp_path, old_form=_old_pattern_form(key, 3))
    assert cfg["layer_types"] == [types[i] for i in (0, 2, 3, 5)]


def qwen3_next():
    types = ["linear_attention" if (i + 1) % 3 else "full_attention" for i in range(6)]
    return AutoConfig.for_model(
        "qwen3_next", **SMALL, num_hidden_layers=6, layer_types=types, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, linear_num_value_heads=2,
        linear_num_key_heads=1, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=2)


def test_qwen3_next_full_attention_interval_becomes_explicit(tmp_path):
    cfg = check_both(qwen3_next(), [1, 4], tmp_path, old_form=_old_pattern_form("full_attention_interval", 3))
    assert cfg["layer_types"] == ["linear_attention", "full_attention", "linear_attention", "full_attention"]


# ----------------------------------------------------------------------------------------------------------------
# ernie4_5_moe: MoE layers by start/end/interval.


def ernie():
    return AutoConfig.for_model("ernie4_5_moe", **SMALL, num_hidden_layers=6, moe_num_experts=2, moe_k=1,
                                moe_intermediate_size=16, moe_layer_start_index=1, moe_layer_interval=2)


def test_ernie_moe_range_is_rewritten(tmp_path):
    # MoE at old 1, 3, 5; removing 1 and 4 leaves old 3, 5 as new 2, 3.
    cfg = check_both(ernie(), [1, 4], tmp_path)
    assert (cfg["moe_layer_start_index"], cfg["moe_layer_end_index"], cfg["moe_layer_interval"]) == (2, 3, 1)


def test_ernie_moe_range_that_cannot_be_expressed_is_refused(tmp_path):
    # Removing 2 leaves MoE at new 1, 2, 4: no start/end/interval says that.
    assert_refused(ernie(), [2], tmp_path, match="ernie4_5_moe: .*moe_layer_start_index")


# ----------------------------------------------------------------------------------------------------------------
# kimi_linear as released: 1-based index lists nested in `linear_attn_config`.


def test_kimi_linear_nested_one_based_lists_are_renumbered(tmp_path):
    types = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention",
             "linear_attention"]
    config = AutoConfig.for_model(
        "kimi_linear", vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, num_local_experts=2, num_experts_per_tok=1, linear_head_dim=8,
        linear_num_heads=2, layer_types=types, pad_token_id=0, bos_token_id=1, eos_token_id=2)

    def released(cfg):
        cfg.pop("layer_types")
        cfg["linear_attn_config"] = {"full_attn_layers": [2, 5], "kda_layers": [1, 3, 4, 6], "head_dim": 8,
                                     "num_heads": 2, "short_conv_kernel_size": 4}
    cfg = check_cut(config, [1, 4], tmp_path, old_form=released)
    assert cfg["linear_attn_config"]["kda_layers"] == [1, 2, 3, 4]
    assert cfg["linear_attn_config"]["full_attn_layers"] == []


# ----------------------------------------------------------------------------------------------------------------
# falcon_h1 with 5 layers: `ssm_multipliers` has 5 entries and is not per-layer.


# ----------------------------------------------------------------------------------------------------------------
# kolibri1_1: `kv_source_layers` has one entry per layer whose value is a layer index (the layer whose K/V it reads).


def kolibri_shared_kv():
    from shortgpt_fast.experiments.support_matrix import rows

    return rows()["kolibri1_1 (shared K/V)"].make_config()


def test_kolibri_kv_sources_are_sliced_then_renumbered(tmp_path):
    # Old layers 1 and 3 read layer 0; removing 1 and 4 keeps 0, 2, 3, 5 and layer 3 (new 2) still reads layer 0.
    cfg = check_both(kolibri_shared_kv(), [1, 4], tmp_path)
    assert cfg["kv_source_layers"] == [0, 1, 0, 3]
    assert cfg["index_layers"] == [0, 2]


def test_kolibri_reader_of_a_removed_kv_source_is_refused(tmp_path):
    assert_refused(kolibri_shared_kv(), [0], tmp_path, match=r"kv_source_layers.*kept layers \[1, 3\] read the K/V of removed layers \[0\]")


def test_falcon_h1_multipliers_are_not_per_layer(tmp_path):
    config = AutoConfig.for_model(
        "falcon_h1", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, mamba_d_state=4, mamba_n_heads=2, mamba_d_head=8, mamba_n_groups=1,
        mamba_chunk_size=4, mamba_d_ssm=16, ssm_multipliers=[1.0, 0.5, 2.0, 0.25, 4.0], pad_token_id=0)
    cfg = check_both(config, [1, 3], tmp_path)
    assert cfg["ssm_multipliers"] == [1.0, 0.5, 2.0, 0.25, 4.0]


def test_unknown_list_with_one_entry_per_layer_is_refused_by_name():
    cfg = {"model_type": "homegrown", "num_hidden_layers": 4, "widths": [1, 2, 3, 4], "eos_token_id": [1, 2, 3, 4]}
    with pytest.raises(ConfigSurgeryError, match=r"'widths' has one entry per layer .* PER_LAYER_LIST_KEYS"):
        prune_config_dict(cfg, [0])


# ----------------------------------------------------------------------------------------------------------------
# Pure-dict properties


def test_input_is_never_mutated():
    cfg = {"model_type": "kimi_linear", "num_hidden_layers": 6, "first_k_dense_replace": 1,
           "linear_attn_config": {"full_attn_layers": [2, 5], "kda_layers": [1, 3, 4, 6]},
           "quantization_config": {"modules_to_not_convert": ["model.layers.4.mlp.gate", "lm_head"]}}
    snapshot = json.dumps(cfg, sort_keys=True)
    prune_config_dict(cfg, [1, 4])
    assert json.dumps(cfg, sort_keys=True) == snapshot


def test_absent_leading_count_means_the_class_default():
    out = prune_config_dict({"model_type": "deepseek_v3", "num_hidden_layers": 6}, [1])
    assert out["first_k_dense_replace"] == 2
    out = prune_config_dict({"model_type": "deepseek_v3", "num_hidden_layers": 6, "first_k_dense_replace": 0}, [1])
    assert out["first_k_dense_replace"] == 0


def test_mtp_layers_follow_the_decoder_stack():
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 6, "num_nextn_predict_layers": 1}
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(7)] + ["model.embed_tokens.weight",
                                                                           "model.layers.6.eh_proj.weight"]
    with pytest.raises(ArchitectureError, match="MTP|num_nextn_predict_layers"):
        checkpoint_layer_prefix(names, 6, "deepseek_v3")  # undeclared trailing layer: refuse, don't guess
    k = mtp_layer_count(cfg)
    assert k == 1 and checkpoint_layer_prefix(names, 6, "deepseek_v3", extra_layers=k) == "model.layers"
    mapping = index_map([1, 4], 6, extra_layers=k)
    assert renamed_tensor("model.layers.6.eh_proj.weight", "model.layers", mapping) == "model.layers.4.eh_proj.weight"
    assert renamed_tensor("model.layers.5.mlp.down_proj.weight", "model.layers", mapping) == \
        "model.layers.3.mlp.down_proj.weight"
    assert renamed_tensor("model.layers.4.mlp.down_proj.weight", "model.layers", mapping) is None
    # A checkpoint saved by transformers drops the MTP layer; that layout stays valid.
    assert checkpoint_layer_prefix(names[:6], 6, "deepseek_v3", extra_layers=k) == "model.layers"


def test_quantization_module_names_are_renumbered_in_nested_configs():
    cfg = {
        "model_type": "llava",
        "text_config": {"model_type": "llama", "num_hidden_layers": 6, "num_nextn_predict_layers": 1},
        "vision_config": {"num_hidden_layers": 6},
        "quantization_config": {
            "quant_method": "fp8",
            "modules_to_not_convert": ["model.language_model.layers.1.mlp.gate", "model.language_model.layers.5.mlp",
                                       "model.vision_tower.encoder.layers.4.mlp", "lm_head",
                                       "model.language_model.layers.6.eh_proj"],
            "ignore": ["re:.*lm_head", "model.language_model.layers.3.self_attn.q_proj"],
            "dynamic": {r"-:model\.language_model\.layers\.4\..*": {}, r"+:model\.language_model\.layers\.2\..*":
                        {"bits": 8}, r"+:.*\.mlp\..*": {"bits": 4}},
        },
    }
    out = prune_config_dict(cfg, [1, 4])
    q = out["quantization_config"]
    assert q["modules_to_not_convert"] == ["model.language_model.layers.3.mlp", "model.vision_tower.encoder.layers.4.mlp",
                                           "lm_head", "model.language_model.layers.4.eh_proj"]
    assert q["ignore"] == ["re:.*lm_head", "model.language_model.layers.2.self_attn.q_proj"]
    assert q["dynamic"] == {r"+:model\.language_model\.layers\.1\..*": {"bits": 8}, r"+:.*\.mlp\..*": {"bits": 4}}
    assert out["vision_config"] == {"num_hidden_layers": 6} and out["text_config"]["num_hidden_layers"] == 4


def test_quantization_pattern_that_selects_layers_without_a_number_is_refused():
    cfg = {"num_hidden_layers": 6, "quantization_config": {"dynamic": {r"+:.*\.(?:1[0-5]|[4-5])\..*": {"bits": 8}}}}
    with pytest.raises(ConfigSurgeryError, match="quantization_config.dynamic .* cannot be renumbered"):
        prune_config_dict(cfg, [1])


# ----------------------------------------------------------------------------------------------------------------
# Synthetic FP8 checkpoint (DeepSeek-V3 layout): float8 weights with `weight_scale_inv` companions, MTP layer at N.


def _write_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _fp8_checkpoint(tmp_path: Path, mtp: bool) -> Path:
    src = tmp_path / ("fp8_mtp" if mtp else "fp8")
    src.mkdir()
    n = 6
    tensors = {"model.embed_tokens.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(8, 4)}
    for i in range(n + (1 if mtp else 0)):
        weight = torch.full((4, 4), float(i)).to(torch.float8_e4m3fn)
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = weight
        tensors[f"model.layers.{i}.mlp.down_proj.weight_scale_inv"] = torch.full((1, 1), float(i))
        tensors[f"model.layers.{i}.mlp.gate.weight"] = torch.full((2, 4), float(i))
    _write_safetensors(src / "model.safetensors", tensors)
    cfg = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": n,
           "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                                   "modules_to_not_convert": [f"model.layers.{i}.mlp.gate" for i in range(n)]}}
    if mtp:
        cfg["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def _read(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("mtp", [False, True], ids=["fp8", "fp8_mtp"])
def test_fp8_checkpoint_cut_carries_scales_and_renumbers_config(mtp, tmp_path):
    src = _fp8_checkpoint(tmp_path, mtp)
    cut_checkpoint(src, [1, 4], out=tmp_path / "cut")
    out = _read(tmp_path / "cut" / "model.safetensors")
    for new, old in enumerate([0, 2, 3, 5] + ([6] if mtp else [])):
        assert out[f"model.layers.{new}.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
        assert out[f"model.layers.{new}.mlp.down_proj.weight"].float().eq(old).all()
        assert out[f"model.layers.{new}.mlp.down_proj.weight_scale_inv"].eq(old).all()
    assert not any(name.startswith(f"model.layers.{4 + (1 if mtp else 0)}.") for name in out)
    cfg = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == [f"model.layers.{i}.mlp.gate" for i in range(4)]
    assert cfg["num_hidden_layers"] == 4
    # config.json omits first_k_dense_replace, so DeepSeek-V3's class default (3 dense layers: old 0, 1, 2) applies;
    # of those, old 0 and 2 remain, and the new config must say 2 rather than fall back to 3 again.
    assert cfg["first_k_dense_replace"] == 2


# ----------------------------------------------------------------------------------------------------------------
# hy_v4 / glm_moe_dsa / zaya: state handed from one layer to the next through the layer loop (`prev_topk_indices`,
# `prev_router_hidden_states`), which no module tree or per-layer config value shows. The oracle's removed block
# still hands its own state on, so a kept layer whose source is removed cannot be reproduced: refused.


def _tiny_type(model_type, **overrides):
    from shortgpt_fast.experiments.tiny_configs import tiny_config

    return tiny_config(model_type, overrides)


def test_hy_v4_shared_indexer_layer_whose_full_layer_is_removed_is_refused(tmp_path):
    # 6 layers: full, full, shared, shared, shared, full; layers 2-4 reuse layer 1's top-k.
    assert _tiny_type("hy_v4").indexer_types == ["full", "full", "shared", "shared", "shared", "full"]
    assert_refused(_tiny_type("hy_v4"), [1, 4], tmp_path, match=r"'indexer_types': layer 2 is 'shared'.* layer 1")


def test_hy_v4_shared_layers_and_a_full_layer_with_all_its_shared_layers_prune_exactly(tmp_path):
    assert check_both(_tiny_type("hy_v4"), [2, 4], tmp_path)["indexer_types"] == ["full", "full", "shared", "full"]
    assert check_cut(_tiny_type("hy_v4"), [1, 2, 3, 4], tmp_path / "all")["indexer_types"] == ["full", "full"]


def test_hy_v4_derived_indexer_types_are_pinned_for_the_original_count(tmp_path):
    def hub_form(cfg):
        cfg.pop("indexer_types")
    # Re-derived for 4 layers the modes would be full, full, shared, shared: old layer 5 would lose its indexer.
    cfg = check_cut(_tiny_type("hy_v4"), [3, 4], tmp_path, old_form=hub_form)
    assert cfg["indexer_types"] == ["full", "full", "shared", "full"]


def test_glm_moe_dsa_index_topk_pattern_is_pinned_and_lost_sources_refused(tmp_path):
    types = ["full", "full", "shared", "shared", "full", "shared"]

    def hub_form(cfg):
        cfg.pop("indexer_types")
        cfg["index_topk_pattern"] = "FFSSFS"
    cfg = check_cut(_tiny_type("glm_moe_dsa", indexer_types=types), [3, 5], tmp_path, old_form=hub_form)
    assert cfg["indexer_types"] == ["full", "full", "shared", "full"] and "index_topk_pattern" not in cfg
    assert_refused(_tiny_type("glm_moe_dsa", indexer_types=types), [1, 4], tmp_path / "refused",
                   match=r"'indexer_types': layer 2 is 'shared'.* layer 1")


def test_zaya_router_state_chain_allows_only_trailing_layers(tmp_path):
    assert_refused(_tiny_type("zaya"), [1, 4], tmp_path, match=r"zaya: layer 2 .*prev_router_hidden_states")
    check_both(_tiny_type("zaya"), [4, 5], tmp_path / "trailing")
