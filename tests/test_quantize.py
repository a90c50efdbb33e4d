"""Quantization order (paper Table 5): bitsandbytes NF4 on CPU, both orders end to end on a tiny model."""
from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from shortgpt_fast.evaluation.perplexity import EvaluationError  # noqa: E402
from shortgpt_fast.evaluation.quantize import (format_order_table, four_bit_modules, quantization_order,  # noqa: E402
                                               quantize)
from tests.tiny_models import tiny_llama_real_vocab  # noqa: E402


def _tiny(tokenizer, layers=6, seed=0):
    # hidden and intermediate sizes divisible by bitsandbytes' 64-element blocks, as in real models.
    return tiny_llama_real_vocab(tokenizer, num_layers=layers, hidden_size=64, intermediate_size=128, seed=seed)


def test_quantized_linears_are_nf4_and_close_to_float(tokenizer):
    model = _tiny(tokenizer, layers=2)
    q = quantize(model, "nf4")
    names = four_bit_modules(q)
    # 7 projections per block; the tied output head stays in float, as transformers does for every model.
    assert len(names) == 2 * 7
    layer = q.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.dtype == torch.uint8
    assert q.get_memory_footprint() < model.get_memory_footprint()
    ids = tokenizer("To be, or not to be, that is the question", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, q(ids).logits
    assert not torch.equal(a, b)  # it really is a different (quantized) computation ...
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9  # ... of the same model


def test_both_orders_run_end_to_end(tokenizer):
    model = _tiny(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantization_order(model, tokenizer, remove=2, samples=4, seq_len=32, batch_size=4, ppl_tokens=256,
                                ppl_window=64, log=lambda *_: None)
    for order in ("quantize_score_prune", "score_prune_quantize"):
        r = report[order]
        assert r["layers"] == 4 and len(r["removed"]) == 2
        assert r["four_bit_modules"] == 4 * 7
        assert r["bytes"] < report["pruned_float"]["bytes"] < report["dense"]["bytes"]
        assert r["perplexity"] > 1
    assert report["score_prune_quantize"]["removed"] == report["pruned_float"]["removed"]
    assert report["same_layers"] == (sorted(report["quantize_score_prune"]["removed"])
                                     == sorted(report["pruned_float"]["removed"]))
    assert len(report["bi_float"]) == len(report["bi_quantized"]) == 6
    assert report["bi_float"] != report["bi_quantized"]  # BI really was measured on the 4-bit model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model is untouched
    table = format_order_table(report)
    assert "quantize -> score -> prune" in table and "score -> prune -> quantize" in table


def test_unknown_method_names_the_supported_one(tokenizer):
    with pytest.raises(EvaluationError, match="nf4"):
        quantize(_tiny(tokenizer, layers=1), "int3")
