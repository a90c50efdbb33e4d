"""Generation check: greedy continuations of fixed prompts and how much they loop (the paper's warning that
generation collapses after heavy layer removal)."""
from __future__ import annotations

import statistics
from typing import Sequence

import torch
from torch import nn

GENERATION_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "To make a cup of tea, you",
    "The most important scientific discovery of the twentieth century was",
)


def degeneration(token_ids: Sequence[int], n: int = 4) -> dict:
    """distinct-1/2 (unique over total n-grams) and the share of n-grams that already occurred earlier: looping
    text has low distinct-n and a high repeated share."""
    def ngrams(k):
        return [tuple(token_ids[i:i + k]) for i in range(len(token_ids) - k + 1)]

    def distinct(k):
        grams = ngrams(k)
        return len(set(grams)) / len(grams) if grams else 0.0

    grams = ngrams(n)
    seen, repeated = set(), 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return {"distinct_1": distinct(1), "distinct_2": distinct(2),
            f"repeated_{n}gram_fraction": repeated / len(grams) if grams else 0.0}


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer, prompts: Sequence[str] = GENERATION_PROMPTS,
                     max_new_tokens: int = 32) -> dict:
    """Greedy continuations of fixed prompts and their repetition measures, per prompt and averaged."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                             pad_token_id=pad_id)
        new_ids = out[0, ids["input_ids"].shape[1]:].tolist()
        samples.append({"prompt": prompt, "continuation": tokenizer.decode(new_ids, skip_special_tokens=True),
                        "token_ids": new_ids, **degeneration(new_ids)})
    keys = [k for k in samples[0] if k.startswith(("distinct", "repeated"))]
    return {"max_new_tokens": max_new_tokens, "samples": samples,
            "mean": {k: statistics.fmean(s[k] for s in samples) for k in keys}}
