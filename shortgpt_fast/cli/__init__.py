"""`shortgpt-fast`: the one subcommand list. Each command is a module here that parses its flags and calls the
library; errors are one line with a fix hint and a non-zero exit."""
from __future__ import annotations

import importlib
import os
import sys

from .. import __version__
from ..errors import one_line
from .common import EXIT_USAGE, OneLineParser

# Transitional names that experiments/compare.py still imports; they go when its flags move into cli/compare.py.
from .common import add_calibration_flags as _add_calibration_flags  # noqa: F401
from .common import score_from_args as _score_from_args  # noqa: F401

# Subcommand -> module, in --help order. A module imports only argparse-level code at import time, so building one
# command's parser costs nothing; `cut` in particular never imports torch.
COMMANDS = {
    "score": "score",
    "prune": "prune",
    "cut": "cut",
    "demo": "demo",
    "eval": "evaluate",
    "compare": "compare",
    "compare-calib": "compare_calib",
    "heal": "heal",
    "archs": "archs",
}


def build_parser(only: str | None = None) -> OneLineParser:
    """The `shortgpt-fast` parser; with `only`, just that subcommand (what `main` uses when the command is known,
    so a run pays for importing its own command alone)."""
    parser = OneLineParser(prog="shortgpt-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shortgpt_fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(f"{__name__}.{module}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    wants_top_level = bool({"-h", "--help", "--version"} & set(argv[: argv.index(first) if first in argv else None]))
    parser = build_parser(first if first in COMMANDS and not wants_top_level else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # argparse's one-line refusal (or --help); callers of main() get the exit code
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    debug = args.debug or os.environ.get("SHORTGPT_FAST_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        if debug:
            raise
        print(f"shortgpt-fast: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("shortgpt-fast: interrupted", file=sys.stderr)
        return 130
    except (Exception, RecursionError, MemoryError) as err:  # noqa: BLE001 - the one-line contract covers bugs too
        if debug:
            raise
        print(f"shortgpt-fast: error: {type(err).__name__}: {one_line(err)} (rerun with --debug for the traceback "
              "and report it)", file=sys.stderr)
        return 1
