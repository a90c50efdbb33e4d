"""`shortgpt-fast eval MODEL [--compare-to ORIGINAL]`: perplexity, lm-eval tasks, throughput and generation."""
from __future__ import annotations

import json
from pathlib import Path

from .. import cli_types as T
from .common import add_evaluation_flags, add_model_argument, evaluate_kwargs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity, lm-eval tasks, throughput and generation of a model")
    add_model_argument(p)
    p.add_argument("--compare-to", default=None, metavar="ORIGINAL",
                   help="also evaluate ORIGINAL and show both side by side (MODEL is taken as the pruned one)")
    add_evaluation_flags(p)
    p.add_argument("--throughput", action="store_true", help="prefill and decode tokens/s, medians over repeats")
    p.add_argument("--throughput-batches", default="1,8", type=T.non_empty_list(T.positive_int))
    p.add_argument("--throughput-seq-len", type=T.int_at_least(2), default=256)
    p.add_argument("--decode-tokens", type=T.positive_int, default=32)
    p.add_argument("--repeats", type=T.positive_int, default=5)
    p.add_argument("--generate", action="store_true", help="greedy continuations of fixed prompts")
    p.add_argument("--max-new-tokens", type=T.positive_int, default=32)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import evaluate_models
    from ..evaluation.evaluate import format_generations, format_table

    models = [("original", args.compare_to), ("pruned", args.model)] if args.compare_to else [("model", args.model)]
    results = evaluate_models(models, device=args.device, dtype=args.dtype, quantize_method=args.quantize,
                              **evaluate_kwargs(args))
    print(format_table(results))
    generations = format_generations(results)
    if generations:
        print()
        print(generations)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0
