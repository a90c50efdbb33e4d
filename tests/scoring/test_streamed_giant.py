"""Giant-model streaming: MoE blocks larger than the memory budget run expert group by expert group and match
in-memory scoring; MTP layers past num_hidden_layers are ignored."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from tiny_models import VOCAB, random_ids
from transformers import AutoModelForCausalLM, DeepseekV3Config, GptOssConfig, MixtralConfig, Qwen3MoeConfig

from shortgpt_fast.data.calibration import from_tensors
from shortgpt_fast.ops.bi_reduce import Stat
from shortgpt_fast.scoring.block_influence import collect_layer_stats
from shortgpt_fast.scoring.streamed import EXPERT_WORK_SHARE, StreamingError, collect_layer_stats_streamed


def _mixtral():
    return MixtralConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=44, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         num_local_experts=7, num_experts_per_tok=2, tie_word_embeddings=False, pad_token_id=0)


def _qwen3_moe():
    # Layers 1 and 3 MoE, 0 and 2 dense: dense blocks load whole, MoE blocks in parts, in one pass.
    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=40, moe_intermediate_size=36,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                          max_position_embeddings=128, num_experts=9, num_experts_per_tok=3, decoder_sparse_step=2,
                          norm_topk_prob=True, tie_word_embeddings=False, pad_token_id=0)


def _deepseek_v3():
    return DeepseekV3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, moe_intermediate_size=40,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                            n_routed_experts=10, num_experts_per_tok=3, n_group=2, topk_group=2,
                            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                            qk_nope_head_dim=8, v_head_dim=12, head_dim=8, max_position_embeddings=128,
                            tie_word_embeddings=False, pad_token_id=0)


def _gpt_oss():
    return GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=36, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=9,
                        num_experts_per_tok=2, sliding_window=6, max_position_embeddings=128,
                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
                        pad_token_id=0)


CONFIGS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():  # spread the router logits so top-k picks differ from token to token
        for pname, p in model.named_parameters():
            if "router" in pname or pname.endswith("gate.weight"):
                p.normal_(0, 1.0)
    return model


def calibration():
    ids = random_ids(5, 13, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[4, 10:] = 0
    return from_tensors(ids, mask)


def part_sizes(model):
    """(largest MoE block, largest dense block, largest MoE block less its experts, one expert) in bytes."""
    layers = model.model.layers
    moe, dense, rest, expert = 0, 0, 0, 0
    for block in layers:
        total = sum(p.numel() * p.element_size() for p in block.parameters())
        experts = [m for n, m in block.named_modules() if n.endswith("experts") and hasattr(m, "num_experts")]
        if not experts:
            dense = max(dense, total)
            continue
        e = sum(p.numel() * p.element_size() for p in experts[0].parameters())
        moe, rest, expert = max(moe, total), max(rest, total - e), max(expert, e // experts[0].num_experts)
    return moe, dense, rest, expert


def outside_bytes(model) -> int:
    """The weights a streamed pass holds throughout: everything outside the blocks but the output head."""
    head = {id(p) for p in model.get_output_embeddings().parameters()}
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if ".layers." not in n and id(p) not in head)


def group_budget(model, experts: int, loading: int = 1) -> int:
    """A memory budget under which each MoE block runs in groups of about `experts` experts (one group computing, the
    next loading at `loading` x its size, plus the working share of the budget) and dense blocks load whole."""
    _moe, dense, rest, expert = part_sizes(model)
    held = outside_bytes(model)
    weights = held + rest + experts * (1 + loading) * expert
    return max(-(-weights * EXPERT_WORK_SHARE // (EXPERT_WORK_SHARE - 1)), held + 2 * dense)


def bi(stats) -> torch.Tensor:
    sums = stats.per_sequence.sum(dim=1)
    return sums[:, Stat.SUM_ONE_MINUS_COS] / sums[:, Stat.TOKENS]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_moe_block_larger_than_the_budget_streams_in_expert_groups(family, tmp_path):
    model = build(family)
    moe, dense, rest, expert = part_sizes(model)
    # The budget holds a dense block computing and the next loading, and a MoE block less its experts with a group
    # of two experts computing and the next two loading (per-expert stacks fill in place, so loading takes a part's
    # own size), so every MoE block runs in groups of two or so while the whole budget is below one MoE block.
    budget = group_budget(model, 2)
    assert budget < moe, "the premise: one MoE block does not fit the budget"
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    calib = calibration()
    expected = collect_layer_stats(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), calib, batch_size=2,
                                   angular_span=2, progress=False)
    got = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=2, angular_span=2, progress=False,
                                       memory_budget=budget)
    assert got.streaming["blocks_in_parts"], "no block ran in parts"
    assert got.streaming["expert_groups"] >= 2 * len(got.streaming["blocks_in_parts"])
    assert torch.equal(got.per_sequence[:, :, Stat.TOKENS], expected.per_sequence[:, :, Stat.TOKENS])
    # Group sums are added in another order than transformers' single pass over the experts: rounding, no more.
    torch.testing.assert_close(bi(got), bi(expected), rtol=1e-5, atol=0)
    torch.testing.assert_close(got.per_sequence, expected.per_sequence, rtol=1e-5, atol=1e-9)
    for n, values in expected.span_angular.items():
        torch.testing.assert_close(got.span_angular[n], values, rtol=1e-5, atol=1e-9)


def test_whole_blocks_when_the_budget_holds_two(tmp_path):
    model = build("mixtral")
    model.save_pretrained(tmp_path)
    moe, _dense, _rest, _expert = part_sizes(model)
    calib = calibration()
    whole = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=2, angular_span=2, progress=False,
                                         memory_budget=3 * moe)
    assert whole.streaming["blocks_in_parts"] == [] and whole.streaming["expert_groups"] == 0
    expected = collect_layer_stats(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), calib, batch_size=2,
                                   angular_span=2, progress=False)
    assert torch.equal(whole.per_sequence, expected.per_sequence)


def test_a_budget_too_small_for_one_expert_says_how_much_is_needed(tmp_path):
    model = build("deepseek_v3")
    model.save_pretrained(tmp_path)
    _moe, dense, _rest, _expert = part_sizes(model)
    held = outside_bytes(model)
    with pytest.raises(StreamingError, match=r"the weights outside the blocks \(embeddings, final norm\) take .* raise "
                                             r"--memory-budget above"):
        collect_layer_stats_streamed(str(tmp_path), calibration(), progress=False, memory_budget=held)
    with pytest.raises(StreamingError, match=r"block 0 needs .* MB and has no routed experts.*raise --memory-budget"):
        collect_layer_stats_streamed(str(tmp_path), calibration(), progress=False, memory_budget=held + dense)
    mixtral = build("mixtral")  # MoE in every layer
    mixtral.save_pretrained(tmp_path / "mixtral")
    _moe, _dense, rest, expert = part_sizes(mixtral)
    # The block less its experts fits, one expert computing and one loading (twice its size) do not.
    enough = group_budget(mixtral, 1)
    with pytest.raises(StreamingError, match=r"block 0 less its experts, with the weights outside the blocks .* plus "
                                             r"one expert computing and one loading .*raise --memory-budget to at "
                                             r"least"):
        collect_layer_stats_streamed(str(tmp_path / "mixtral"), calibration(), progress=False,
                                     memory_budget=enough - expert)
    collect_layer_stats_streamed(str(tmp_path / "mixtral"), calibration(), progress=False, memory_budget=enough)


def test_deepseek_mtp_layer_is_not_scored_and_does_not_break_streaming(tmp_path):
    model = build("deepseek_v3")
    model.save_pretrained(tmp_path)
    # DeepSeek-V3 checkpoints carry the multi-token-prediction layer as layer num_hidden_layers, with extra tensors
    # (enorm, hnorm, eh_proj, shared_head) transformers does not load.
    from safetensors.torch import load_file, save_file

    n = model.config.num_hidden_layers
    state = load_file(tmp_path / "model.safetensors")
    mtp = {k.replace(f"layers.{n - 1}.", f"layers.{n}."): v.clone() for k, v in state.items()
           if k.startswith(f"model.layers.{n - 1}.")}
    mtp.update({f"model.layers.{n}.enorm.weight": torch.ones(48), f"model.layers.{n}.hnorm.weight": torch.ones(48),
                f"model.layers.{n}.eh_proj.weight": torch.zeros(48, 96)})
    save_file({**state, **mtp}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    calib = calibration()
    expected = collect_layer_stats(model, calib, batch_size=2, angular_span=2, progress=False)
    got = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=2, angular_span=2, progress=False)
    assert got.per_sequence.shape[0] == n
    assert torch.equal(got.per_sequence, expected.per_sequence)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_expert_groups_filled_in_place_equal_transformers_fusion(family, tmp_path):
    """Per-expert checkpoint tensors are stacked into the fused experts tensors one expert at a time, not through
    transformers' converter; the oracle is the model from_pretrained builds from the same files."""
    from shortgpt_fast.io import safetensors as st
    from shortgpt_fast.scoring.weights import SafetensorsSource, StreamedWeights, experts_modules, skeleton

    build(family).save_pretrained(tmp_path, max_shard_size="40KB")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = skeleton(str(tmp_path), torch.float32)
    blocks = model.model.layers
    weights = StreamedWeights(model, SafetensorsSource(str(tmp_path)), "model.layers", blocks, ())
    assert st.read_weight_map(tmp_path) is not None
    checked = 0
    for layer, block in enumerate(blocks):
        for name, module in experts_modules(block):
            keys = weights.expert_keys(layer, name)
            assert all(weights.plan.stacked_sources(k) is not None for k in keys), "the in-place path is not taken"
            for start, stop in ((0, 2), (2, module.num_experts)):
                group = weights.expert_group(layer, name, start, stop, "cpu")
                for key in keys:
                    assert torch.equal(group[key], loaded.get_parameter(key)[start:stop]), key
                    checked += 1
    assert checked


@pytest.mark.parametrize("expert, message", [(3, "{name} is torch.float32"),
                                             (0, "{name}.* per expert, the model expects")])
def test_an_expert_tensor_of_the_wrong_shape_is_refused(expert, message, tmp_path):
    from safetensors.torch import load_file, save_file

    build("mixtral").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    name = next(k for k in state if f".experts.{expert}." in k)
    state[name] = state[name][:-1].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StreamingError, match=rf"cannot build .* \({message.format(name=name)} .*re-download"):
        collect_layer_stats_streamed(str(tmp_path), calibration(), progress=False,
                                     memory_budget=group_budget(build("mixtral"), 2))


def test_routes_in_chunks_of_one_row_give_the_same_scores(tmp_path, monkeypatch):
    """The working share of the budget bounds how many routes one experts call takes; at one route per call every
    token's outputs are still added in slot order, so only the GEMMs' rounding may differ."""
    import shortgpt_fast.scoring.streamed as streamed

    model = build("qwen3_moe")
    model.save_pretrained(tmp_path)
    calib = calibration()
    budget = group_budget(model, 3)
    whole = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=5, angular_span=2, progress=False,
                                         memory_budget=budget)
    calls = []
    original = type(model.model.layers[1].mlp.experts).forward

    @functools.wraps(original)  # the routing arguments are read through its signature
    def counting(self, hidden, *args, **kwargs):
        calls.append(hidden.shape[0])
        return original(self, hidden, *args, **kwargs)

    monkeypatch.setattr(type(model.model.layers[1].mlp.experts), "forward", counting)
    monkeypatch.setattr(streamed, "EXPERT_ROW_FACTOR", 10**12)  # any budget's working share holds one route
    single = collect_layer_stats_streamed(str(tmp_path), calib, batch_size=5, angular_span=2, progress=False,
                                          memory_budget=budget)
    assert calls and set(calls) == {1}
    torch.testing.assert_close(single.per_sequence, whole.per_sequence, rtol=1e-5, atol=1e-9)
