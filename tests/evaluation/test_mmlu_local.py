"""`--tasks mmlu_local`: MMLU 5-shot from the original CSV release in the shared data folder, through lm-eval."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
from tiny_models import tiny_llama_real_vocab

from shortgpt_fast.evaluation import EvaluationError, tasks
from shortgpt_fast.evaluation.data_dir import resolve_data_dir
from shortgpt_fast.evaluation.tasks import local_data

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        path = resolve_data_dir()
    except EvaluationError as err:
        pytest.skip(f"evaluation data not available here ({err})")
    if not (path / "mmlu" / "val").is_dir():
        pytest.skip(f"no MMLU CSVs under {path}")
    return path


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


@pytest.fixture(scope="module")
def manager(data_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks.TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})


def test_one_task_yaml_per_subject_and_a_group(manager, data_dir):
    subjects = sorted(p.name.removesuffix("_val.csv") for p in (data_dir / "mmlu" / "val").glob("*_val.csv"))
    assert len(subjects) == 57
    assert "mmlu_local" in manager.all_groups
    assert {f"mmlu_local_{s}" for s in subjects} == {t for t in manager.all_subtasks if t.startswith("mmlu_local_")}


@pytest.mark.parametrize("subject", ["abstract_algebra", "high_school_us_history"])  # shortest and longest prompts
def test_subject_reads_the_local_csvs_with_their_labels_and_5_dev_shots(manager, data_dir, subject):
    task = manager.load([f"mmlu_local_{subject}"])["tasks"][f"mmlu_local_{subject}"]
    val = _csv_rows(data_dir / "mmlu" / "val" / f"{subject}_val.csv")
    dev = _csv_rows(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv")
    docs = list(task.validation_docs())
    assert len(docs) == len(val) and not task.has_test_docs()
    assert [task.doc_to_target(d) for d in docs] == ["ABCD".index(row[5]) for row in val]
    assert [d["choices"] for d in docs] == [row[1:5] for row in val]
    assert task.doc_to_choice(docs[0]) == ["A", "B", "C", "D"]
    assert task.config.num_fewshot == 5
    context = task.fewshot_context(docs[0], num_fewshot=5)
    words = subject.replace("_", " ")
    assert context.startswith(f"The following are multiple choice questions (with answers) about {words}.\n\n")
    # The 5 dev questions in file order, each followed by its answer letter, then the question asked, unanswered.
    positions = [context.index(row[0].strip()) for row in dev]
    assert positions == sorted(positions)
    for row in dev:
        assert f"D. {row[4]}\nAnswer: {row[5]}" in context
    assert context.endswith(f"{val[0][0].strip()}\nA. {val[0][1]}\nB. {val[0][2]}\nC. {val[0][3]}\nD. {val[0][4]}"
                            "\nAnswer:")


def test_a_subject_runs_through_lm_eval_and_scores_the_argmax_letter(tokenizer, data_dir):
    model = tiny_llama_real_vocab(tokenizer)
    # One subject: the whole group is 57 subjects of up to 2,900-token 5-shot prompts, minutes on 2 cores.
    name = "mmlu_local_abstract_algebra"
    report = tasks.run_tasks(model, tokenizer, [name], limit=3, batch_size=4, data_dir=str(data_dir),
                             log_samples=True)[name]
    assert report["docs"] == 3
    labels = ["ABCD".index(row[5]) for row in _csv_rows(data_dir / "mmlu" / "val" / "abstract_algebra_val.csv")[:3]]
    samples = sorted(report["samples"], key=lambda s: s["doc_id"])
    assert [int(s["target"]) for s in samples] == labels
    predicted = [max(range(4), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    assert report["acc"] == pytest.approx(sum(p == y for p, y in zip(predicted, labels)) / 3)


def test_mmlu_local_is_a_local_task_and_mmlu_passes_through(data_dir):
    assert tasks.LOCAL_TASKS["mmlu_local"] == "mmlu_local"
    specs, names, _ = tasks.task_specs(["mmlu_local"], str(data_dir))
    assert specs == ["mmlu_local"] and names == {"mmlu_local": "mmlu_local"}
    assert "mmlu" not in tasks.LOCAL_TASKS  # the hub task keeps its lm-eval name


def test_malformed_mmlu_rows_are_refused(tmp_path):
    for folder in ("dev", "val"):
        (tmp_path / "mmlu" / folder).mkdir(parents=True)
        (tmp_path / "mmlu" / folder / f"x_{folder}.csv").write_text("Q?,a,b,c,d,A\n")
    (tmp_path / "mmlu" / "val" / "x_val.csv").write_text("Q?,a,b,c,d,E\n")
    with pytest.raises(local_data.TaskDataError, match="answer 'E' is not one of A, B, C, D"):
        local_data.load_mmlu("x", data_dir=str(tmp_path))
    (tmp_path / "mmlu" / "val" / "x_val.csv").write_text("Q?,a,b,c,A\n")
    with pytest.raises(local_data.TaskDataError, match="has 5 fields"):
        local_data.load_mmlu("x", data_dir=str(tmp_path))
