"""The README's main job: score the embedded model, prune ~25% of its layers, and compare before and after."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

DEMO_MARKER = ".shortgpt-demo"


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _ppl_tokens(tokenizer, max_tokens: int) -> tuple[torch.Tensor, str]:
    from .data import calibration
    from .evaluation.data_dir import wikitext2_test_path

    path = wikitext2_test_path()
    if path is not None:
        # Plenty of characters for max_tokens without tokenizing the whole 1.3 MB file.
        text = path.read_text(encoding="utf-8")[: max_tokens * 12]
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
        return ids, f"WikiText-2 test ({path})"
    docs, name = calibration.read_documents(None)
    return calibration.heldout_tokens(tokenizer, docs)[:max_tokens], f"held-out tail of {name}"


def run_demo(model_name: str, out_dir: Path, *, ratio: float = 0.25, metric: str = "bi", calib=None,
             score_kwargs: Optional[dict] = None, ppl_tokens: int = 4096, ppl_window: int = 512) -> dict:
    """Score `model_name`, write it pruned by `ratio` to `out_dir` (replacing only a folder an earlier demo wrote),
    and print dense vs pruned parameters, perplexity and prefill speed. Returns the summary it saves as JSON.

    score_kwargs: api.score keyword arguments (samples, seq_len, device, dtype, progress, ...).
    """
    from .api import load, prune_to_dir, score
    from .evaluation.perplexity import perplexity
    from .evaluation.throughput import prefill_throughput
    from .models.loading import alias_gguf_file
    from .scoring.layer_table import format_layer_table
    from .scoring.report import removal_count
    from .surgery.gguf_cut import cut_gguf

    kwargs = dict(score_kwargs or {})
    kwargs.pop("streamed", None)  # the demo loads the model once and scores it in memory
    device, dtype = kwargs.get("device", "cpu"), kwargs.get("dtype", "float32")
    seq_len, samples, progress = kwargs.get("seq_len", 256), kwargs.get("samples", 32), kwargs.get("progress", True)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not (out_dir / DEMO_MARKER).exists():
            raise ValueError(f"{out_dir} exists and was not written by the demo; pass --out-dir NEW_FOLDER")
        shutil.rmtree(out_dir)

    print(f"[1/5] loading {model_name}")
    model, tokenizer = load(model_name, device=device, dtype=dtype)
    print(f"[2/5] scoring {samples} x {seq_len} calibration tokens")
    scores = score(model, calib, tokenizer=tokenizer, **kwargs)
    scores.model = model_name
    n_remove = removal_count(scores.num_layers, ratio=ratio)
    layers = scores.select(metric, n_remove)

    print("[3/5] evaluating the dense model")
    ppl_ids, ppl_source = _ppl_tokens(tokenizer, ppl_tokens)
    window = min(ppl_window, ppl_ids.numel())
    dense = {
        "params": _count_params(model),
        "ppl": perplexity(model, ppl_ids, window=window, stride=window // 2, progress=progress)["ppl"],
        "prefill": prefill_throughput(model, seq_len=seq_len)["tokens_per_s"],
    }
    del model

    print(f"[4/5] removing layers {layers} and writing {out_dir}")
    report = prune_to_dir(model_name, out_dir, layers, metric, scores=scores)
    (out_dir / DEMO_MARKER).write_text("written by `shortgpt-fast demo`; the next demo run replaces this folder\n")
    gguf = alias_gguf_file(model_name)
    gguf_sizes = None
    if gguf is not None:
        # The file the embedded model ships as, cut too: its quantized blocks are carried, never re-encoded.
        cut = cut_gguf(gguf, layers, out=out_dir / gguf.name, chosen_by=metric)
        gguf_sizes = (gguf.stat().st_size, sum(Path(p).stat().st_size for p in cut.outputs))
        print(f"      and {gguf.name}: {gguf_sizes[0] / 1e6:.1f} MB -> {gguf_sizes[1] / 1e6:.1f} MB")

    print("[5/5] evaluating the pruned checkpoint, reloaded from disk")
    pruned_model, _ = load(str(out_dir), device=device, dtype=dtype)
    pruned = {
        "params": _count_params(pruned_model),
        "ppl": perplexity(pruned_model, ppl_ids, window=window, stride=window // 2, progress=progress)["ppl"],
        "prefill": prefill_throughput(pruned_model, seq_len=seq_len)["tokens_per_s"],
    }

    print()
    print(format_layer_table(scores, removed=layers))
    print()
    rows = [
        ("layers", f"{scores.num_layers}", f"{scores.num_layers - len(layers)}"),
        ("parameters", f"{dense['params'] / 1e6:.2f} M", f"{pruned['params'] / 1e6:.2f} M"),
        (f"perplexity ({ppl_ids.numel()} tokens)", f"{dense['ppl']:.2f}", f"{pruned['ppl']:.2f}"),
        (f"prefill tokens/s (1 x {seq_len})", f"{dense['prefill']:.0f}", f"{pruned['prefill']:.0f}"),
    ]
    if gguf_sizes is not None:
        rows.append(("GGUF file", f"{gguf_sizes[0] / 1e6:.1f} MB", f"{gguf_sizes[1] / 1e6:.1f} MB"))
    width = max(len(r[0]) for r in rows)
    print(f"model: {model_name}   metric: {metric}   removed ({len(layers)}): {layers}")
    print(f"perplexity text: {ppl_source}")
    stability = report.get("rank_stability") or {}
    if stability:
        print(f"bootstrap: the same {len(layers)} layers are chosen in {100 * stability['same_set_fraction']:.0f}% "
              f"of {report['bootstrap']['resamples']} resamples of the calibration sequences")
    print(f"{'':<{width}}  {'dense':>12}  {'pruned':>12}")
    for name, before, after in rows:
        print(f"{name:<{width}}  {before:>12}  {after:>12}")
    summary = {"model": model_name, "removed": layers, "metric": metric, "dense": dense, "pruned": pruned,
               "ppl_source": ppl_source, "ppl_tokens": int(ppl_ids.numel()),
               "gguf_bytes": None if gguf_sizes is None else {"dense": gguf_sizes[0], "pruned": gguf_sizes[1]},
               "seconds": round(time.perf_counter() - started, 1)}
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out_dir} (checkpoint, {'the cut GGUF, ' if gguf_sizes else ''}report.json, report.png, "
          f"demo_summary.json) in {summary['seconds']} s")
    return summary
