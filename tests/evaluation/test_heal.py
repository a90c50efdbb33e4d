"""`shortgpt-fast heal`: LoRA through peft lowers the loss, and merge, save and reload give the same model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("peft")

from tiny_models import tiny_llama_real_vocab  # noqa: E402

from shortgpt_fast.cli import main  # noqa: E402
from shortgpt_fast.evaluation import EvaluationError  # noqa: E402
from shortgpt_fast.evaluation.heal import heal, remove_checkpoints, save_healed  # noqa: E402

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
    assert not [p.name for p in tmp_path.iterdir() if "staging" in p.name]  # renamed into place, nothing left
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


# ---- checkpoints and resume -------------------------------------------------------------------------------------
# Runs the CLI in a fresh process that can die the hard way (SIGKILL: no cleanup, no finally blocks) at a chosen
# point: right after the checkpoint of step KILL_AFTER_STEP is complete, or after the trainer state of step
# KILL_MID_WRITE_STEP is written but before its checkpoint folder is renamed into place.
_RUNNER = """
import os, signal, sys
import torch
from shortgpt_fast.evaluation import heal

after, mid = int(os.environ.get("KILL_AFTER_STEP", 0)), int(os.environ.get("KILL_MID_WRITE_STEP", 0))
real_checkpoint, real_save = heal._save_checkpoint, torch.save

def checkpoint_then_die(checkpoint_dir, step, *args):
    path = real_checkpoint(checkpoint_dir, step, *args)
    if step == after:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if isinstance(obj, dict) and obj.get("step") == mid:
        os.kill(os.getpid(), signal.SIGKILL)

heal._save_checkpoint, torch.save = checkpoint_then_die, save_then_die
from shortgpt_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _heal_process(args, **kill):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               **{k.upper(): str(v) for k, v in kill.items()})
    return subprocess.run([sys.executable, "-c", _RUNNER, "heal", *map(str, args)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_to_the_same_merged_weights(tokenizer, repeated_text, tmp_path):
    _tiny(tokenizer, seed=3).save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    # Dropout on, so the resumed run is only identical if the global RNG state is restored as well.
    common = [tmp_path / "pruned", "--data", repeated_text, "--steps", "6", "--rank", "2", "--lr", "1e-2",
              "--seq-len", "32", "--batch-size", "2", "--ppl-window", "32", "--dropout", "0.1"]
    base = _heal_process([common[0], tmp_path / "base", *common[1:]])
    assert base.returncode == 0, base.stderr

    out, checkpoints = tmp_path / "healed", tmp_path / "healed.checkpoints"
    resumable = [common[0], out, *common[1:], "--save-every", "2"]
    killed = _heal_process(resumable, kill_after_step=2)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and [p.name for p in checkpoints.iterdir()] == ["step-00000002"]
    # Without --resume the checkpoint is neither overwritten nor silently reused.
    refused = _heal_process(resumable)
    assert refused.returncode == 2 and "--resume" in refused.stderr and refused.stderr.count("\n") == 1

    # Killed again while writing step 4's checkpoint: the half-written folder must not be taken for a checkpoint.
    killed = _heal_process([*resumable, "--resume"], kill_mid_write_step=4)
    assert killed.returncode == -9, killed.stderr
    assert "resuming from" in killed.stdout and "at step 2/6" in killed.stdout
    assert sorted(p.name for p in checkpoints.iterdir())[-1] == "step-00000002"
    assert any(p.name.startswith(".partial-step-00000004") for p in checkpoints.iterdir())

    resumed = _heal_process([*resumable, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 2/6" in resumed.stdout
    assert not checkpoints.exists()  # removed once the merged model is safely written

    # Bit-identical, not merely close: on CPU the same operations on the same values give the same bits, so any
    # difference would mean some state (adapter, AdamW moments, schedule, RNG, data position) was not restored.
    expected, got = load_file(tmp_path / "base" / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(expected) == set(got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    base_report, report = (json.loads((d / "heal.json").read_text()) for d in (tmp_path / "base", out))
    assert report["losses"] == base_report["losses"] and len(report["losses"]) == 6
    assert report["after"] == base_report["after"] and report["before"] == base_report["before"]
    assert report["resumed_from_step"] == 2 and base_report["resumed_from_step"] is None
    # And training really moved the weights, so the equality above is not two untouched copies.
    original = _tiny(tokenizer, seed=3).state_dict()
    assert any(not torch.equal(original[k], got[k]) for k in got if k in original)


def test_checkpoint_from_other_settings_is_refused(tokenizer, repeated_text, tmp_path):
    kwargs = dict(rank=2, lr=1e-2, seq_len=32, batch_size=2, ppl_window=32, log=lambda *_: None)
    checkpoints = tmp_path / "checkpoints"
    heal(_tiny(tokenizer, seed=4), tokenizer, str(repeated_text), steps=4, checkpoint_dir=checkpoints,
         save_every=1, **kwargs)
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000003"]  # older ones dropped, none at the end
    with pytest.raises(EvaluationError, match="--resume"):
        heal(_tiny(tokenizer, seed=4), tokenizer, str(repeated_text), steps=4, checkpoint_dir=checkpoints,
             **kwargs)
    with pytest.raises(EvaluationError, match="different lr"):
        heal(_tiny(tokenizer, seed=4), tokenizer, str(repeated_text), steps=4, checkpoint_dir=checkpoints,
             resume=True, **dict(kwargs, lr=5e-3))
    with pytest.raises(EvaluationError, match="different steps"):
        heal(_tiny(tokenizer, seed=4), tokenizer, str(repeated_text), steps=8, checkpoint_dir=checkpoints,
             resume=True, **kwargs)
    # A --checkpoint-dir may be a folder the user keeps other things in: only the checkpoints go.
    (checkpoints / "notes.txt").write_text("mine")
    remove_checkpoints(checkpoints)
    assert [p.name for p in checkpoints.iterdir()] == ["notes.txt"]
