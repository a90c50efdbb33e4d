"""Calibration sensitivity on the embedded SmolLM2-135M: Shakespeare (the embedded corpus), WikiText-2 (test split,
../shared/data) and code (the Python sources of the installed standard library, built offline).

Writes bench/results/calibration_sensitivity.json (per pair Kendall τ and removed-set overlap at the ratio, per source
the layers whose bootstrap CI overlaps the cut line) and the markdown table printed at the end.

    nice -n 19 .venv/bin/python bench/calibration_sensitivity.py [--samples 64 --seq-len 256 --ratio 0.25]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from shortgpt_fast import api
from shortgpt_fast.scoring.calibration_sensitivity import calibration_sensitivity, markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def stdlib_code_jsonl(folder: Path, max_files: int = 400) -> Path:
    """One JSONL document per stdlib module (sorted paths, so the corpus is the same on every run of one Python)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))[:max_files]
    path = folder / "python_stdlib.jsonl"
    with open(path, "w") as fh:
        for p in files:
            fh.write(json.dumps({"text": p.read_text(encoding="utf-8", errors="replace")}) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--out", default=str(RESULTS / "calibration_sensitivity.json"))
    args = parser.parse_args(argv)

    model, tokenizer = api.load("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"shakespeare": None, "wikitext2": str(WIKITEXT), "python_code": str(stdlib_code_jsonl(Path(tmp)))}
        scores, seconds = {}, {}
        for label, source in sources.items():
            started = time.perf_counter()
            scores[label] = api.score(model, source, tokenizer=tokenizer, samples=args.samples, seq_len=args.seq_len,
                                      batch_size=args.batch_size, progress=False)
            seconds[label] = round(time.perf_counter() - started, 2)
            print(f"{label}: {scores[label].tokens} tokens in {seconds[label]} s", file=sys.stderr)
    result = calibration_sensitivity(scores, ratio=args.ratio)
    result["bi"] = {label: [float(v) for v in s.bi] for label, s in scores.items()}
    result["seconds"] = seconds
    result["command"] = "nice -n 19 .venv/bin/python bench/calibration_sensitivity.py " + " ".join(argv or sys.argv[1:])
    result["model"] = "smollm2-135m (30 layers, fp32)"
    result["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                         "threads": torch.get_num_threads()}
    table = markdown_table(result)
    result["markdown"] = table
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table)


if __name__ == "__main__":
    main()
