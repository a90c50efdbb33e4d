"""The command line: score, prune, demo, and one-line errors for bad input with nothing half-written left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from shortgpt_fast.cli import main
from shortgpt_fast.models.loading import resolve_model_path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved in two shards: real text, fast model."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=40, intermediate_size=72, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"])
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    model.save_pretrained(path, max_shard_size="1MB")
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").exists()
    return path


def run_cli(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as done:  # argparse refuses bad flag values by exiting, as a console script would
        rc = done.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_score_then_prune_from_report(tiny_checkpoint, tmp_path, capsys):
    report = tmp_path / "scores" / "report.json"
    rc, out, err = run_cli(capsys, "score", tiny_checkpoint, "--samples", 4, "--seq-len", 32, "--quiet",
                           "--out", report)
    assert rc == 0, err
    data = json.loads(report.read_text())
    assert data["num_layers"] == 6 and data["tokens"] == 4 * 32
    assert data["calibration"]["mode"] == "packed" and data["calibration"]["seed"] == 0
    assert report.with_suffix(".png").stat().st_size > 0

    out_dir = tmp_path / "pruned"
    rc, out, err = run_cli(capsys, "prune", tiny_checkpoint, out_dir, "--report", report, "--remove", 2)
    assert rc == 0, err
    expected = sorted(data["ranking"]["bi"][:2])
    written = json.loads((out_dir / "report.json").read_text())
    assert written["removed"] == expected
    assert len(written["index_map"]) == 4
    card = (out_dir / "README.md").read_text()
    assert ", ".join(map(str, expected)) in card
    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert model.config.num_hidden_layers == 4 and not info["missing_keys"] and not info["unexpected_keys"]


def test_prune_scores_and_writes_report_with_plot(tiny_checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    rc, out, err = run_cli(capsys, "prune", tiny_checkpoint, out_dir, "--ratio", 0.34, "--samples", 3,
                           "--seq-len", 24, "--quiet", "--padding", "left")
    assert rc == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert len(report["removed"]) == 2 and report["calibration"]["mode"] == "padded-left"
    assert report["tokens"] < 3 * 24  # padding is not counted
    assert (out_dir / "report.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["score", "/nonexistent/model/dir", "--out", "r.json"], "does not exist"),
    (["prune", "{ckpt}", "{out}", "--remove", "6"], "impossible"),
    (["prune", "{ckpt}", "{out}", "--remove", "0"], "must be at least 1"),
    (["prune", "{ckpt}", "{out}", "--layers", "1,1"], "repeat"),
    (["prune", "{ckpt}", "{out}", "--layers", "2,9"], "out of range"),
    (["prune", "{ckpt}", "{out}", "--layers", "0,1,2,3,4,5"], "at least one layer"),
    (["score", "{ckpt}", "--calib", "{empty}", "--out", "r.json"], "empty"),
    (["score", "{ckpt}", "--calib", "{short}", "--out", "r.json"], "shorter than one sequence"),
    (["score", "{notmodel}", "--out", "r.json"], "not a Hugging Face model folder"),
    (["prune", "{ckpt}", "{out}", "--report", "/nonexistent/report.json", "--remove", "1"], "does not exist"),
    (["score", "{ckpt}", "--memory-budget", "12 bananas", "--out", "r.json"], "expected a size such as 8GB"),
    (["score", "{ckpt}", "--memory-budget", "4KB", "--out", "r.json"], "must be at least 1MB"),
    (["score", "{ckpt}", "--compute-dtype", "float8", "--out", "r.json"], "invalid choice"),
])
def test_bad_input_gives_one_line_error(argv, message, tiny_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    out = tmp_path / "out"
    argv = [a.format(ckpt=tiny_checkpoint, out=out, empty=empty, short=short, notmodel=notmodel) for a in argv]
    rc, stdout, err = run_cli(capsys, *argv, *(["--quiet"] if argv[0] == "score" else []))
    assert rc != 0
    # Flag values are refused by argparse ("shortgpt-fast prune: error: ..."), everything else by the command.
    lines = [line for line in err.strip().splitlines() if line.startswith("shortgpt-fast") and ": error:" in line]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists(), "a failed prune left OUT_DIR behind"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_memory_budget_and_compute_dtype_flags_stream_and_are_reported(tiny_checkpoint, tmp_path, capsys):
    report = tmp_path / "report.json"
    rc, out, err = run_cli(capsys, "score", tiny_checkpoint, "--samples", 2, "--seq-len", 16, "--quiet",
                           "--memory-budget", "1.5GiB", "--compute-dtype", "float32", "--out", report)
    assert rc == 0, err
    settings = json.loads(report.read_text())["calibration"]
    assert settings["streamed"] is True and settings["memory_budget"] == int(1.5 * 2**30)
    assert settings["compute_dtype"] == "float32"


def test_model_without_block_stack_is_rejected():
    from shortgpt_fast.models.architectures import ArchitectureError, find_block_stack

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ArchitectureError, match="cannot find a block stack"):
        find_block_stack(Flat())


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """The README's main job, on a small budget."""
    out_dir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "shortgpt_fast", "demo", "--samples", "2", "--seq-len", "64", "--ppl-tokens", "128",
         "--ppl-window", "64", "--quiet", "--out-dir", str(out_dir)],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and "prefill tokens/s" in proc.stdout
    summary = json.loads((out_dir / "demo_summary.json").read_text())
    assert len(summary["removed"]) == 8  # 25% of 30 layers, rounded
    assert summary["pruned"]["params"] < summary["dense"]["params"]
    config = json.loads((out_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 22
    # The embedded GGUF is cut too, with the same layers, and its sizes reported.
    from gguf import GGUFReader

    cut = GGUFReader(str(out_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert int(cut.fields["llama.block_count"].contents()) == 22
    assert 0 < summary["gguf_bytes"]["pruned"] < summary["gguf_bytes"]["dense"]
    assert "GGUF file" in proc.stdout


def test_prune_of_a_local_checkpoint_without_the_extension_errors_instead_of_loading_it(
        tiny_checkpoint, tmp_path, capsys, monkeypatch):
    # Falling back to loading the whole model would be an OOM on a 70B checkpoint; the cut needs the extension.
    from shortgpt_fast import _native

    def missing(feature, needs=None):
        raise _native.NativeExtensionError(f"{feature} needs the compiled extension shortgpt_fast._C, which is not "
                                           "importable (simulated); reinstall without SHORTGPT_FAST_SKIP_CPP=1")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(_native, "load", missing)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_load)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "prune", tiny_checkpoint, out, "--layers", "1-2")
    assert rc != 0 and not out.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "compiled extension" in lines[0] and "SHORTGPT_FAST_SKIP_CPP" in lines[0], err


def test_prune_accepts_layer_ranges_like_cut(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "prune", tiny_checkpoint, out, "--layers", "1-2,4")
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert json.loads((out / "report.json").read_text())["removed"] == [1, 2, 4]


def test_one_ratio_rule_for_prune_report_and_compare():
    from shortgpt_fast.experiments.compare import _layers_to_remove
    from shortgpt_fast.scoring.report import layers_for_ratio, removal_count

    # 0.25 of 26 layers is 6.5: half up gives 7 everywhere (banker's rounding would say 6).
    assert removal_count(26, ratio=0.25) == layers_for_ratio(26, 0.25) == _layers_to_remove(26, 0.25) == 7
    assert removal_count(32, ratio=0.25) == 8


def test_a_pruned_checkpoint_states_its_removal_once_credited_to_the_metric(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "prune", tiny_checkpoint, out, "--remove", "2", "--samples", 2, "--seq-len", 16)
    assert rc == 0, err
    card = (out / "README.md").read_text()
    assert card.count("## Layers removed") == 1 and card.count("original indices") == 1 and "Chosen by: `bi`" in card and "manual" not in card, card


def test_the_public_api_is_one_import():
    import shortgpt_fast as sf

    for name in ("score", "prune", "cut", "load", "calibration_set", "Scores", "CalibrationSet", "bi_reduce",
                 "ShortGPTError"):
        assert getattr(sf, name).__doc__, name
    assert issubclass(sf.ShortGPTError, ValueError)
    x = torch.randn(9, 5)
    assert torch.equal(sf.bi_reduce(x, x + 1), torch.ops.shortgpt_fast.bi_reduce(x, x + 1, None, None, 1))
