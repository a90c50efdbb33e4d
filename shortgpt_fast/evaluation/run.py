"""The `shortgpt-fast eval` command: its flags and their translation into evaluation.evaluate.evaluate() calls.

Argument parsing only; every measurement lives in the evaluation modules (perplexity, tasks, throughput,
generation, evaluate).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

from .. import cli_types as T
from .evaluate import check_inputs_early, evaluate, format_generations, format_table
from .perplexity import PPL_SOURCES
from .quantize import METHODS, quantize, require_backend


def _parse_tasks(text: Optional[str]) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def _parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--throughput-batches must be comma-separated integers such as 1,8, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--throughput-batches must be positive integers, got {text!r}")
    return batches


def evaluate_kwargs_from_args(args) -> dict:
    """evaluate() keyword arguments from `eval` or `compare` flags (compare has no throughput/generation flags)."""
    return dict(ppl=None if args.ppl == "none" else args.ppl, ppl_tokens=args.ppl_tokens or None,
                ppl_window=args.ppl_window, ppl_stride=args.ppl_stride, tasks=_parse_tasks(args.tasks),
                limit=args.limit, batch_size=args.eval_batch_size, throughput=getattr(args, "throughput", False),
                throughput_batches=_parse_batches(getattr(args, "throughput_batches", "1,8")),
                throughput_seq_len=getattr(args, "throughput_seq_len", 256),
                throughput_repeats=getattr(args, "repeats", 5), decode_tokens=getattr(args, "decode_tokens", 32),
                generate=getattr(args, "generate", False), max_new_tokens=getattr(args, "max_new_tokens", 32),
                data_dir=args.data_dir, progress=not args.quiet)


def add_evaluation_flags(parser: argparse.ArgumentParser, runtime_flags: bool = True) -> None:
    """Perplexity and task flags; `runtime_flags=False` where the calibration flags already define
    --device/--dtype/--quiet/--batch-size (the `compare` subcommand)."""
    group = parser.add_argument_group("evaluation")
    group.add_argument("--ppl", default="wikitext2",
                       help=f"perplexity text: {', '.join(PPL_SOURCES)}, a .txt file, or none (default wikitext2)")
    group.add_argument("--ppl-tokens", type=T.non_negative_int, default=4096, help="tokens of the text to score; 0 for all")
    group.add_argument("--ppl-window", type=T.int_at_least(2), default=512,
                       help="tokens per scored window (at least 2, so each window can advance)")
    group.add_argument("--ppl-stride", type=T.positive_int, default=None, help="default: half the window")
    group.add_argument("--tasks", default=None, type=T.non_empty_list(),
                       help="comma-separated: piqa, arc_easy (local files), {query,choices,gold} .jsonl files, "
                            "or lm-eval task names (need the hub)")
    group.add_argument("--limit", type=T.positive_int, default=None, help="evaluate only the first N examples of each task")
    batch_flags = ("--batch-size", "--eval-batch-size") if runtime_flags else ("--eval-batch-size",)
    group.add_argument(*batch_flags, dest="eval_batch_size", type=T.positive_int, default=8, help="lm-eval batch size")
    group.add_argument("--data-dir", default=None, help="evaluation data folder (default ../shared/data)")
    group.add_argument("--quantize", default=None, choices=METHODS,
                       help="evaluate 4-bit weights: nf4 (bitsandbytes) or int4 (torchao weight-only, groups of "
                            "64; on CPU use --dtype bfloat16, torch's int4 kernel is slow for float32)")
    if runtime_flags:
        group.add_argument("--device", default="cpu", type=T.device)
        group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
        group.add_argument("--quiet", action="store_true", help="no progress bars")


def add_eval_subcommand(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity, lm-eval tasks, throughput and generation of a model")
    p.add_argument("model", help="checkpoint folder, hub id, or the alias smollm2-135m")
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
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from ..api import load

    kwargs = evaluate_kwargs_from_args(args)
    check_inputs_early(kwargs)
    if args.quantize:
        require_backend(args.quantize)
    if args.quiet:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    models = ([("original", args.compare_to), ("pruned", args.model)] if args.compare_to
              else [("model", args.model)])
    results = {}
    for label, name in models:
        net, tokenizer = load(name, device=args.device, dtype=args.dtype)
        if args.quantize:
            params = sum(p.numel() for p in net.parameters())
            net = quantize(net, args.quantize)
        results[label] = evaluate(net, tokenizer, **kwargs)
        results[label]["model"] = name
        if args.quantize:
            # Counted before quantizing: bitsandbytes stores two 4-bit weights per element, which would halve it.
            results[label].update(params=params, quantization=args.quantize)
        del net
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
