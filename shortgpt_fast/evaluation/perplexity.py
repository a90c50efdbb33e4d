"""Perplexity with a sliding window: every token is predicted once, with up to `window - stride` tokens of context."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ShortGPTError


class EvaluationError(ShortGPTError):
    pass


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, window: int = 512, stride: int = 256, max_tokens: Optional[int] = None,
               progress: bool = False) -> dict:
    """Sliding-window perplexity of a 1-D token stream; returns {'ppl', 'nll', 'tokens', 'window', 'stride'}."""
    from tqdm.auto import tqdm

    if stride < 1 or stride > window:
        raise EvaluationError(f"need 1 <= stride <= window, got stride {stride} and window {window}")
    ids = token_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise EvaluationError("the perplexity text has fewer than 2 tokens")
    device = next(model.parameters()).device
    total_nll = 0.0
    counted = 0
    prev_end = 0
    begin = 0
    windows = max(1, math.ceil((ids.numel() - window) / stride) + 1)
    bar = tqdm(total=windows, desc="perplexity", unit="window", disable=not progress)
    while prev_end < ids.numel():
        end = min(begin + window, ids.numel())
        chunk = ids[begin:end].to(device)[None]
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        # Score only the tokens not scored by the previous window; earlier ones are context.
        first_new = max(prev_end, begin + 1) - begin
        targets = chunk[0, first_new:]
        preds = logits[0, first_new - 1:-1]
        total_nll += float(F.cross_entropy(preds, targets, reduction="sum"))
        counted += targets.numel()
        prev_end = end
        # Keep at least one token of overlap, or the first token of the next window would go unscored.
        begin = min(begin + stride, prev_end - 1)
        bar.update(1)
    bar.close()
    nll = total_nll / counted
    return {"ppl": math.exp(nll), "nll": nll, "tokens": counted, "window": window, "stride": stride}


def shared_data_dir() -> Optional[Path]:
    """`../shared/data` beside the project (or $SHORTGPT_FAST_DATA): evaluation sets that are not shipped."""
    import os

    candidates = [os.environ.get("SHORTGPT_FAST_DATA"), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[2].parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


def wikitext2_test_path() -> Optional[Path]:
    root = shared_data_dir()
    path = root / "wikitext-2" / "test.txt" if root else None
    return path if path and path.exists() else None
