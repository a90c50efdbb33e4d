"""`shortgpt-fast prune MODEL OUT_DIR`: remove the least important layers and write a standard checkpoint."""
from __future__ import annotations

from pathlib import Path

from .. import cli_types as T
from .common import add_calibration_flags, add_model_argument, add_no_verify_flag, is_main_process, score_from_args


def add_parser(subparsers) -> None:
    from ..scoring.report import METRICS

    p = subparsers.add_parser("prune", help="remove the least important layers and write a standard checkpoint")
    add_model_argument(p)
    p.add_argument("out_dir")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", type=T.positive_int, help="number of layers to remove")
    how.add_argument("--ratio", type=T.open_ratio, help="fraction of layers to remove, e.g. 0.25")
    how.add_argument("--layers", help="layers to remove, original numbering, e.g. 21,22,25 or 21-25")
    p.add_argument("--metric", default="bi", choices=METRICS)
    p.add_argument("--report", help="reuse the scores of a `score` report instead of scoring again")
    add_no_verify_flag(p)
    add_calibration_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import choose_layers, prune_to_dir, read_report
    from ..io.durable import check_out_dir
    from ..models.loading import config_layer_count

    out_dir = Path(args.out_dir)
    check_out_dir(out_dir)
    scores = report = None
    if args.layers:
        layers = choose_layers(config_layer_count(args.model), layers=args.layers)
        metric = "manual"
    else:
        if args.report:
            report = read_report(args.report, model=args.model)
            num_layers = report["num_layers"]
        else:
            scores = score_from_args(args)
            num_layers = scores.num_layers
        layers = choose_layers(num_layers, remove=args.remove, ratio=args.ratio, metric=args.metric, scores=scores,
                               report=report)
        metric = args.metric
    if not is_main_process():
        return 0
    result = prune_to_dir(args.model, out_dir, layers, metric, scores=scores, report=report,
                          verify=not args.no_verify)
    print(f"removed layers {sorted(layers)} by {metric}; wrote {out_dir} ({result['engine']})")
    return 0
