"""Where evaluation data lives: the shared data folder (WikiText-2, PIQA, ARC-Easy, MMLU), never copied into the package."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from . import EvaluationError


def shared_data_dir() -> Optional[Path]:
    """`../shared/data` beside the project (or $SHORTGPT_FAST_DATA): evaluation sets that are not shipped."""
    candidates = [os.environ.get("SHORTGPT_FAST_DATA"), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[2].parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


def resolve_data_dir(data_dir: Optional[str] = None) -> Path:
    """The evaluation data folder: `data_dir`, else $SHORTGPT_FAST_DATA, else `../shared/data`.

    An explicitly named folder that is missing is an error rather than a silent fall-back to another folder.
    """
    explicit = data_dir or os.environ.get("SHORTGPT_FAST_DATA")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            source = "--data-dir" if data_dir else "$SHORTGPT_FAST_DATA"
            raise EvaluationError(f"evaluation data folder {path} ({source}) does not exist")
        return path.resolve()
    found = shared_data_dir()
    if found is None:
        raise EvaluationError("no evaluation data folder: put it at ../shared/data, set $SHORTGPT_FAST_DATA "
                              "or pass --data-dir")
    return found


def wikitext2_test_path() -> Optional[Path]:
    """WikiText-2 test text in the shared data folder, or None when there is no such folder or file."""
    root = shared_data_dir()
    path = root / "wikitext-2" / "test.txt" if root else None
    return path if path and path.exists() else None
