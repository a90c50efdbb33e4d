"""Prefill throughput: median tokens/s of a full forward over repeats, after a warm-up."""
from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def prefill_tokens_per_second(model, batch: int = 1, seq_len: int = 256, repeats: int = 5, warmup: int = 1,
                              vocab_size: int = 1000, seed: int = 0) -> dict:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=gen).to(device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"tokens_per_s": batch * seq_len / median, "median_s": median, "batch": batch, "seq_len": seq_len,
            "repeats": repeats}
