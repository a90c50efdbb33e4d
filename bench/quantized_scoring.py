"""How far a ranking scored directly on a 4-bit model is from the full-precision one, on the embedded SmolLM2-135M.

Scores the float32 model, its bitsandbytes NF4 copy and its torchao int4 copy (evaluation/quantize.py, the same
quantizers as `eval --quantize`) on the same calibration tokens, and compares each 4-bit ranking with float32:
Kendall τ of BI and the overlap of the removed sets at the ratio (scoring/calibration_sensitivity.py). Writes
bench/results/quantized_scoring.json and .png (BI per layer of each, removed layers marked); --replot redraws the
figure from the JSON.

    nice -n 19 .venv/bin/python bench/quantized_scoring.py [--samples 64 --seq-len 256 --ratio 0.25]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from shortgpt_fast import api
from shortgpt_fast.evaluation.quantize import quantize
from shortgpt_fast.scoring.calibration_sensitivity import calibration_sensitivity

RESULTS = Path(__file__).resolve().parent / "results"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    for (label, bi), marker in zip(result["bi"].items(), "os^"):
        ax.plot(range(len(bi)), bi, marker=marker, markersize=4, lw=1, label=label)
        removed = result["removed"][label]
        ax.plot(removed, [bi[i] for i in removed], marker=marker, markersize=9, lw=0, mfc="none", color="tab:red")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("Block Influence")
    rows = ", ".join(f"{m}: τ {r['kendall_tau']:.2f}, overlap {round(r['removed_overlap'] * result['n_remove'])}/"
                     f"{result['n_remove']}" for m, r in result["vs_float32"].items())
    ax.set_title(f"{result['model']}: BI scored on 4-bit copies vs float32 ({rows}); red rings = removed", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--methods", default="nf4,int4")
    parser.add_argument("--out", default=str(RESULTS / "quantized_scoring.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from --out")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return

    model, tokenizer = api.load("smollm2-135m")
    calib = api.calibration_set(None, tokenizer, samples=args.samples, seq_len=args.seq_len)
    variants = {"float32": lambda: model}
    for method in args.methods.split(","):
        variants[method] = lambda method=method: quantize(model, method)
    scores, seconds = {}, {}
    for label, build in variants.items():
        net = build()
        started = time.perf_counter()
        scores[label] = api.score(net, calib, batch_size=args.batch_size, progress=False)
        seconds[label] = round(time.perf_counter() - started, 2)
        print(f"{label}: scored in {seconds[label]} s", file=sys.stderr)
    full = calibration_sensitivity(scores, ratio=args.ratio)
    vs_float = [p for p in full["pairs"] if p["a"] == "float32"]
    result = {
        "model": "smollm2-135m (30 layers)",
        "calibration": scores["float32"].calibration,
        "ratio": args.ratio, "n_remove": full["n_remove"],
        "removed": {label: s["removed"] for label, s in full["sources"].items()},
        "vs_float32": {p["b"]: {"kendall_tau": p["kendall_tau"], "removed_overlap": p["removed_overlap"],
                                "only_float32": p["only_a"], "only_4bit": p["only_b"]} for p in vs_float},
        "bi": {label: [float(v) for v in s.bi] for label, s in scores.items()},
        "seconds": seconds,
        "command": "nice -n 19 .venv/bin/python bench/quantized_scoring.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(result, Path(args.out).with_suffix(".png"))
    for method, row in result["vs_float32"].items():
        n = result["n_remove"]
        print(f"{method}: Kendall tau {row['kendall_tau']:.3f}, removed-set overlap "
              f"{round(row['removed_overlap'] * n)}/{n}, only float32 {row['only_float32']}, "
              f"only {method} {row['only_4bit']}")


if __name__ == "__main__":
    main()
