"""The README's main job: score the embedded model, prune ~25% of its layers, and compare before and after."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

DEMO_MARKER = ".shortgpt-demo"


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _ppl_tokens(tokenizer, max_tokens: int) -> tuple[torch.Tensor, str]:
    from .data import calibration
    from .evaluation.perplexity import wikitext2_test_path

    path = wikitext2_test_path()
    if path is not None:
        # Plenty of characters for max_tokens without tokenizing the whole 1.3 MB file.
        text = path.read_text(encoding="utf-8")[: max_tokens * 12]
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
        return ids, f"WikiText-2 test ({path})"
    docs, name = calibration.read_documents(None)
    return calibration.heldout_tokens(tokenizer, docs)[:max_tokens], f"held-out tail of {name}"


def run_demo(args) -> int:
    from .api import load, prune_to_dir
    from .cli import _score_from_args, format_layer_table
    from .evaluation.perplexity import perplexity
    from .evaluation.throughput import prefill_tokens_per_second
    from .scoring.report import removal_count

    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    if out_dir.exists():
        if not (out_dir / DEMO_MARKER).exists():
            raise ValueError(f"{out_dir} exists and was not written by the demo; pass --out-dir NEW_FOLDER")
        shutil.rmtree(out_dir)

    print(f"[1/5] loading {args.model}")
    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype)
    print(f"[2/5] scoring {args.samples} x {args.seq_len} calibration tokens")
    scores = _score_from_args(args, model=model, tokenizer=tokenizer)
    scores.model = args.model
    n_remove = removal_count(scores.num_layers, ratio=args.ratio)
    layers = scores.select(args.metric, n_remove)

    print("[3/5] evaluating the dense model")
    ppl_ids, ppl_source = _ppl_tokens(tokenizer, args.ppl_tokens)
    window = min(args.ppl_window, ppl_ids.numel())
    dense = {
        "params": _count_params(model),
        "ppl": perplexity(model, ppl_ids, window=window, stride=window // 2, progress=not args.quiet)["ppl"],
        "prefill": prefill_tokens_per_second(model, seq_len=args.seq_len)["tokens_per_s"],
    }
    del model

    print(f"[4/5] removing layers {layers} and writing {out_dir}")
    report = prune_to_dir(args.model, out_dir, layers, args.metric, scores=scores)
    (out_dir / DEMO_MARKER).write_text("written by `shortgpt-fast demo`; the next demo run replaces this folder\n")

    print("[5/5] evaluating the pruned checkpoint, reloaded from disk")
    pruned_model, _ = load(str(out_dir), device=args.device, dtype=args.dtype)
    pruned = {
        "params": _count_params(pruned_model),
        "ppl": perplexity(pruned_model, ppl_ids, window=window, stride=window // 2, progress=not args.quiet)["ppl"],
        "prefill": prefill_tokens_per_second(pruned_model, seq_len=args.seq_len)["tokens_per_s"],
    }

    print()
    print(format_layer_table(scores, removed=layers))
    print()
    rows = [
        ("layers", f"{scores.num_layers}", f"{scores.num_layers - len(layers)}"),
        ("parameters", f"{dense['params'] / 1e6:.2f} M", f"{pruned['params'] / 1e6:.2f} M"),
        (f"perplexity ({ppl_ids.numel()} tokens)", f"{dense['ppl']:.2f}", f"{pruned['ppl']:.2f}"),
        (f"prefill tokens/s (1 x {args.seq_len})", f"{dense['prefill']:.0f}", f"{pruned['prefill']:.0f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"model: {args.model}   metric: {args.metric}   removed ({len(layers)}): {layers}")
    print(f"perplexity text: {ppl_source}")
    stability = report.get("rank_stability") or {}
    if stability:
        print(f"bootstrap: the same {len(layers)} layers are chosen in {100 * stability['same_set_fraction']:.0f}% "
              f"of {report['bootstrap']['resamples']} resamples of the calibration sequences")
    print(f"{'':<{width}}  {'dense':>12}  {'pruned':>12}")
    for name, before, after in rows:
        print(f"{name:<{width}}  {before:>12}  {after:>12}")
    summary = {"model": args.model, "removed": layers, "metric": args.metric, "dense": dense, "pruned": pruned,
               "ppl_source": ppl_source, "ppl_tokens": int(ppl_ids.numel()),
               "seconds": round(time.perf_counter() - started, 1)}
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out_dir} (checkpoint, report.json, report.png, demo_summary.json) in {summary['seconds']} s")
    return 0
