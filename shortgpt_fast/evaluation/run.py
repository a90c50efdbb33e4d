"""`shortgpt-fast eval`: perplexity, zero-shot tasks through lm-evaluation-harness, throughput and a generation check.

`evaluate()` works on an in-memory model, so `compare` can prune once per setting and evaluate without saving.
Task data is read from the shared data folder at run time (see `resolve_data_dir`); nothing is copied into the package.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .. import cli_types as T
from .perplexity import EvaluationError, perplexity, shared_data_dir
from .quantize import METHODS, model_bytes, quantize, require_backend

TASKS_DIR = Path(__file__).with_name("tasks")
# Short names for the task YAMLs shipped in tasks/; any other name is handed to lm-eval's own registry.
LOCAL_TASKS = {"piqa": "piqa_local", "arc_easy": "arc_easy_local"}
PPL_SOURCES = {"wikitext2": "wikitext-2/test.txt", "wikitext2-valid": "wikitext-2/valid.txt"}
GENERATION_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "To make a cup of tea, you",
    "The most important scientific discovery of the twentieth century was",
)


def resolve_data_dir(data_dir: Optional[str] = None) -> Path:
    """The evaluation data folder: --data-dir, else $SHORTGPT_FAST_DATA, else `../shared/data`.

    An explicitly named folder that is missing is an error rather than a silent fall-back to another folder.
    """
    explicit = data_dir or os.environ.get("SHORTGPT_FAST_DATA")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            source = "--data-dir" if data_dir else "$SHORTGPT_FAST_DATA"
            raise EvaluationError(f"evaluation data folder {path} ({source}) does not exist")
        return path.resolve()
    found = shared_data_dir()
    if found is None:
        raise EvaluationError("no evaluation data folder: put it at ../shared/data, set $SHORTGPT_FAST_DATA "
                              "or pass --data-dir")
    return found


# ---- perplexity -------------------------------------------------------------------------------------------------
def perplexity_tokens(tokenizer, source: str, max_tokens: Optional[int], data_dir: Optional[str] = None):
    """Token ids of a perplexity text (a PPL_SOURCES name or a text file) and a description of where it came from."""
    if source in PPL_SOURCES:
        path = resolve_data_dir(data_dir) / PPL_SOURCES[source]
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise EvaluationError(f"perplexity text {path} does not exist; use one of {sorted(PPL_SOURCES)} or a .txt file")
    text = path.read_text(encoding="utf-8")
    if max_tokens is not None:
        # Tokenizing the whole 1.3 MB WikiText-2 test file costs more than a short evaluation; no tokenizer
        # produces fewer than one token per 12 characters of English.
        text = text[: max_tokens * 12]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids, str(path)


# ---- lm-eval tasks ----------------------------------------------------------------------------------------------
def _jsonl_task_config(path: Path) -> dict:
    """An inline lm-eval task for a user's {query, choices, gold} jsonl file, prompted like the ARC-Easy YAML."""
    from .tasks.local_data import load_multiple_choice_jsonl

    return {
        "task": f"mc_{path.stem}",
        "custom_dataset": load_multiple_choice_jsonl,
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{query}}\nAnswer:",
        "doc_to_target": "gold",
        "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _require_lm_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise EvaluationError("--tasks needs lm-evaluation-harness; run: pip install 'shortgpt-fast[eval]'")


def _task_specs(tasks: Sequence[str], data_dir: Optional[str]):
    """lm-eval task specs, the report name of each, and a TaskManager that knows them all."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    specs, names, registry_names = [], {}, []
    for task in tasks:
        if task in LOCAL_TASKS:
            specs.append(LOCAL_TASKS[task])
            names[LOCAL_TASKS[task]] = task
        elif task.endswith(".jsonl"):
            path = Path(task).expanduser()
            if not path.is_file():
                raise EvaluationError(f"task file {path} does not exist")
            config = _jsonl_task_config(path)
            specs.append(config)
            names[config["task"]] = task
        else:
            specs.append(task)
            names[task] = task
            registry_names.append(task)
    needs_local_data = any(task in LOCAL_TASKS for task in tasks)
    metadata = {"data_dir": str(resolve_data_dir(data_dir))} if needs_local_data else {}
    # Indexing lm-eval's ~15k built-in task YAMLs takes seconds, so do it only when a built-in task is asked for.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(registry_names), metadata=metadata)
    unknown = [name for name in registry_names if name not in manager.all_tasks]
    if unknown:
        raise EvaluationError(f"unknown task {', '.join(map(repr, unknown))}; local tasks are "
                              f"{', '.join(LOCAL_TASKS)} or a {{query, choices, gold}} .jsonl file, and any "
                              f"lm-eval task name (list them with `lm-eval ls tasks`)")
    return specs, names, manager


class _CustomDatasetHintFilter(logging.Filter):
    """lm-eval advises every custom_dataset task to take kwargs from `--metadata`; our loaders get the data folder
    from shortgpt_fast, so the advice only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_CustomDatasetHintFilter())


def run_tasks(model: nn.Module, tokenizer, tasks: Sequence[str], *, limit: Optional[int] = None, batch_size: int = 8,
              data_dir: Optional[str] = None, log_samples: bool = False) -> dict:
    """Zero-shot accuracy (acc, acc_norm and their stderr, as lm-eval reports them) of the in-memory model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs, names, manager = _task_specs(tasks, data_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # acc/acc_norm stderr is closed-form; the bootstrap only serves other metrics, and 100k resamples cost minutes.
    results = simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager, log_samples=log_samples,
                              bootstrap_iters=1000)
    report = {}
    for lm_name, name in names.items():
        row = results["results"][lm_name]
        counts = results.get("n-samples", {}).get(lm_name, {})  # groups of lm-eval tasks have no count of their own
        entry = {"task": lm_name, "docs": counts.get("effective"), "docs_available": counts.get("original")}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in row:
                entry[metric] = float(row[f"{metric},none"])
                entry[f"{metric}_stderr"] = float(row[f"{metric}_stderr,none"])
        if log_samples:
            entry["samples"] = results["samples"][lm_name]
        report[name] = entry
    return report


# ---- throughput -------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_throughput(model: nn.Module, batch: int, seq_len: int, repeats: int, warmup: int, seed: int = 0) -> dict:
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"tokens_per_s": batch * seq_len / median, "median_s": median, "batch": batch, "seq_len": seq_len,
            "repeats": repeats}


@torch.no_grad()
def decode_throughput(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, repeats: int, warmup: int,
                      seed: int = 0) -> dict:
    """Tokens/s of one-token steps through the KV cache after a prompt; the prompt's prefill is not timed."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    times = []
    for i in range(warmup + repeats):
        out = model(input_ids=ids, use_cache=True)
        cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"tokens_per_s": batch * new_tokens / median, "median_s": median, "batch": batch,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}


def measure_throughput(model: nn.Module, *, batches: Sequence[int] = (1, 8), seq_len: int = 256,
                       new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> dict:
    return {
        "prefill": {str(b): prefill_throughput(model, b, seq_len, repeats, warmup) for b in batches},
        "decode": {str(b): decode_throughput(model, b, seq_len, new_tokens, repeats, warmup) for b in batches},
    }


def forward_flops_per_token(model: nn.Module, context: int) -> float:
    """Forward FLOPs for one token at `context` tokens of context: 2 per weight of every linear layer (lm_head
    included, embeddings excluded since they are a lookup) plus the attention score and value products."""
    from ..models.architectures import find_block_stack

    # From the layer shapes, not weight.numel(): a bitsandbytes 4-bit weight is stored as packed bytes.
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = len(find_block_stack(model).blocks)
    return 2.0 * linear + layers * 4.0 * context * heads * head_dim


# ---- generation -------------------------------------------------------------------------------------------------
def degeneration(token_ids: Sequence[int], n: int = 4) -> dict:
    """distinct-1/2 (unique over total n-grams) and the share of n-grams that already occurred earlier: looping
    text has low distinct-n and a high repeated share."""
    def ngrams(k):
        return [tuple(token_ids[i:i + k]) for i in range(len(token_ids) - k + 1)]

    def distinct(k):
        grams = ngrams(k)
        return len(set(grams)) / len(grams) if grams else 0.0

    grams = ngrams(n)
    seen, repeated = set(), 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return {"distinct_1": distinct(1), "distinct_2": distinct(2),
            f"repeated_{n}gram_fraction": repeated / len(grams) if grams else 0.0}


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer, prompts: Sequence[str] = GENERATION_PROMPTS,
                     max_new_tokens: int = 32) -> dict:
    """Greedy continuations of fixed prompts and their repetition measures, per prompt and averaged."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                             pad_token_id=pad_id)
        new_ids = out[0, ids["input_ids"].shape[1]:].tolist()
        samples.append({"prompt": prompt, "continuation": tokenizer.decode(new_ids, skip_special_tokens=True),
                        "token_ids": new_ids, **degeneration(new_ids)})
    keys = [k for k in samples[0] if k.startswith(("distinct", "repeated"))]
    return {"max_new_tokens": max_new_tokens, "samples": samples,
            "mean": {k: statistics.fmean(s[k] for s in samples) for k in keys}}


# ---- the whole evaluation ---------------------------------------------------------------------------------------
def evaluate(model: nn.Module, tokenizer, *, ppl: Optional[str] = "wikitext2", ppl_tokens: Optional[int] = 4096,
             ppl_window: int = 512, ppl_stride: Optional[int] = None, tasks: Sequence[str] = (),
             limit: Optional[int] = None, batch_size: int = 8, throughput: bool = False,
             throughput_batches: Sequence[int] = (1, 8), throughput_seq_len: int = 256, throughput_repeats: int = 5,
             decode_tokens: int = 32, generate: bool = False, max_new_tokens: int = 32,
             data_dir: Optional[str] = None, progress: bool = False) -> dict:
    """Evaluate an in-memory model; every part is optional and the result is a JSON-ready dict."""
    from ..models.architectures import find_block_stack

    config = model.config
    result = {"model": getattr(config, "name_or_path", "") or type(model).__name__,
              "layers": len(find_block_stack(model).blocks),
              "params": sum(p.numel() for p in model.parameters()), "bytes": model_bytes(model),
              "flops_per_token": forward_flops_per_token(model, throughput_seq_len // 2)}
    if ppl:
        ids, source = perplexity_tokens(tokenizer, ppl, ppl_tokens, data_dir)
        window = min(ppl_window, ids.numel())
        stride = min(ppl_stride or max(1, window // 2), window)
        result["perplexity"] = dict(perplexity(model, ids, window=window, stride=stride, progress=progress),
                                    source=source)
    if tasks:
        result["tasks"] = run_tasks(model, tokenizer, tasks, limit=limit, batch_size=batch_size, data_dir=data_dir)
    if throughput:
        result["throughput"] = measure_throughput(model, batches=throughput_batches, seq_len=throughput_seq_len,
                                                  new_tokens=decode_tokens, repeats=throughput_repeats)
    if generate:
        result["generate"] = generate_samples(model, tokenizer, max_new_tokens=max_new_tokens)
    return result


# ---- reporting --------------------------------------------------------------------------------------------------
def _rows(result: dict) -> list[tuple[str, str, Optional[float]]]:
    """(label, formatted value, raw value) for every reported number of one model."""
    rows = [("layers", str(result["layers"]), result["layers"]),
            ("parameters (M)", f"{result['params'] / 1e6:.2f}", result["params"]),
            ("GFLOPs/token", f"{result['flops_per_token'] / 1e9:.3f}", result["flops_per_token"])]
    if "bytes" in result:
        rows.append(("weights (MB)", f"{result['bytes'] / 1e6:.2f}", result["bytes"]))
    if "perplexity" in result:
        p = result["perplexity"]
        rows.append((f"perplexity ({p['tokens']} tok, window {p['window']})", f"{p['ppl']:.3f}", p["ppl"]))
    for name, task in result.get("tasks", {}).items():
        for metric in ("acc", "acc_norm"):
            if metric in task:
                rows.append((f"{name} {metric} (n={task['docs']})",
                             f"{task[metric]:.4f} ± {task[metric + '_stderr']:.4f}", task[metric]))
    for phase in ("prefill", "decode"):
        for batch, t in result.get("throughput", {}).get(phase, {}).items():
            rows.append((f"{phase} tokens/s (batch {batch})", f"{t['tokens_per_s']:.1f}", t["tokens_per_s"]))
    if "generate" in result:
        for key, value in result["generate"]["mean"].items():
            rows.append((f"generation {key}", f"{value:.3f}", value))
    return rows


def format_table(results: dict[str, dict]) -> str:
    """One column per model; with two models (original first) a ratio column, where throughput rows are the
    measured speed-up and an extra row gives the ideal speed-up from the FLOPs ratio."""
    labels = list(results)
    per_model = {label: _rows(r) for label, r in results.items()}
    names = [row[0] for row in per_model[labels[0]]]
    compare = len(labels) == 2
    header = ["metric"] + labels + (["pruned/original"] if compare else [])
    lines = []
    for i, name in enumerate(names):
        cells = [name] + [per_model[label][i][1] if i < len(per_model[label]) else "" for label in labels]
        if compare:
            before, after = per_model[labels[0]][i][2], per_model[labels[1]][i][2]
            cells.append(f"{after / before:.3f}" if before else "")
        lines.append(cells)
    if compare:
        ideal = results[labels[0]]["flops_per_token"] / results[labels[1]]["flops_per_token"]
        lines.append(["ideal speed-up (FLOPs ratio)", "", "", f"{ideal:.3f}"])
    widths = [max(len(str(row[c])) for row in [header] + lines) for c in range(len(header))]
    out = ["  ".join(h.ljust(w) if c == 0 else h.rjust(w) for c, (h, w) in enumerate(zip(header, widths)))]
    out += ["  ".join(str(v).ljust(w) if c == 0 else str(v).rjust(w) for c, (v, w) in enumerate(zip(row, widths)))
            for row in lines]
    return "\n".join(out)


def format_generations(results: dict[str, dict]) -> str:
    labels = [label for label, r in results.items() if "generate" in r]
    if not labels:
        return ""
    first = results[labels[0]]["generate"]["samples"]
    out = []
    for i, sample in enumerate(first):
        out.append(f"prompt: {sample['prompt']!r}")
        for label in labels:
            s = results[label]["generate"]["samples"][i]
            out.append(f"  {label:>8}: {s['continuation']!r}  (distinct-2 {s['distinct_2']:.2f}, "
                       f"repeated 4-grams {s['repeated_4gram_fraction']:.2f})")
    return "\n".join(out)


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


def check_inputs_early(kwargs: dict) -> None:
    """Fail on a missing data folder or a malformed task file before minutes go into loading and scoring."""
    from .tasks.local_data import load_multiple_choice_jsonl

    if kwargs["ppl"] in PPL_SOURCES or any(task in LOCAL_TASKS for task in kwargs["tasks"]):
        resolve_data_dir(kwargs["data_dir"])
    for task in kwargs["tasks"]:
        if task.endswith(".jsonl"):
            load_multiple_choice_jsonl({"test": task})


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
