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

from ..evaluation.evaluate import check_inputs_early, evaluate, with_stderr
from ..evaluation.quantize import quantize, require_backend
from .quantize_order import format_order_table, quantization_order

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


def compare_to_dir(model_name: str, out_dir, *, ratios: Sequence[float], methods: Sequence[str], eval_kwargs: dict,
                   calib=None, score_kwargs: Optional[dict] = None, quantize_method: Optional[str] = None,
                   log=print) -> dict:
    """Load `model_name` once, score it once on `calib` (api.score with `score_kwargs`), run compare() and write
    compare.json, compare.md and compare.png into `out_dir`; returns the table.

    ratios/methods as parse_ratios/parse_methods accept them; eval_kwargs: evaluation.evaluate() options, checked
    (data folder, task files) before anything loads.
    """
    from ..api import calibration_set, load, score

    ratios, methods = parse_ratios(",".join(map(str, ratios))), parse_methods(",".join(methods))
    score_kwargs = dict(score_kwargs or {})
    check_inputs_early(eval_kwargs)
    if quantize_method:
        require_backend(quantize_method)
    if not eval_kwargs.get("progress", True):
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    started = time.perf_counter()
    model, tokenizer = load(model_name, device=score_kwargs.get("device", "cpu"),
                            dtype=score_kwargs.get("dtype", "float32"))
    samples, seq_len = score_kwargs.get("samples", 32), score_kwargs.get("seq_len", 256)
    log(f"scoring {model_name} once on {samples} x {seq_len} calibration tokens")
    score_kwargs["streamed"] = None  # the model is in memory already
    scores = score(model, calib, tokenizer=tokenizer, **score_kwargs)
    scores.model = model_name
    laco_calibration = None
    if "laco" in methods:
        laco_calibration = calibration_set(calib, tokenizer, samples=min(samples, LACO_SEQUENCES), seq_len=seq_len,
                                           seed=score_kwargs.get("seed", 0))
    table = compare(model, tokenizer, scores, ratios=ratios, methods=methods, eval_kwargs=eval_kwargs,
                    quantize_method=quantize_method, laco_calibration=laco_calibration, log=log)
    table["seconds"] = round(time.perf_counter() - started, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(table, indent=1))
    markdown = markdown_table(table)
    (out_dir / "compare.md").write_text(markdown)
    plot(table, out_dir / "compare.png")
    log(markdown)
    log(f"wrote {out_dir}/compare.json, compare.md, compare.png in {table['seconds']} s")
    return table


def quantization_order_to_dir(model_name: str, out_dir, *, ratio: float, method: str, quantize_method: str,
                              calib=None, samples: int = 32, seq_len: int = 256, batch_size: int = 8, seed: int = 0,
                              ppl_tokens: Optional[int] = None, ppl_window: int = 512, device: str = "cpu",
                              dtype: str = "float32", log=print) -> dict:
    """The paper's Table 5 at one (ratio, method): quantize -> score -> prune against score -> prune -> quantize,
    perplexity on the calibration text's held-out tail; writes quantization_order.json and .md, returns the report.
    Refuses a ratio that removes no layer or all of them, and a merge method (laco), which has no score ranking."""
    from ..api import load
    from ..models.architectures import find_block_stack

    (method,) = parse_methods(method)
    if method in MERGE_METHODS:
        raise ValueError(f"--quantize-order ranks layers by a score; {method} merges layers instead, use bi")
    require_backend(quantize_method)
    started = time.perf_counter()
    model, tokenizer = load(model_name, device=device, dtype=dtype)
    num_layers = len(find_block_stack(model).blocks)
    remove = _layers_to_remove(num_layers, ratio)
    if not 0 < remove < num_layers:
        raise ValueError(f"ratio {ratio} removes {remove} of {num_layers} layers; choose a ratio that removes some "
                         "but not all")
    report = quantization_order(model, tokenizer, remove=remove, method=quantize_method,
                                metric=METHOD_ALIASES.get(method, method), calib=calib, samples=samples,
                                seq_len=seq_len, batch_size=batch_size, seed=seed, ppl_tokens=ppl_tokens,
                                ppl_window=ppl_window)
    report.update(model=model_name, ratio=ratio, seconds=round(time.perf_counter() - started, 1))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quantization_order.json").write_text(json.dumps(report, indent=1))
    table = format_order_table(report) + f"\n\nsame layers removed in both orders: {report['same_layers']}\n"
    (out_dir / "quantization_order.md").write_text(table)
    log(table)
    log(f"wrote {out_dir}/quantization_order.json, quantization_order.md in {report['seconds']} s")
    return report
