"""ShortGPT-gen: prefill through the pruned path, removed blocks still fill their KV cache, decoding runs every block."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import random_ids, tiny_gpt2, tiny_llama, tiny_llama_real_vocab
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from shortgpt_fast.evaluation import EvaluationError
from shortgpt_fast.evaluation.generation import generation_collapse, shortgpt_gen
from shortgpt_fast.surgery.in_memory import prune_model

REMOVED = [2, 3]


@pytest.fixture(scope="module")
def models():
    dense = tiny_llama(num_layers=6)
    return dense, prune_model(copy.deepcopy(dense), REMOVED)


def _kv(cache, layer: int):
    return cache.layers[layer].keys, cache.layers[layer].values


@torch.no_grad()
def test_prefill_is_the_pruned_path_and_removed_blocks_fill_their_cache(models):
    dense, pruned = models
    ids = random_ids(2, 13)
    plain = pruned(input_ids=ids, use_cache=True, output_hidden_states=True)
    with shortgpt_gen(dense, REMOVED) as gen:
        out = gen(input_ids=ids, use_cache=True)
    assert torch.equal(out.logits, plain.logits)  # the prompt sees exactly the pruned model
    cache = out.past_key_values
    for old, new in {0: 0, 1: 1, 4: 2, 5: 3}.items():
        for a, b in zip(_kv(cache, old), _kv(plain.past_key_values, new)):
            assert torch.equal(a, b)
    # A removed block's entry, written out by hand: K = RoPE(k_proj(norm(h))), V = v_proj(norm(h)), where h is the
    # hidden state reaching it on the pruned path (the input of the next kept block, 4).
    h = plain.hidden_states[2]
    positions = torch.arange(ids.shape[1])[None]
    cos, sin = dense.model.rotary_emb(h, positions)
    for layer in REMOVED:
        block = dense.model.layers[layer]
        normed = block.input_layernorm(h)
        shape = (*ids.shape, -1, block.self_attn.head_dim)
        k = block.self_attn.k_proj(normed).view(shape).transpose(1, 2)
        v = block.self_attn.v_proj(normed).view(shape).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        keys, values = _kv(cache, layer)
        torch.testing.assert_close(keys, k, rtol=0, atol=1e-6)
        torch.testing.assert_close(values, v, rtol=0, atol=1e-6)
    assert all(dense.model.layers[i].forward.__func__ is type(dense.model.layers[i]).forward for i in REMOVED)


@torch.no_grad()
def test_decoding_runs_every_block_on_that_cache(models):
    dense, pruned = models
    ids = random_ids(1, 9)
    with shortgpt_gen(dense, REMOVED) as gen:
        prefill = gen(input_ids=ids, use_cache=True)
        cache = prefill.past_key_values
        reference_cache = copy.deepcopy(cache)
        step = prefill.logits[:, -1:].argmax(-1)
        decoded = gen(input_ids=step, cache=cache, use_cache=True).logits
    # The dense model itself on the same cache: a decode step is the full model.
    assert torch.equal(decoded, dense(input_ids=step, cache=reference_cache, use_cache=True).logits)
    plain = pruned(input_ids=ids, use_cache=True)
    plain_step = pruned(input_ids=step, cache=plain.past_key_values, use_cache=True).logits
    assert not torch.allclose(decoded, plain_step)  # ... which plain removal is not


def test_generation_collapse_compares_the_three_modes(tokenizer):
    dense = tiny_llama_real_vocab(tokenizer, num_layers=6)
    result = generation_collapse(dense, tokenizer, REMOVED, prompts=["The capital of France is"], max_new_tokens=6)
    assert result["dense"]["mean"]["agreement"] == 1.0
    removal, gen = result["removal"]["samples"][0], result["shortgpt_gen"]["samples"][0]
    # The first token comes from the prompt's logits, which both modes compute on the pruned path.
    assert removal["token_ids"][0] == gen["token_ids"][0]
    assert len(gen["token_ids"]) == 6 and 0.0 <= gen["agreement"] <= 1.0
    assert len(dense.model.layers) == 6  # the dense model is left whole and unpatched


def test_blocks_without_input_layernorm_and_self_attn_are_refused():
    with pytest.raises(EvaluationError, match="input_layernorm and self_attn"):
        with shortgpt_gen(tiny_gpt2(), [1]):
            pass
    with pytest.raises(EvaluationError, match=r"\[9\] are not in"):
        with shortgpt_gen(tiny_llama(), [9]):
            pass


def test_evaluate_reports_generation_collapse_beside_plain_generation(tokenizer):
    from shortgpt_fast.evaluation.evaluate import evaluate, format_table

    dense = tiny_llama_real_vocab(tokenizer, num_layers=6)
    result = evaluate(dense, tokenizer, ppl=None, generate=True, max_new_tokens=4, shortgpt_gen_layers=REMOVED)
    collapse = result["generation_collapse"]
    assert collapse["dense"]["samples"] == [dict(s, tokens_before_divergence=4, agreement=1.0)
                                            for s in result["generate"]["samples"]]
    assert "shortgpt_gen generation agreement" in format_table({"model": result})
