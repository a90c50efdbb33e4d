"""Speed of an in-memory model: prefill and decode tokens/s (medians over repeats after a warm-up) and the forward
FLOPs per token that bound the ideal speed-up of a pruned model."""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _random_prompt(model: nn.Module, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    # Ids drawn over the model's own vocabulary: an id the model lacks would fail, and the speed does not depend on
    # which ids are drawn.
    device = next(model.parameters()).device
    return torch.randint(0, model.config.vocab_size, (batch, seq_len),
                         generator=torch.Generator().manual_seed(seed)).to(device)


@torch.no_grad()
def prefill_throughput(model: nn.Module, batch: int = 1, seq_len: int = 256, repeats: int = 5, warmup: int = 1,
                       seed: int = 0) -> dict:
    """Tokens/s of one full forward over a `batch` x `seq_len` random prompt without a cache:
    {'tokens_per_s', 'median_s', 'batch', 'seq_len', 'repeats'}."""
    device = next(model.parameters()).device
    ids = _random_prompt(model, batch, seq_len, seed)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"tokens_per_s": batch * seq_len / median, "median_s": median, "batch": batch, "seq_len": seq_len,
            "repeats": repeats}


@torch.no_grad()
def decode_throughput(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, repeats: int, warmup: int,
                      seed: int = 0) -> dict:
    """Tokens/s of one-token steps through the KV cache after a prompt; the prompt's prefill is not timed."""
    device = next(model.parameters()).device
    ids = _random_prompt(model, batch, prompt_len, seed)
    times = []
    for i in range(warmup + repeats):
        out = model(input_ids=ids, use_cache=True)
        cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            cache, next_ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"tokens_per_s": batch * new_tokens / median, "median_s": median, "batch": batch,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats}


def measure_throughput(model: nn.Module, *, batches: Sequence[int] = (1, 8), seq_len: int = 256,
                       new_tokens: int = 32, repeats: int = 5, warmup: int = 1) -> dict:
    """{'prefill': {batch: ...}, 'decode': {batch: ...}} for every batch size (keys are strings, JSON-ready)."""
    return {
        "prefill": {str(b): prefill_throughput(model, b, seq_len, repeats, warmup) for b in batches},
        "decode": {str(b): decode_throughput(model, b, seq_len, new_tokens, repeats, warmup) for b in batches},
    }


def forward_flops_per_token(model: nn.Module, context: int) -> float:
    """Forward FLOPs for one token at `context` tokens of context: 2 per weight of every linear layer (lm_head
    included, embeddings excluded since they are a lookup) plus the attention score and value products."""
    from ..models.architectures import find_block_stack

    # From the layer shapes, not weight.numel(): a bitsandbytes 4-bit weight is stored as packed bytes.
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = len(find_block_stack(model).blocks)
    return 2.0 * linear + layers * 4.0 * context * heads * head_dim
