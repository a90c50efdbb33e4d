"""Scoring overhead on the real embedded model: our hook-based pass vs a bare forward vs the common naive recipe.

The bare forward (`model.model(...)`, no lm_head) is the machine's own ceiling for any scorer that needs the
activations. The naive recipe is what public tools do: `output_hidden_states=True`, then per layer
`1 - F.cosine_similarity(h[i], h[i+1]).mean().item()` (which also scores the last layer on normed output in 4.x).

    .venv/bin/python bench/bench_scoring.py [--samples 16 --seq-len 256 --batch-size 8 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shortgpt_fast import api
from shortgpt_fast.data.calibration import packed, read_documents
from shortgpt_fast.scoring.block_influence import collect_layer_stats

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    model, tokenizer = api.load("smollm2-135m")
    docs, _ = read_documents(None)
    calib = packed(tokenizer, docs, args.samples, args.seq_len, seed=0)
    batches = [calib.input_ids[i:i + args.batch_size] for i in range(0, args.samples, args.batch_size)]

    def bare():
        for ids in batches:
            model.model(input_ids=ids, use_cache=False)

    def ours():
        collect_layer_stats(model, calib, batch_size=args.batch_size, progress=False)

    def naive():
        values = []
        for ids in batches:
            hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            values.append([(1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()).item()
                           for i in range(len(hs) - 1)])
        return values

    results = {}
    for name, fn in (("bare_forward", bare), ("shortgpt_fast", ours), ("naive_hidden_states", naive)):
        med, times = median_time(fn, args.repeats)
        results[name] = {"median_s": med, "times_s": times, "tokens_per_s": calib.num_tokens / med}
        print(f"{name:>20}: {med:.3f} s  ({calib.num_tokens / med:.0f} tokens/s)")
    ratio_bare = results["shortgpt_fast"]["median_s"] / results["bare_forward"]["median_s"]
    ratio_naive = results["naive_hidden_states"]["median_s"] / results["shortgpt_fast"]["median_s"]
    print(f"scoring time / bare forward = {ratio_bare:.3f};  naive / ours = {ratio_naive:.3f}")
    out = {
        "command": "python bench/bench_scoring.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": "smollm2-135m (30 layers, hidden 576, fp32)",
        "tokens": calib.num_tokens, "batch_size": args.batch_size, "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "results": results,
        "ratios": {"ours_over_bare_forward": ratio_bare, "naive_over_ours": ratio_naive},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scoring_smollm2.json").write_text(json.dumps(out, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3))
    names = list(results)
    ax.barh(names, [results[n]["tokens_per_s"] for n in names], color=["gray", "tab:blue", "tab:orange"])
    ax.set_xlabel("calibration tokens / s (higher is better)")
    ax.set_title(f"SmolLM2-135M scoring, {calib.num_tokens} tokens, {torch.get_num_threads()} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "scoring_smollm2.png", dpi=120)
    print(f"wrote {RESULTS / 'scoring_smollm2.json'}")


if __name__ == "__main__":
    main()
