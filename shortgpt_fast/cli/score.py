"""`shortgpt-fast score MODEL --out REPORT`: Block Influence and related metrics for every layer."""
from __future__ import annotations

from pathlib import Path

from .common import add_calibration_flags, add_model_argument, is_main_process, score_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score every layer by Block Influence and related metrics")
    add_model_argument(p)
    p.add_argument("--out", required=True, help="report JSON path; the plot is written beside it")
    add_calibration_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import write_report
    from ..scoring.layer_table import format_layer_table

    scores = score_from_args(args)
    if not is_main_process():
        return 0  # every rank holds the gathered scores; one writes them
    out = Path(args.out)
    write_report(scores, out)
    print(format_layer_table(scores))
    print(f"report: {out}  plot: {out.with_suffix('.png')}")
    return 0
