"""`shortgpt-fast eval`."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    # Transitional: the flags still live beside the library code; they move here with the evaluation/ split.
    from ..evaluation.run import add_eval_subcommand

    add_eval_subcommand(subparsers)
