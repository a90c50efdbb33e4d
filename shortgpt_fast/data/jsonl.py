"""Reading .jsonl files with one-line errors that name the file, the line and the missing field."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Type


def read_jsonl_rows(path, required: Sequence[str], error: Type[Exception] = ValueError,
                    hint: str = "") -> list[dict]:
    """Every non-blank line as a dict holding `required`; raises `error` on the first bad line or an empty file."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{path}:{line_no} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{line_no} is not a JSON object")
            missing = [key for key in required if key not in row]
            if missing:
                raise error(f"{path}:{line_no} has no field {', '.join(map(repr, missing))}; "
                            + (hint or f"each line needs {', '.join(required)}"))
            rows.append(row)
    if not rows:
        raise error(f"{path} holds no examples")
    return rows
