"""`shortgpt-fast compare`: every (method, removal ratio) evaluated from one scoring pass, as in the paper's Table 2.

The model is loaded and scored once; each setting prunes a fresh in-memory copy, so nothing is written but the
results: compare.json, compare.md (scores and retention % of the dense model) and plots against % of layers removed.
With --quantize every row is evaluated in 4 bits (score -> prune -> quantize: the layers are chosen on the float
model); --quantize-order instead runs the paper's Table 5, both orders of quantizing and pruning at one ratio.
"""
from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

from .. import cli_types as T
from ..evaluation.evaluate import check_inputs_early, evaluate, with_stderr
from ..evaluation.quantize import METHODS as QUANTIZE_METHODS
from ..evaluation.quantize import format_order_table, quantization_order, quantize, require_backend
from ..evaluation.run import add_evaluation_flags, evaluate_kwargs_from_args

# Short method names used by the issue and the paper's baselines; the values are Scores metric names.
METHOD_ALIASES = {"relmag": "relative_magnitude", "angular_last": "angular_last_token"}
DEFAULT_RATIOS = "0,0.1,0.2,0.25,0.3"
DEFAULT_METHODS = "bi,angular,relmag,reverse,random,last"
# Not a score ranking but a weight merge (surgery/laco.py), run on calibration sequences of its own.
MERGE_METHODS = ("laco",)
# LaCo's similarity is a whole-model forward per candidate merge; the authors used 5 short sentences.
LACO_SEQUENCES = 8
# --quantize-order compares two whole pipelines at one setting, so it takes one method and one ratio.
ORDER_DEFAULT_RATIO = "0.25"
ORDER_DEFAULT_METHOD = "bi"


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--ratios must be comma-separated numbers such as 0,0.1,0.25, got {text!r}") from None
    bad = [r for r in ratios if not 0 <= r < 1]
    if not ratios or bad:
        raise ValueError(f"--ratios must lie in [0, 1), got {', '.join(map(str, bad)) or 'nothing'}")
    return sorted(set(ratios))


def parse_methods(text: str) -> list[str]:
    from ..scoring.report import METRICS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if METHOD_ALIASES.get(m, m) not in METRICS and m not in MERGE_METHODS]
    if not methods or unknown:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
                         f"{', '.join(sorted(set(METRICS) | set(METHOD_ALIASES) | set(MERGE_METHODS)))}")
    return methods


def _layers_to_remove(num_layers: int, ratio: float) -> int:
    # The rule of `prune --ratio`, but 0 is allowed here: it is the dense row every method shares.
    from ..scoring.report import layers_for_ratio

    return layers_for_ratio(num_layers, ratio)


def compare(model, tokenizer, scores, *, ratios: Sequence[float], methods: Sequence[str], eval_kwargs: dict,
            quantize_method: Optional[str] = None, laco_calibration=None, laco_kwargs: Optional[dict] = None,
            log=print) -> dict:
    """Evaluate the dense model once and every (method, ratio > 0) on a pruned copy, each quantized first if
    `quantize_method`; returns the JSON table.

    Method "laco" merges instead of removing (surgery/laco.py): its search runs on `laco_calibration` (a
    CalibrationSet) with `laco_kwargs` (laco.search options) and removes the same number of layers as the others.
    """
    from ..surgery import laco
    from ..surgery.in_memory import prune_model

    if "laco" in methods and laco_calibration is None:
        raise ValueError("method laco needs calibration sequences (laco_calibration) for its similarity search")

    def run(net):
        params = sum(p.numel() for p in net.parameters())
        result = evaluate(quantize(net, quantize_method) if quantize_method else net, tokenizer, **eval_kwargs)
        # The float count: bitsandbytes stores two 4-bit weights per element, which would halve it.
        result["params"] = params
        return result

    num_layers = scores.num_layers
    dense_params = sum(p.numel() for p in model.parameters())
    rows = []
    log(f"evaluating the dense model ({num_layers} layers)" + (f" in {quantize_method}" if quantize_method else ""))
    dense = run(model)
    rows.append(_row("dense", 0.0, [], num_layers, dense, dense_params))
    for method in methods:
        for ratio in ratios:
            n_remove = _layers_to_remove(num_layers, ratio)
            if n_remove == 0:
                continue
            if n_remove >= num_layers:
                raise ValueError(f"ratio {ratio} removes all {num_layers} layers; use a smaller ratio")
            extra = {}
            if method == "laco":
                plan = laco.search(model, laco_calibration.input_ids, attention_mask=laco_calibration.attention_mask,
                                   remove=n_remove, **(laco_kwargs or {}))
                layers = plan.removed
                log(f"laco @ {ratio:g}: merging away {len(layers)} layers {layers} (threshold "
                    f"{plan.settings['threshold_used']:g})")
                pruned = laco.collapse_model(model, plan)
                extra = {"laco": plan.to_json()}
            else:
                layers = scores.select(METHOD_ALIASES.get(method, method), n_remove)
                log(f"{method} @ {ratio:g}: removing {n_remove} layers {layers}")
                pruned = prune_model(copy.deepcopy(model), layers)
            rows.append(dict(_row(method, ratio, layers, num_layers, run(pruned), dense_params), **extra))
            del pruned
    return {"model": scores.model, "num_layers": num_layers, "dense_params": dense_params,
            "calibration": scores.calibration, "ratios": list(ratios), "methods": list(methods),
            "quantization": quantize_method,
            "evaluation": {k: v for k, v in eval_kwargs.items() if k != "progress"}, "rows": rows}


def _row(method: str, ratio: float, layers: list, num_layers: int, result: dict, dense_params: int) -> dict:
    row = {"method": method, "ratio": ratio, "removed": list(layers),
           "layers_removed_pct": 100 * len(layers) / num_layers,
           "params": result["params"], "params_kept_pct": 100 * result["params"] / dense_params,
           "bytes": result["bytes"]}
    if "perplexity" in result:
        row["ppl"] = result["perplexity"]["ppl"]
    for task, values in result.get("tasks", {}).items():
        row[task] = {k: v for k, v in values.items() if k != "samples"}
    return row


def _task_names(table: dict) -> list[str]:
    return [k for k, v in table["rows"][0].items() if isinstance(v, dict)]


def markdown_table(table: dict) -> str:
    """Paper Table 2 layout: one row per setting, task accuracies, their average and its retention % of dense."""
    tasks = _task_names(table)
    dense = table["rows"][0]
    dense_avg = statistics.fmean(dense[t]["acc"] for t in tasks) if tasks else None
    header = ["method", "ratio", "layers removed", "params kept %", "weights MB"]
    header += ["WikiText-2 ppl"] if "ppl" in dense else []
    header += [f"{t} acc" for t in tasks] + (["avg", "retention %"] if tasks else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [row["method"], f"{row['ratio']:g}", f"{len(row['removed'])} ({row['layers_removed_pct']:.0f}%)",
                 f"{row['params_kept_pct']:.1f}", f"{row['bytes'] / 1e6:.1f}"]
        if "ppl" in row:
            cells.append(f"{row['ppl']:.2f}")
        if tasks:
            accs = [row[t]["acc"] for t in tasks]
            cells += [with_stderr(100 * a, stderr and 100 * stderr, "{:.1f}")
                      for a, stderr in zip(accs, (row[t]["acc_stderr"] for t in tasks))]
            avg = statistics.fmean(accs)
            cells += [f"{avg * 100:.1f}", f"{100 * avg / dense_avg:.1f}" if dense_avg else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    docs = {t: dense[t]["docs"] for t in tasks}
    note = f"\nTask accuracies (lm-eval `acc`, %, ± stderr) on {docs} examples." if tasks else ""
    if table.get("quantization"):
        note += (f"\nEvery row evaluated with {table['quantization']} weights; layers chosen on the float model "
                 "(score -> prune -> quantize).")
    return "\n".join(lines) + "\n" + note + "\n"


def plot(table: dict, path: Path) -> None:
    """Perplexity and each task's accuracy against % of layers removed, one line per method (dense at 0%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _task_names(table)
    panels = (["ppl"] if "ppl" in table["rows"][0] else []) + tasks
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    dense = table["rows"][0]
    for ax, panel in zip(axes[0], panels):
        for method in table["methods"]:
            rows = [dense] + [r for r in table["rows"] if r["method"] == method]
            x = [r["layers_removed_pct"] for r in rows]
            y = [r["ppl"] if panel == "ppl" else 100 * r[panel]["acc"] for r in rows]
            ax.plot(x, y, marker="o", label=method)
        ax.set_xlabel("% of layers removed")
        if panel == "ppl":
            ax.set_ylabel("perplexity (log scale)")
            ax.set_yscale("log")
        else:
            ax.set_ylabel(f"{panel} accuracy %")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    quantized = f", {table['quantization']} weights" if table.get("quantization") else ""
    fig.suptitle(f"{table['model']}: layer removal by method{quantized}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_compare_subcommand(subparsers) -> None:
    from ..cli import _add_calibration_flags

    p = subparsers.add_parser("compare", help="perplexity and task scores for every removal method and ratio")
    p.add_argument("model", help="checkpoint folder, hub id, or the alias smollm2-135m")
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
    _add_calibration_flags(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from ..api import load
    from ..cli import _score_from_args

    if args.quantize_order:
        return cmd_quantize_order(args)
    ratios, methods = parse_ratios(args.ratios or DEFAULT_RATIOS), parse_methods(args.methods or DEFAULT_METHODS)
    eval_kwargs = evaluate_kwargs_from_args(args)
    check_inputs_early(eval_kwargs)
    if args.quantize:
        require_backend(args.quantize)
    if args.quiet:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    started = time.perf_counter()
    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype)
    print(f"scoring {args.model} once on {args.samples} x {args.seq_len} calibration tokens")
    scores = _score_from_args(args, model=model, tokenizer=tokenizer)
    scores.model = args.model
    laco_calibration = None
    if "laco" in methods:
        from ..api import calibration_set

        laco_calibration = calibration_set(args.calib, tokenizer, samples=min(args.samples, LACO_SEQUENCES),
                                           seq_len=args.seq_len, seed=args.seed)
    table = compare(model, tokenizer, scores, ratios=ratios, methods=methods, eval_kwargs=eval_kwargs,
                    quantize_method=args.quantize, laco_calibration=laco_calibration)
    table["seconds"] = round(time.perf_counter() - started, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(table, indent=1))
    markdown = markdown_table(table)
    (out_dir / "compare.md").write_text(markdown)
    plot(table, out_dir / "compare.png")
    print(markdown)
    print(f"wrote {out_dir}/compare.json, compare.md, compare.png in {table['seconds']} s")
    return 0


def cmd_quantize_order(args) -> int:
    from ..api import load
    from ..models.architectures import find_block_stack

    if args.quantize:
        raise ValueError("--quantize-order quantizes in both orders itself; drop --quantize")
    if args.tasks or args.ppl not in ("wikitext2", "none"):
        raise ValueError("--quantize-order measures perplexity on the calibration text's held-out tail; drop --tasks "
                         "and --ppl")
    ratios = [r for r in parse_ratios(args.ratios or ORDER_DEFAULT_RATIO) if r > 0]
    methods = parse_methods(args.methods or ORDER_DEFAULT_METHOD)
    if len(ratios) != 1 or len(methods) != 1:
        raise ValueError(f"--quantize-order compares the two orders at one setting; give one --ratios value above 0 "
                         f"and one --methods metric, got {len(ratios)} and {len(methods)}")
    if methods[0] in MERGE_METHODS:
        raise ValueError(f"--quantize-order ranks layers by a score; {methods[0]} merges layers instead, use bi")
    require_backend(args.quantize_order)
    started = time.perf_counter()
    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype)
    num_layers = len(find_block_stack(model).blocks)
    remove = _layers_to_remove(num_layers, ratios[0])
    if not 0 < remove < num_layers:
        raise ValueError(f"ratio {ratios[0]} removes {remove} of {num_layers} layers; choose a ratio that removes some "
                         "but not all")
    report = quantization_order(model, tokenizer, remove=remove, method=args.quantize_order,
                                metric=METHOD_ALIASES.get(methods[0], methods[0]), calib=args.calib,
                                samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                                seed=args.seed, ppl_tokens=args.ppl_tokens or None, ppl_window=args.ppl_window)
    report.update(model=args.model, ratio=ratios[0], seconds=round(time.perf_counter() - started, 1))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quantization_order.json").write_text(json.dumps(report, indent=1))
    table = format_order_table(report) + f"\n\nsame layers removed in both orders: {report['same_layers']}\n"
    (out_dir / "quantization_order.md").write_text(table)
    print(table)
    print(f"wrote {out_dir}/quantization_order.json, quantization_order.md in {report['seconds']} s")
    return 0
