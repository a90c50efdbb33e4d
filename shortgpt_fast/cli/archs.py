"""`shortgpt-fast archs`: every causal-LM model type through score/prune/reload/cut/generate, as a table."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "archs", help="run every causal-LM model type through score/prune/reload/cut/generate and print the table",
        description="Build a tiny random model of every causal-LM model type the installed transformers ships, run "
                    "the whole pipeline on it and judge each step against the original model with the removed "
                    "blocks as identity. Each cell is ✔, a refusal, WRONG (a silent mismatch) or the failure.")
    p.add_argument("--type", action="append", metavar="T",
                   help="only this row (model type, or a variant such as 'falcon_h1 (5 layers)'); repeatable")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="print each row's outcome and time as it finishes")
    p.add_argument("--write-readme", metavar="README", help="also replace the table between the archs markers")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.support_matrix import format_table, rows, run_all, write_readme_table

    if args.write_readme and args.type:
        raise ValueError("--write-readme records the whole matrix; drop --type")
    if args.list:
        print("\n".join(rows()))
        return 0

    def show(result):
        if args.verbose:
            print(f"{result.name}: {result.outcome} ({result.seconds:.1f} s)", flush=True)

    table = format_table(run_all(args.type, on_row=show))
    print(table)
    if args.write_readme:
        write_readme_table(Path(args.write_readme), table)
    return 0
