"""`shortgpt-fast score MODEL --out REPORT`: Block Influence and related metrics for every layer."""
from __future__ import annotations

from pathlib import Path

from .common import add_calibration_flags, add_model_argument, is_main_process, score_from_args


def add_scoring_extras(parser) -> None:
    """--metric, --quantize and --trust-remote-code: the flags `score` and `compare-calib` share."""
    from ..evaluation.quantize import METHODS

    group = parser.add_argument_group("metrics and model")
    # dest differs from prune's --metric (the ranking that chooses layers), which shares score_kwargs.
    group.add_argument("--metric", action="append", default=None, metavar="NAME", dest="user_metrics",
                       help="also compute a registered user metric (repeatable): euclidean, secretly_linear, or one "
                            "added with shortgpt_fast.register_metric")
    group.add_argument("--quantize", default=None, choices=METHODS,
                       help="score a 4-bit copy: nf4 (bitsandbytes) or int4 (torchao weight-only)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="run the checkpoint's own modeling code (auto_map, e.g. Baichuan); only for code you trust")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score every layer by Block Influence and related metrics")
    add_model_argument(p)
    p.add_argument("--out", required=True, help="report JSON path; the plot is written beside it")
    add_calibration_flags(p)
    add_scoring_extras(p)
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
    print(f"report: {out}  plot: {out.with_suffix('.png')}"
          + (f"  span map: {out.with_name(out.stem + '_spans.png')}" if scores.has_span_map else ""))
    return 0
