"""Loaders that lm-eval calls (`custom_dataset`) to read the shipped task YAMLs' data from local files.

lm-eval calls them with the task's `metadata` and `dataset_kwargs` merged; shortgpt_fast puts the data folder in
the metadata as `data_dir`, so the YAMLs only name paths relative to it and nothing is fixed at install time.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

# Absolute imports only: lm-eval loads this file by path as a top-level module (`!function local_data.…`), so it
# has no parent package for a relative import to resolve against.
from shortgpt_fast.data.jsonl import read_jsonl_rows
from shortgpt_fast.errors import ShortGPTError


class TaskDataError(ShortGPTError):
    pass


def _resolve(data_dir: Optional[str], relative: str) -> Path:
    path = Path(relative)
    if not path.is_absolute():
        if not data_dir:
            raise TaskDataError(f"no data folder to find {relative} in; set $SHORTGPT_FAST_DATA or pass --data-dir")
        path = Path(data_dir) / path
    if not path.is_file():
        raise TaskDataError(f"task data file {path} does not exist")
    return path


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    return read_jsonl_rows(path, required, error=TaskDataError)


def _datasets(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()})


def _dataset(split: str, rows: list[dict]):
    return _datasets({split: rows})


def load_piqa(data_files: dict, data_dir: Optional[str] = None, **_metadata):
    """PIQA as released: goal/sol1/sol2 lines plus a separate file of 0/1 labels, one per line."""
    questions = _read_jsonl(_resolve(data_dir, data_files["validation"]), ("goal", "sol1", "sol2"))
    labels_path = _resolve(data_dir, data_files["labels"])
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(questions):
        raise TaskDataError(f"{labels_path} has {len(labels)} labels for {len(questions)} PIQA questions")
    for line_no, label in enumerate(labels, 1):
        if label not in ("0", "1"):
            raise TaskDataError(f"{labels_path}:{line_no} is {label!r}; PIQA labels are 0 or 1")
    rows = [{"goal": q["goal"], "sol1": q["sol1"], "sol2": q["sol2"], "label": int(label)}
            for q, label in zip(questions, labels)]
    return _dataset("validation", rows)


def load_multiple_choice_jsonl(data_files: dict, data_dir: Optional[str] = None, **_metadata):
    """One question per line: {"query": str, "choices": [str, ...], "gold": index of the right choice}."""
    (split, relative), = data_files.items()
    path = _resolve(data_dir, relative)
    rows = _read_jsonl(path, ("query", "choices", "gold"))
    for line_no, row in enumerate(rows, 1):
        choices, gold = row["choices"], row["gold"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskDataError(f"{path} example {line_no}: 'choices' must be a list of at least 2 strings")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise TaskDataError(f"{path} example {line_no}: 'gold' must be an index into its {len(choices)} choices")
    return _dataset(split, [{"query": r["query"], "choices": r["choices"], "gold": r["gold"]} for r in rows])


MMLU_LETTERS = ("A", "B", "C", "D")


def _read_mmlu_csv(path: Path) -> list[dict]:
    """One MMLU question per row, no header: question, the four choices, then the answer letter."""
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row_no, row in enumerate(csv.reader(handle), 1):
            if len(row) != 6:
                raise TaskDataError(f"{path} row {row_no} has {len(row)} fields; MMLU rows are a question, "
                                    "4 choices and an answer letter")
            answer = row[5].strip()
            if answer not in MMLU_LETTERS:
                raise TaskDataError(f"{path} row {row_no}: answer {answer!r} is not one of A, B, C, D")
            rows.append({"question": row[0], "choices": row[1:5], "answer": MMLU_LETTERS.index(answer)})
    if not rows:
        raise TaskDataError(f"{path} holds no questions")
    return rows


def load_mmlu(subject: str, data_dir: Optional[str] = None, **_metadata):
    """One MMLU subject in the original CSV release (Hendrycks et al. 2021): `dev` (the 5 few-shot examples) from
    mmlu/dev/{subject}_dev.csv and `validation` (the questions scored) from mmlu/val/{subject}_val.csv, as
    {question, choices: [4 str], answer: 0-3} rows like lm-eval's own `mmlu` tasks read from the hub."""
    return _datasets({split: _read_mmlu_csv(_resolve(data_dir, f"mmlu/{folder}/{subject}_{folder}.csv"))
                      for split, folder in (("dev", "dev"), ("validation", "val"))})
