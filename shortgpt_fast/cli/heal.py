"""`shortgpt-fast heal`."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    # Transitional: the flags still live beside the library code; they move here with the evaluation/ split.
    from ..evaluation.heal import add_heal_subcommand

    add_heal_subcommand(subparsers)
