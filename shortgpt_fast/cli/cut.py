"""`shortgpt-fast cut CHECKPOINT --layers ...`: remove layers from a checkpoint on disk without loading the model.

CHECKPOINT is a safetensors folder or a .gguf file (any part of a split set), cut by surgery/gguf_cut.py.

This path never imports torch (tens of MB instead of hundreds, and no multi-second import): the engine is the C++
extension, and the structure proof runs in a child process (shortgpt_fast/surgery/verify_structure.py).
"""
from __future__ import annotations

import argparse

from .common import add_no_verify_flag


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "cut",
        help="remove layers from a safetensors checkpoint folder or a GGUF file without loading the model",
        description="Remove whole layers from a safetensors checkpoint (sharded or single-file) without loading it. "
                    "Only changed bytes are rewritten; config.json, the index and the model card are updated.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (config.json + model.safetensors[.index.json]), or a .gguf "
                                      "file (for a split set, any part; --out names the first output part)")
    p.add_argument("--layers", required=True, help="layers to remove, original numbering, e.g. 21,22,25 or 21-25")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="write the result to this new (or empty) folder; the source is only read")
    mode.add_argument("--in-place", action="store_true",
                      help="edit the checkpoint itself, crash-safely: rerun the same command after any crash")
    p.add_argument("--verify", action="store_true", help="reopen the result and check every kept tensor's bytes")
    add_no_verify_flag(p)
    p.add_argument("--copy-method", default="auto", choices=("auto", "copy_file_range", "readwrite"),
                   help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint.endswith(".gguf"):
        return run_gguf(args)
    from ..surgery.checkpoint import CONFIG_NAME, cut_checkpoint

    result = cut_checkpoint(args.checkpoint, args.layers, out=args.out, in_place=args.in_place,
                            verify=args.verify, copy_method=args.copy_method, check=not args.no_verify)
    kept = result.num_layers - len(result.removed)
    if result.already_done:
        print(f"already done: layers {result.removed} were removed from {result.output} by an earlier run of this cut "
              f"(recorded in {CONFIG_NAME}); nothing changed. To remove more layers, use the current numbering "
              f"0-{kept - 1}")
        return 0
    print(f"removed layers {result.removed} ({kept} remain) -> {result.output}: {result.shards_written} shards, "
          f"{result.bytes_copied / 1e9:.2f} GB copied in {result.seconds:.2f} s"
          + (" (resumed an interrupted cut)" if result.resumed else "")
          + (", every kept tensor verified" if result.verified else ""))
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    from ..surgery.gguf_cut import cut_gguf

    if args.verify:
        print("note: --verify applies to safetensors checkpoints; a GGUF cut always re-reads the written headers")
    result = cut_gguf(args.checkpoint, args.layers, out=args.out, in_place=args.in_place,
                      copy_method=args.copy_method, check=not args.no_verify)
    kept = result.num_layers - len(result.removed)
    if result.already_done:
        print(f"already done: layers {result.removed} were removed from {result.outputs[0]} by an earlier run of this "
              f"cut (recorded in its shortgpt_fast.cut metadata); nothing changed. To remove more layers, use the "
              f"current numbering 0-{kept - 1}")
        return 0
    size = sum(p.stat().st_size for p in result.outputs)
    print(f"removed layers {result.removed} ({kept} remain) -> {', '.join(map(str, result.outputs))}: "
          f"{size / 1e9:.2f} GB, {result.bytes_copied / 1e9:.2f} GB copied in {result.seconds:.2f} s ({result.method})"
          + (" (resumed an interrupted cut)" if result.resumed else ""))
    return 0
