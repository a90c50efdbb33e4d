"""`shortgpt-fast demo`: the README's main job on the embedded default model."""
from __future__ import annotations

from .. import cli_types as T
from .common import add_calibration_flags, score_kwargs


def add_parser(subparsers) -> None:
    from ..scoring.report import DEFAULT_RATIO, METRICS

    p = subparsers.add_parser("demo", help="the README's main job: score, prune and evaluate the embedded default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out-dir", default="shortgpt-demo", help="where the pruned model and report go")
    p.add_argument("--ratio", type=T.open_ratio, default=DEFAULT_RATIO)
    p.add_argument("--metric", default="bi", choices=METRICS)
    p.add_argument("--ppl-tokens", type=T.non_negative_int, default=4096, help="tokens of WikiText-2 test for perplexity")
    p.add_argument("--ppl-window", type=T.int_at_least(2), default=512)
    add_calibration_flags(p)
    p.set_defaults(func=run, samples=16)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.model, args.out_dir, ratio=args.ratio, metric=args.metric, calib=args.calib,
             score_kwargs=score_kwargs(args), ppl_tokens=args.ppl_tokens, ppl_window=args.ppl_window)
    return 0
