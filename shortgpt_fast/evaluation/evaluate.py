"""`evaluate`: every measurement of one in-memory model as a JSON-ready dict, and the tables that show it.

It works on an in-memory model, so `compare` can prune once per setting and evaluate without saving. Task data is
read from the shared data folder at run time (see data_dir.resolve_data_dir); nothing is copied into the package.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .data_dir import resolve_data_dir
from .generation import generate_samples, generation_collapse
from .perplexity import PPL_SOURCES, perplexity, perplexity_tokens
from .quantize import model_bytes
from .tasks import check_task_inputs, run_tasks
from .throughput import forward_flops_per_token, measure_throughput


def evaluate(model: nn.Module, tokenizer, *, ppl: Optional[str] = "wikitext2", ppl_tokens: Optional[int] = 4096,
             ppl_window: int = 512, ppl_stride: Optional[int] = None, tasks: Sequence[str] = (),
             limit: Optional[int] = None, batch_size: int = 8, throughput: bool = False,
             throughput_batches: Sequence[int] = (1, 8), throughput_seq_len: int = 256, throughput_repeats: int = 5,
             decode_tokens: int = 32, generate: bool = False, max_new_tokens: int = 32,
             shortgpt_gen_layers: Sequence[int] = (),
             data_dir: Optional[str] = None, progress: bool = False) -> dict:
    """Evaluate an in-memory model; every part is optional and the result is a JSON-ready dict.

    With `generate` and `shortgpt_gen_layers` (indices of `model`, which is then the dense model), the result also
    holds "generation_collapse": the same prompts generated with those layers removed and in ShortGPT-gen mode,
    beside the dense continuation (generation.generation_collapse).
    """
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
        if shortgpt_gen_layers:
            result["generation_collapse"] = generation_collapse(model, tokenizer, shortgpt_gen_layers,
                                                                max_new_tokens=max_new_tokens)
    return result


def check_inputs_early(kwargs: dict) -> None:
    """Given evaluate()'s keyword arguments, fail on a missing data folder or a malformed task file before minutes go into loading and scoring."""
    if kwargs["ppl"] in PPL_SOURCES:
        resolve_data_dir(kwargs["data_dir"])
    check_task_inputs(kwargs["tasks"], kwargs["data_dir"])


def with_stderr(value: float, stderr: Optional[float], fmt: str) -> str:
    """`value ± stderr`, or the value alone where lm-eval has no stderr (a single document)."""
    return fmt.format(value) + (f" ± {fmt.format(stderr)}" if stderr is not None else "")


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
                             with_stderr(task[metric], task[metric + "_stderr"], "{:.4f}"), task[metric]))
    for phase in ("prefill", "decode"):
        for batch, t in result.get("throughput", {}).get(phase, {}).items():
            rows.append((f"{phase} tokens/s (batch {batch})", f"{t['tokens_per_s']:.1f}", t["tokens_per_s"]))
    if "generate" in result:
        for key, value in result["generate"]["mean"].items():
            rows.append((f"generation {key}", f"{value:.3f}", value))
    for mode in ("removal", "shortgpt_gen"):
        for key, value in result.get("generation_collapse", {}).get(mode, {}).get("mean", {}).items():
            rows.append((f"{mode} generation {key}", f"{value:.3f}", value))
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
