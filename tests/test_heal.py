"""`shortgpt-fast heal`: LoRA through peft lowers the loss, and merge, save and reload give the same model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("peft")

from shortgpt_fast.cli import main  # noqa: E402
from shortgpt_fast.evaluation.heal import heal, save_healed  # noqa: E402
from shortgpt_fast.evaluation.perplexity import EvaluationError  # noqa: E402
from tests.tiny_models import tiny_llama_real_vocab  # noqa: E402

# A short passage repeated: a few dozen LoRA steps can learn it, so the loss must fall if training works at all.
PASSAGE = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the early morning "
           "light, and the river runs quietly past the old mill toward the sea. ")


def _tiny(tokenizer, seed=0):
    # The default 0.02 init gives near-uniform logits that frozen embeddings cannot sharpen, so no adapter could
    # lower the loss much; a wider init leaves LoRA something to learn.
    return tiny_llama_real_vocab(tokenizer, num_layers=2, hidden_size=32, intermediate_size=64, seed=seed,
                                 initializer_range=0.2)


@pytest.fixture
def repeated_text(tmp_path):
    path = tmp_path / "repeated.txt"
    path.write_text(PASSAGE * 60)
    return path


def test_lora_lowers_loss_and_merges_in_place(tokenizer, repeated_text):
    model = _tiny(tokenizer)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = heal(model, tokenizer, str(repeated_text), steps=40, rank=8, lr=1e-2, seq_len=32, batch_size=4,
                  ppl_window=32, log=lambda *_: None)
    losses = report["losses"]
    assert len(losses) == 40
    # Mean of the last steps against the first: single steps are noisy.
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert report["after"]["perplexity"]["ppl"] < report["before"]["perplexity"]["ppl"]
    assert 0 < report["trainable_fraction"] < 0.5
    # Merged: the same module tree as before, no LoRA layers left, and the linear weights really changed.
    assert not any("lora" in name for name, _ in model.named_modules())
    assert set(model.state_dict()) == set(original)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert not any("embed_tokens" in k for k in changed)  # "all-linear" leaves embeddings and the tied head alone


def test_merged_checkpoint_reloads_with_plain_transformers(tokenizer, repeated_text, tmp_path):
    model = _tiny(tokenizer, seed=1)
    report = heal(model, tokenizer, str(repeated_text), steps=5, rank=4, lr=1e-2, seq_len=32, batch_size=2,
                  ppl_window=32, log=lambda *_: None)
    out = save_healed(model, tokenizer, tmp_path / "healed", report)
    assert not list(tmp_path.glob(".healed.staging-*"))
    assert not (out / "adapter_config.json").exists()
    keys = set(load_file(out / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    reloaded, info = reloaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in name.lower() for name, _ in reloaded.named_modules())
    ids = tokenizer(PASSAGE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out)(PASSAGE)["input_ids"] == tokenizer(PASSAGE)["input_ids"]
    assert json.loads((out / "heal.json").read_text())["steps"] == 5


def test_heal_cli_writes_checkpoint_and_report(tokenizer, repeated_text, tmp_path, capsys):
    _tiny(tokenizer, seed=2).save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    rc = main(["heal", str(tmp_path / "pruned"), str(tmp_path / "healed"), "--data", str(repeated_text),
               "--steps", "3", "--rank", "2", "--seq-len", "32", "--batch-size", "2", "--ppl-window", "32"])
    assert rc == 0
    assert "held-out perplexity" in capsys.readouterr().out
    report = json.loads((tmp_path / "healed" / "heal.json").read_text())
    assert len(report["losses"]) == 3 and report["rank"] == 2
    # A second run must not overwrite the first.
    assert main(["heal", str(tmp_path / "pruned"), str(tmp_path / "healed"), "--data", str(repeated_text),
                 "--steps", "1"]) != 0


def test_too_short_text_is_a_clear_error(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only " * 3)
    with pytest.raises(EvaluationError, match="lower --seq-len"):
        heal(_tiny(tokenizer), tokenizer, str(short), steps=1, seq_len=256, log=lambda *_: None)
