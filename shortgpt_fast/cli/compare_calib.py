"""`shortgpt-fast compare-calib MODEL --calib A --calib B [...] --out REPORT`: how much the layers chosen depend on the
calibration text (per pair Kendall τ and removed-set overlap; layers whose CI overlaps the cut line)."""
from __future__ import annotations

import json
from pathlib import Path

from .. import cli_types as T
from .common import add_model_argument, add_runtime_flags
from .score import add_scoring_extras


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compare-calib", help="compare the layer rankings of several calibration sources")
    add_model_argument(p)
    p.add_argument("--calib", action="append", required=True, metavar="SOURCE",
                   help="a calibration source, at least two: text file/folder, .jsonl, a `datasets` name, or "
                        "'shakespeare' (the embedded corpus); label=SOURCE names it in the table")
    p.add_argument("--out", required=True, help="JSON path for the comparison")
    p.add_argument("--ratio", type=T.open_ratio, default=0.25, help="fraction of layers removed (default 0.25)")
    p.add_argument("--rank-by", default="bi", help="bi, or a user metric given with --metric (default bi)")
    p.add_argument("--samples", type=T.positive_int, default=32)
    p.add_argument("--seq-len", type=T.int_at_least(2), default=256)
    p.add_argument("--batch-size", type=T.positive_int, default=8)
    p.add_argument("--seed", type=T.non_negative_int, default=0)
    p.add_argument("--text-field", default="text")
    add_runtime_flags(p)
    add_scoring_extras(p)
    p.set_defaults(func=run)


def _sources(values: list) -> dict:
    sources = {}
    for value in values:
        label, sep, source = value.partition("=")
        if not sep:
            label, source = Path(value).name or value, value
        sources[label] = None if source == "shakespeare" else source
    return sources


def run(args) -> int:
    from ..api import compare_calibrations
    from ..scoring.calibration_sensitivity import markdown_table

    result = compare_calibrations(
        args.model, _sources(args.calib), ratio=args.ratio, metric=args.rank_by, device=args.device, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, samples=args.samples, seq_len=args.seq_len,
        batch_size=args.batch_size, seed=args.seed, text_field=args.text_field, progress=not args.quiet,
        metrics=args.user_metrics or (), quantize=args.quantize)
    result.pop("scores")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(markdown_table(result))
    print(f"report: {out}")
    return 0
