"""The full span map and the shipped user metrics on the embedded SmolLM2-135M (Shakespeare calibration).

Writes bench/results/span_map_smollm2.json (the report: span_map, euclidean and secretly_linear per layer) and
bench/results/span_map_smollm2.png (the heatmap), and prints the best block per span beside BI's choice.

    nice -n 19 .venv/bin/python bench/span_map.py [--samples 32 --seq-len 256]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shortgpt_fast import api
from shortgpt_fast.scoring.plot import plot_span_map

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    model, tokenizer = api.load("smollm2-135m")
    scores = api.score(model, None, tokenizer=tokenizer, samples=args.samples, seq_len=args.seq_len,
                       batch_size=args.batch_size, angular_span="all", metrics=["euclidean", "secretly_linear"],
                       progress=False)
    report = scores.to_dict()
    report["command"] = "nice -n 19 .venv/bin/python bench/span_map.py " + " ".join(argv or sys.argv[1:])
    (RESULTS / "span_map_smollm2.json").write_text(json.dumps(report, indent=1))
    plot_span_map(scores, RESULTS / "span_map_smollm2.png")
    for n in (4, 8):
        print(f"remove {n}: best block {report['span_map']['best'][str(n)]}, BI {scores.select('bi', n)}, "
              f"euclidean {scores.select('euclidean', n)}, secretly_linear {scores.select('secretly_linear', n)}")


if __name__ == "__main__":
    main()
