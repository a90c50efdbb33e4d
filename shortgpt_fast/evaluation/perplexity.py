"""Perplexity with a sliding window: every token is predicted once, with up to `window - stride` tokens of context."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import EvaluationError
from .data_dir import resolve_data_dir

# Perplexity texts by name, relative to the evaluation data folder.
PPL_SOURCES = {"wikitext2": "wikitext-2/test.txt", "wikitext2-valid": "wikitext-2/valid.txt"}


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


def perplexity_tokens(tokenizer, source: str, max_tokens: Optional[int], data_dir: Optional[str] = None):
    """Token ids (1-D long tensor) of a perplexity text (a PPL_SOURCES name or a text file) and where it came from;
    refuses a text file that does not exist."""
    if source in PPL_SOURCES:
        path = resolve_data_dir(data_dir) / PPL_SOURCES[source]
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise EvaluationError(f"perplexity text {path} does not exist; use one of {sorted(PPL_SOURCES)} or a .txt file")
    text = path.read_text(encoding="utf-8")
    if max_tokens is not None:
        # Tokenizing the whole 1.3 MB WikiText-2 test file costs more than a short evaluation; no tokenizer
        # produces fewer than one token per 12 characters of English.
        text = text[: max_tokens * 12]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids, str(path)
