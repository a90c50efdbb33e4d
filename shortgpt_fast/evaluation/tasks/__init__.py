"""Multiple-choice accuracy through lm-evaluation-harness: the task YAMLs shipped here read the shared data folder's
local files (loaders in local_data.py); any other name goes to lm-eval's own registry."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from .. import EvaluationError
from ..data_dir import resolve_data_dir

TASKS_DIR = Path(__file__).parent
# Names for the task YAMLs shipped here (mmlu_local is a group of 57 subject tasks); any other name, `mmlu`
# included, is handed to lm-eval's own registry.
LOCAL_TASKS = {"piqa": "piqa_local", "arc_easy": "arc_easy_local", "mmlu_local": "mmlu_local"}
MMLU_SUBJECT_PREFIX = "mmlu_local_"  # one MMLU subject alone, e.g. mmlu_local_anatomy


def _local_name(task: str) -> Optional[str]:
    """The lm-eval name of a task shipped here, or None for any other name."""
    if task in LOCAL_TASKS:
        return LOCAL_TASKS[task]
    return task if task.startswith(MMLU_SUBJECT_PREFIX) else None


def _jsonl_task_config(path: Path) -> dict:
    """An inline lm-eval task for a user's {query, choices, gold} jsonl file, prompted like the ARC-Easy YAML."""
    from .local_data import load_multiple_choice_jsonl

    return {
        "task": f"mc_{path.stem}",
        "custom_dataset": load_multiple_choice_jsonl,
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{query}}\nAnswer:",
        "doc_to_target": "gold",
        "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise EvaluationError("--tasks needs lm-evaluation-harness; run: pip install 'shortgpt-fast[eval]'")


def task_specs(tasks: Sequence[str], data_dir: Optional[str]):
    """lm-eval task specs, the report name of each, and a TaskManager that knows them all; refuses a task name that
    is neither shipped here, a .jsonl file, nor in lm-eval's registry."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    specs, names, registry_names = [], {}, []
    for task in tasks:
        if _local_name(task):
            specs.append(_local_name(task))
            names[_local_name(task)] = task
        elif task.endswith(".jsonl"):
            path = Path(task).expanduser()
            if not path.is_file():
                raise EvaluationError(f"task file {path} does not exist")
            config = _jsonl_task_config(path)
            specs.append(config)
            names[config["task"]] = task
        else:
            specs.append(task)
            names[task] = task
            registry_names.append(task)
    needs_local_data = any(_local_name(task) for task in tasks)
    metadata = {"data_dir": str(resolve_data_dir(data_dir))} if needs_local_data else {}
    # Indexing lm-eval's ~15k built-in task YAMLs takes seconds, so do it only when a built-in task is asked for.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(registry_names), metadata=metadata)
    unknown = [name for name in registry_names + [n for n in names if n.startswith(MMLU_SUBJECT_PREFIX)]
               if name not in manager.all_tasks]
    if unknown:
        raise EvaluationError(f"unknown task {', '.join(map(repr, unknown))}; local tasks are "
                              f"{', '.join(LOCAL_TASKS)} or a {{query, choices, gold}} .jsonl file, and any "
                              f"lm-eval task name (list them with `lm-eval ls tasks`)")
    return specs, names, manager


class _CustomDatasetHintFilter(logging.Filter):
    """lm-eval advises every custom_dataset task to take kwargs from `--metadata`; our loaders get the data folder
    from shortgpt_fast, so the advice only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def _silence_custom_dataset_hint() -> None:
    # Installed when tasks run rather than at import, so importing the package changes no logger; once only.
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _CustomDatasetHintFilter) for f in task_logger.filters):
        task_logger.addFilter(_CustomDatasetHintFilter())


def run_tasks(model: nn.Module, tokenizer, tasks: Sequence[str], *, limit: Optional[int] = None, batch_size: int = 8,
              data_dir: Optional[str] = None, log_samples: bool = False) -> dict:
    """Accuracy (acc, acc_norm and their stderr, as lm-eval reports them) of the in-memory model on each task,
    keyed by the name the caller gave; `limit` keeps the first N examples of each task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs, names, manager = task_specs(tasks, data_dir)
    _silence_custom_dataset_hint()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # acc/acc_norm stderr is closed-form; the bootstrap only serves other metrics, and 100k resamples cost minutes.
    results = simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager, log_samples=log_samples,
                              bootstrap_iters=1000)
    report = {}
    for lm_name, name in names.items():
        row = results["results"][lm_name]
        entry = {"task": lm_name, **_doc_counts(results, lm_name)}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in row:
                entry[metric] = float(row[f"{metric},none"])
                # lm-eval writes "N/A" where a stderr is undefined (a single document).
                stderr = row.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        if log_samples:
            entry["samples"] = results["samples"][lm_name]
        report[name] = entry
    return report


def _doc_counts(results: dict, lm_name: str) -> dict:
    """Documents scored and available; a group of lm-eval tasks has no count of its own, so its subtasks' add up."""
    counts = results.get("n-samples", {})
    members = results.get("group_subtasks", {}).get(lm_name) or [lm_name]
    if not all(name in counts for name in members):
        return {"docs": None, "docs_available": None}
    return {"docs": sum(counts[name]["effective"] for name in members),
            "docs_available": sum(counts[name]["original"] for name in members)}


def check_task_inputs(tasks: Sequence[str], data_dir: Optional[str]) -> None:
    """Refuse a missing data folder or a malformed .jsonl task file before minutes go into loading and scoring."""
    from .local_data import load_multiple_choice_jsonl

    if any(_local_name(task) for task in tasks):
        resolve_data_dir(data_dir)
    for task in tasks:
        if task.endswith(".jsonl"):
            load_multiple_choice_jsonl({"test": task})
