"""`shortgpt-fast compare`."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    # Transitional: the flags still live beside the library code; they move here with the evaluation/ split.
    from ..experiments.compare import add_compare_subcommand

    add_compare_subcommand(subparsers)
