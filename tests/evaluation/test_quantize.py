"""Quantization (paper Table 5): bitsandbytes NF4 and torchao int4 weight-only on CPU, both orders end to end on a
tiny model, the --quantize / --quantize-order command line, and the errors where a library cannot run."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny_models import tiny_llama, tiny_llama_real_vocab

from shortgpt_fast.cli import main
from shortgpt_fast.evaluation import EvaluationError
from shortgpt_fast.evaluation.quantize import four_bit_modules, model_bytes, quantize
from shortgpt_fast.experiments.quantize_order import format_order_table, quantization_order

LIBRARY = {"nf4": "bitsandbytes", "int4": "torchao"}


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def _require(method):
    pytest.importorskip(LIBRARY[method])


def _tiny(tokenizer, layers=6, seed=0):
    # hidden and intermediate sizes divisible by bitsandbytes' 64-element blocks, as in real models.
    return tiny_llama_real_vocab(tokenizer, num_layers=layers, hidden_size=64, intermediate_size=128, seed=seed)


def test_quantized_linears_are_nf4_and_close_to_float(tokenizer, bnb):
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


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_both_orders_run_end_to_end(tokenizer, method):
    _require(method)
    model = _tiny(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantization_order(model, tokenizer, remove=2, method=method, samples=4, seq_len=32, batch_size=4,
                                ppl_tokens=256, ppl_window=64, log=lambda *_: None)
    assert report["method"] == method and report["library"] == LIBRARY[method]
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


def test_unknown_method_names_the_supported_ones(tokenizer):
    with pytest.raises(EvaluationError, match="nf4.*int4"):
        quantize(_tiny(tokenizer, layers=1), "int3")


# ---- torchao int4 -----------------------------------------------------------------------------------------------
def test_int4_linears_hold_torchao_4bit_tensors(tokenizer):
    pytest.importorskip("torchao")
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    model = _tiny(tokenizer, layers=2)
    q = quantize(model, "int4")
    assert len(four_bit_modules(q)) == 2 * 7  # every projection; the tied head stays float, as with nf4
    for name, layer in q.named_modules():
        if isinstance(layer, torch.nn.Linear) and layer is not q.get_output_embeddings():
            weight = layer.weight
            assert isinstance(weight, Int4OpaqueTensor), name
            assert weight.block_size == [1, 64]
            # Really 4 bits a weight: two weights per packed byte, plus one scale and zero point per 64 weights.
            assert weight.qdata.dtype == torch.uint8 and weight.qdata.numel() * 2 == weight.numel()
            assert weight.scale_and_zero.numel() == 2 * weight.numel() // 64
    assert not isinstance(q.get_output_embeddings().weight, Int4OpaqueTensor)
    float_linear = sum(m.weight.numel() * 4 for n, m in model.named_modules() if n in set(four_bit_modules(q)))
    assert model_bytes(model) - model_bytes(q) > 0.8 * float_linear  # the float32 linears shrank ~6x
    ids = tokenizer("To be, or not to be, that is the question", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, q(ids).logits
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_int4_on_unaligned_layers_names_nf4():
    pytest.importorskip("torchao")
    # hidden size 72 is not a whole number of 64-weight groups; torchao would leave those layers in float.
    with pytest.raises(EvaluationError, match="72 inputs; use --quantize nf4"):
        quantize(tiny_llama(num_layers=1), "int4")


@pytest.mark.parametrize("device, dtype, reason", [
    ("cuda", torch.float32, "computes in bfloat16"),  # the tinygemm layout; refused before any CUDA call
    ("mps", torch.float32, "runs on cpu and cuda, not mps"),
])
def test_int4_where_torchao_cannot_run_names_nf4(tokenizer, device, dtype, reason):
    pytest.importorskip("torchao")
    with pytest.raises(EvaluationError, match=f"{reason}.*--quantize nf4") as err:
        quantize(_tiny(tokenizer, layers=1).to(dtype), "int4", device=device)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method, alternative", [("int4", "nf4"), ("nf4", "int4")])
def test_missing_library_names_the_alternative(tokenizer, monkeypatch, method, alternative):
    monkeypatch.setitem(sys.modules, LIBRARY[method], None)  # what `import` sees when the package is absent
    with pytest.raises(EvaluationError, match=f"needs {LIBRARY[method]}.*--quantize {alternative}"):
        quantize(_tiny(tokenizer, layers=1), method)


# ---- command line -----------------------------------------------------------------------------------------------
@pytest.fixture
def dense_dir(tokenizer, tmp_path):
    _tiny(tokenizer, layers=4).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.fixture
def ppl_text(tmp_path):
    from shortgpt_fast.data.calibration import read_documents

    path = tmp_path / "play.txt"
    path.write_text(read_documents(None)[0][0][:20_000])
    return path


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_eval_quantize_evaluates_the_4bit_model(dense_dir, ppl_text, tmp_path, capsys, method):
    _require(method)
    results = {}
    for quantized in (False, True):
        out = tmp_path / f"eval-{quantized}.json"
        argv = ["eval", str(dense_dir), "--ppl", str(ppl_text), "--ppl-tokens", "96", "--ppl-window", "64", "--quiet",
                "--out", str(out)] + (["--quantize", method] if quantized else [])
        assert main(argv) == 0
        results[quantized] = json.loads(out.read_text())["model"]
    assert "weights (MB)" in capsys.readouterr().out
    assert results[True]["quantization"] == method and "quantization" not in results[False]
    assert results[True]["params"] == results[False]["params"]  # counted in float, not packed storage
    assert results[True]["bytes"] < results[False]["bytes"]
    assert results[True]["perplexity"]["ppl"] != results[False]["perplexity"]["ppl"]


def test_eval_quantize_without_the_library_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)
    rc = main(["eval", "smollm2-135m", "--ppl", "none", "--quantize", "int4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1  # checked before the model is loaded
    assert "torchao" in err and "--quantize nf4" in err


def test_compare_quantize_evaluates_every_row_in_4bit(dense_dir, ppl_text, tmp_path):
    _require("int4")
    argv = ["compare", str(dense_dir), "--ratios", "0,0.5", "--methods", "bi", "--samples", "2", "--seq-len", "16",
            "--ppl", str(ppl_text), "--ppl-tokens", "64", "--ppl-window", "64", "--quiet"]
    assert main(argv + ["--out-dir", str(tmp_path / "float")]) == 0
    assert main(argv + ["--out-dir", str(tmp_path / "int4"), "--quantize", "int4"]) == 0
    plain, quant = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("float", "int4"))
    assert quant["quantization"] == "int4" and plain["quantization"] is None
    for a, b in zip(plain["rows"], quant["rows"]):
        assert a["removed"] == b["removed"]  # score -> prune -> quantize: layers chosen on the float model
        assert b["params"] == a["params"] and b["bytes"] < a["bytes"] and b["ppl"] != a["ppl"]
    assert "int4 weights" in (tmp_path / "int4" / "compare.md").read_text()


def test_compare_quantize_order_writes_both_orders(dense_dir, tmp_path, capsys):
    _require("int4")
    out_dir = tmp_path / "order"
    rc = main(["compare", str(dense_dir), "--quantize-order", "int4", "--ratios", "0.5", "--samples", "4",
               "--seq-len", "32", "--ppl-tokens", "256", "--ppl-window", "64", "--quiet", "--out-dir", str(out_dir)])
    assert rc == 0
    report = json.loads((out_dir / "quantization_order.json").read_text())
    assert report["method"] == "int4" and report["library"] == "torchao" and report["remove"] == 2
    for order in ("quantize_score_prune", "score_prune_quantize"):
        assert report[order]["layers"] == 2 and report[order]["four_bit_modules"] == 2 * 7
    table = (out_dir / "quantization_order.md").read_text()
    assert "quantize -> score -> prune" in table and "same layers removed in both orders" in table
    assert "score -> prune -> quantize" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--ratios", "0.25,0.5"], "one --ratios value"),
    (["--methods", "bi,angular"], "one --methods metric"),
    (["--quantize", "nf4"], "drop --quantize"),
    (["--tasks", "piqa"], "drop --tasks"),
])
def test_compare_quantize_order_bad_input_is_a_one_line_error(capsys, extra, message):
    rc = main(["compare", "smollm2-135m", "--quantize-order", "nf4", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err
