"""score --angular-span all / --metric / --trust-remote-code, and compare-calib, through the command line."""
from __future__ import annotations

import json

from remote_code_model import write_remote_code_model
from tiny_models import tiny_llama_real_vocab

from shortgpt_fast.cli import main


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_score_span_map_and_user_metric(tokenizer, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny_llama_real_vocab(tokenizer, num_layers=5).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    out = tmp_path / "r" / "report.json"
    rc, printed, err = run_cli(capsys, "score", ckpt, "--out", out, "--samples", 4, "--seq-len", 33,
                               "--batch-size", 2, "--angular-span", "all", "--metric", "euclidean", "--quiet")
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert len(report["span_map"]["values"]) == 5 and "euclidean" in report["ranking"]
    assert (out.parent / "report_spans.png").exists() and "span map:" in printed

    texts = tmp_path / "notes.txt"
    texts.write_text("def add(a, b):\n    return a + b\n" * 200)
    rc, printed, err = run_cli(capsys, "compare-calib", ckpt, "--calib", "plays=shakespeare", "--calib", texts,
                               "--out", tmp_path / "calib.json", "--samples", 4, "--seq-len", 33, "--ratio", 0.4,
                               "--quiet")
    assert rc == 0, err
    result = json.loads((tmp_path / "calib.json").read_text())
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [("plays", "notes.txt")] and result["n_remove"] == 2
    assert "Kendall τ" in printed


def test_bad_span_and_untrusted_remote_code_are_one_line_errors(tokenizer, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "score", "smollm2-135m", "--out", tmp_path / "r.json", "--angular-span", "some")
    assert rc == 2 and "--angular-span" in err and len(err.strip().splitlines()) == 1
    remote = write_remote_code_model(tmp_path / "remote", tokenizer)
    capsys.readouterr()  # the fixture's own save progress
    rc, _, err = run_cli(capsys, "score", remote, "--out", tmp_path / "r.json", "--samples", 2, "--seq-len", 17)
    assert rc == 2 and "--trust-remote-code" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "score", remote, "--out", tmp_path / "r.json", "--samples", 2, "--seq-len", 17,
                         "--trust-remote-code", "--quiet")
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["num_layers"] == 5
