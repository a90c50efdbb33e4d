"""Flag values are checked once, in the flag definitions: a bad value is one argparse line, exit 2, nothing written."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shortgpt_fast.cli import main

# (command prefix, flag, accepted check): every numeric or list flag whose bad values must be refused.
POSITIVE = [("eval", "--limit"), ("eval", "--ppl-stride"), ("eval", "--batch-size"), ("eval", "--repeats"),
            ("eval", "--decode-tokens"), ("eval", "--max-new-tokens"), ("score", "--samples"),
            ("score", "--batch-size"), ("score", "--angular-span"), ("heal", "--steps"), ("heal", "--rank"),
            ("heal", "--batch-size"), ("heal", "--limit"), ("prune", "--remove")]
AT_LEAST_2 = [("eval", "--ppl-window"), ("eval", "--throughput-seq-len"), ("score", "--seq-len"),
              ("heal", "--seq-len"), ("heal", "--ppl-window"), ("demo", "--ppl-window")]
NON_NEGATIVE = [("eval", "--ppl-tokens"), ("heal", "--warmup"), ("heal", "--ppl-tokens"), ("heal", "--save-every"),
                ("score", "--seed")]
FLOATS = [("heal", "--alpha"), ("heal", "--lr"), ("prune", "--ratio"), ("demo", "--ratio")]

_BASE = {"eval": ["eval", "M"], "score": ["score", "M", "--out", "r.json"], "heal": ["heal", "M", "O", "--steps", "1"],
         "prune": ["prune", "M", "O", "--remove", "1"], "demo": ["demo"], "compare": ["compare", "M"]}


def _argv(command: str, flag: str, value: str) -> list[str]:
    base = list(_BASE[command])
    if flag in base:  # replace the base's own valid value
        i = base.index(flag)
        del base[i:i + 2]
    if command == "prune" and flag == "--ratio":
        base = ["prune", "M", "O"]
    return base + [f"{flag}={value}"]


def _refused(argv, capsys, tmp_path) -> str:
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(argv)  # argparse's refusal comes back as main()'s exit code, as the console script exits with it
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err  # capsys is shared across examples; each read drains it
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert list(tmp_path.iterdir()) == [], f"{argv} wrote {list(tmp_path.iterdir())}"
    return lines[0]


bad_ints = st.one_of(st.integers(max_value=0).map(str), st.sampled_from(["", "x", "1.5", "1e3", "1_0", "\u0661",
                                                                          "nan", "-", "0x10", str(10 ** 30)]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(POSITIVE), value=bad_ints)
def test_positive_int_flags_refuse_bad_values(case, value, capsys, tmp_path_factory):
    line = _refused(_argv(*case, value), capsys, tmp_path_factory.mktemp("cwd"))
    assert case[1] in line


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(AT_LEAST_2), value=st.one_of(st.integers(max_value=1).map(str), st.just("abc")))
def test_window_flags_refuse_values_that_cannot_advance(case, value, capsys, tmp_path_factory):
    assert case[1] in _refused(_argv(*case, value), capsys, tmp_path_factory.mktemp("cwd"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(NON_NEGATIVE), value=st.one_of(st.integers(max_value=-1).map(str), st.just("1.0")))
def test_non_negative_flags_refuse_negatives(case, value, capsys, tmp_path_factory):
    assert case[1] in _refused(_argv(*case, value), capsys, tmp_path_factory.mktemp("cwd"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(FLOATS), value=st.sampled_from(["nan", "inf", "-inf", "0", "-1", "x", "", "1e400"]))
def test_float_flags_refuse_non_finite_and_out_of_range(case, value, capsys, tmp_path_factory):
    assert case[1] in _refused(_argv(*case, value), capsys, tmp_path_factory.mktemp("cwd"))


@pytest.mark.parametrize("argv,fragment", [
    (["eval", "M", "--ppl-window", "1"], "--ppl-window"),
    (["eval", "M", "--ppl-stride", "0"], "--ppl-stride"),
    (["eval", "M", "--ppl-tokens", "-1"], "--ppl-tokens"),
    (["eval", "M", "--limit", "-1"], "--limit"),
    (["eval", "M", "--throughput-seq-len", "0"], "--throughput-seq-len"),
    (["eval", "M", "--throughput-batches", "1,,8"], "--throughput-batches"),
    (["eval", "M", "--tasks", ""], "--tasks"),
    (["heal", "M", "O", "--steps", "1", "--warmup", "-5"], "--warmup"),
    (["heal", "M", "O", "--steps", "1", "--alpha", "nan"], "--alpha"),
    (["heal", "M", "O", "--steps", "1", "--dropout", "1"], "--dropout"),
    (["compare", "M", "--ratios", ""], "--ratios"),
    (["compare", "M", "--ratios", "0.1,1.5"], "--ratios"),
    (["score", "M", "--out", "r", "--seq-len", "0"], "--seq-len"),
    (["score", "M", "--out", "r", "--batch-size", "0"], "--batch-size"),
    (["score", "M", "--out", "r", "--device", "nonsense"], "unknown device"),
])
def test_named_bad_values(argv, fragment, capsys, tmp_path):
    assert fragment in _refused(argv, capsys, tmp_path)


def test_device_cuda_without_cuda_is_one_line(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "CUDA" in _refused(["eval", "M", "--device", "cuda"], capsys, tmp_path)


def test_prune_report_of_another_model_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig

    model = tmp_path / "model"
    LlamaConfig(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=32).save_pretrained(model)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"model": "smollm2-135m", "num_layers": 30, "block_path": "model.layers",
                                  "ranking": {"bi": list(range(30))}}))
    code = main(["prune", str(model), str(tmp_path / "out"), "--remove", "2", "--report", str(report)])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "30-layer" in err, err
    assert not (tmp_path / "out").exists()


def test_heal_refuses_to_save_non_finite_weights(tmp_path):
    import torch
    from tiny_models import tiny_llama

    from shortgpt_fast.evaluation.heal import save_healed
    from shortgpt_fast.evaluation.perplexity import EvaluationError

    model = tiny_llama(num_layers=2)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(EvaluationError, match="not finite"):
        save_healed(model, None, tmp_path / "healed", {})
    assert list(tmp_path.iterdir()) == []


def test_unexpected_exception_is_one_line(monkeypatch, capsys):
    import shortgpt_fast.cli as cli

    def boom(args):
        raise RuntimeError("deep failure\nsecond line")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda only=None: parser)
    parser._subparsers._group_actions[0].choices["archs"].set_defaults(func=boom)
    assert main(["archs"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: deep failure" in err and "--debug" in err
