"""`shortgpt-fast compare MODEL`: every (method, ratio) evaluated from one scoring pass (the paper's Table 2), or
with --quantize-order the paper's Table 5."""
from __future__ import annotations

from .. import cli_types as T
from .common import add_calibration_flags, add_evaluation_flags, add_model_argument, evaluate_kwargs, score_kwargs


def add_parser(subparsers) -> None:
    from ..evaluation.quantize import METHODS as QUANTIZE_METHODS
    from ..experiments.compare import DEFAULT_METHODS, DEFAULT_RATIOS, ORDER_DEFAULT_METHOD, ORDER_DEFAULT_RATIO

    p = subparsers.add_parser("compare", help="perplexity and task scores for every removal method and ratio")
    add_model_argument(p)
    p.add_argument("--ratios", default=None, type=T.non_empty_list(T.ratio_or_zero),
                   help=f"fractions of layers to remove, each in [0, 1) (default {DEFAULT_RATIOS}; with "
                        f"--quantize-order one ratio, default {ORDER_DEFAULT_RATIO})")
    p.add_argument("--methods", default=None, type=T.non_empty_list(),
                   help="removal metrics: bi, angular, relmag, angular_last_token, reverse, random, last, angular_span, "
                        "or laco (layer collapse: merges instead of removing, on its own 8 calibration sequences) "
                        f"(default {DEFAULT_METHODS}; with --quantize-order one metric, "
                        f"default {ORDER_DEFAULT_METHOD})")
    p.add_argument("--quantize-order", default=None, choices=QUANTIZE_METHODS, metavar="{nf4,int4}",
                   help="instead of the table: quantize -> score -> prune against score -> prune -> quantize at one "
                        "ratio (paper Table 5), perplexity on the calibration text's held-out tail; writes "
                        "quantization_order.json and .md")
    p.add_argument("--out-dir", default="compare", help="where compare.json, compare.md and compare.png go")
    add_evaluation_flags(p, runtime_flags=False)
    add_calibration_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments import compare as cmp

    if args.quantize_order:
        return _quantize_order(args)
    cmp.compare_to_dir(args.model, args.out_dir, ratios=cmp.parse_ratios(args.ratios or cmp.DEFAULT_RATIOS),
                       methods=cmp.parse_methods(args.methods or cmp.DEFAULT_METHODS),
                       eval_kwargs=evaluate_kwargs(args), calib=args.calib, score_kwargs=score_kwargs(args),
                       quantize_method=args.quantize)
    return 0


def _quantize_order(args) -> int:
    from ..experiments import compare as cmp

    if args.quantize:
        raise ValueError("--quantize-order quantizes in both orders itself; drop --quantize")
    if args.tasks or args.ppl not in ("wikitext2", "none"):
        raise ValueError("--quantize-order measures perplexity on the calibration text's held-out tail; drop --tasks "
                         "and --ppl")
    ratios = [r for r in cmp.parse_ratios(args.ratios or cmp.ORDER_DEFAULT_RATIO) if r > 0]
    methods = cmp.parse_methods(args.methods or cmp.ORDER_DEFAULT_METHOD)
    if len(ratios) != 1 or len(methods) != 1:
        raise ValueError(f"--quantize-order compares the two orders at one setting; give one --ratios value above 0 "
                         f"and one --methods metric, got {len(ratios)} and {len(methods)}")
    cmp.quantization_order_to_dir(args.model, args.out_dir, ratio=ratios[0], method=methods[0],
                                  quantize_method=args.quantize_order, calib=args.calib, samples=args.samples,
                                  seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                                  ppl_tokens=args.ppl_tokens or None, ppl_window=args.ppl_window, device=args.device,
                                  dtype=args.dtype)
    return 0
