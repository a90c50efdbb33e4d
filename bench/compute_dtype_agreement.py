"""How much BI and the ranking move between float32 and bfloat16 block compute, on the embedded SmolLM2-135M.

Scores the model streamed twice on the same calibration tokens, activations kept in float32 between blocks, blocks
computing in float32 and in bfloat16 (`--compute-dtype`), and compares the rankings with the calibration-sensitivity
measures (scoring/calibration_sensitivity.py): Kendall τ of BI, the overlap of the removed sets at the ratio, and
the layers whose bootstrap CI overlaps the cut line (a swap among those is inside the calibration noise). Also
records each run's time and which compute dtype `auto` picks on this CPU.

    nice -n 19 .venv/bin/python bench/compute_dtype_agreement.py [--samples 32 --seq-len 256]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shortgpt_fast import api
from shortgpt_fast.scoring.calibration_sensitivity import calibration_sensitivity

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.25)
    args = parser.parse_args(argv)
    tokenizer = api.load_tokenizer("smollm2-135m")
    calib = api.calibration_set(None, tokenizer, samples=args.samples, seq_len=args.seq_len)
    scores, seconds, reasons = {}, {}, {}
    for compute in ("float32", "bfloat16", "auto"):
        started = time.perf_counter()
        s = api.score("smollm2-135m", calib, batch_size=args.batch_size, streamed=True, compute_dtype=compute,
                      progress=False)
        seconds[compute] = round(time.perf_counter() - started, 2)
        reasons[compute] = s.calibration["compute_dtype_reason"]
        if compute != "auto":
            scores[compute] = s
        print(f"{compute}: {seconds[compute]} s ({reasons[compute]})", file=sys.stderr)
    full = calibration_sensitivity(scores, ratio=args.ratio)
    pair = full["pairs"][0]
    bi32, bi16 = (np.asarray(scores[k].bi, dtype=np.float64) for k in ("float32", "bfloat16"))
    result = {
        "model": "smollm2-135m (30 layers), streamed, activations float32",
        "calibration": scores["float32"].calibration | {"compute_dtype": None, "compute_dtype_reason": None},
        "ratio": args.ratio, "n_remove": full["n_remove"],
        "removed": {k: v["removed"] for k, v in full["sources"].items()},
        "ci_overlaps_cut": {k: v["ci_overlaps_cut"] for k, v in full["sources"].items()},
        "kendall_tau": pair["kendall_tau"], "removed_overlap": pair["removed_overlap"],
        "only_float32": pair["only_a"], "only_bfloat16": pair["only_b"],
        "max_relative_bi_difference": float(np.max(np.abs(bi16 - bi32) / np.abs(bi32))),
        "bi": {k: [float(v) for v in s.bi] for k, s in scores.items()},
        "seconds": seconds, "auto_picks": reasons["auto"],
        "command": "nice -n 19 .venv/bin/python bench/compute_dtype_agreement.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compute_dtype_agreement.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("bi", "calibration", "machine")}, indent=1))


if __name__ == "__main__":
    main()
