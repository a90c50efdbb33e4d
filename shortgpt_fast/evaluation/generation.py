"""Generation check: greedy continuations of fixed prompts and how much they loop (the paper's warning that
generation collapses after heavy layer removal)."""
from __future__ import annotations

import copy
import statistics
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from . import EvaluationError

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


@contextmanager
def shortgpt_gen(model: nn.Module, removed: Sequence[int]) -> Iterator[nn.Module]:
    """ShortGPT-gen (the official repository's shortgpt-gen/): inside the block, the DENSE `model` skips the
    `removed` blocks whenever more than one token goes through (prefill), yet each of them still writes its keys and
    values for those tokens into the KV cache, computed from the hidden state that reaches it; one-token steps
    (decoding) run every block, the removed ones reading that cache. So the prompt costs what the pruned model
    costs (plus the removed blocks' attention), and decoding keeps the full depth.

    The official code computes only the removed blocks' K/V projections; here their attention module runs and its
    output is discarded, which writes the same cache entries through transformers' own code for any block with
    `input_layernorm` and `self_attn` (the Llama family the official code covers); the MLP is skipped as there.
    Refuses other blocks.
    """
    from ..models.architectures import find_block_stack

    blocks = find_block_stack(model).blocks
    bad = [i for i in removed if not 0 <= i < len(blocks)]
    if bad:
        raise EvaluationError(f"layers {bad} are not in the model's {len(blocks)} layers")
    for i in removed:
        if not (hasattr(blocks[i], "input_layernorm") and hasattr(blocks[i], "self_attn")):
            raise EvaluationError(f"ShortGPT-gen needs decoder blocks with input_layernorm and self_attn (Llama "
                                  f"family); block {i} is a {type(blocks[i]).__name__}")
    originals = {i: blocks[i].forward for i in removed}

    def prefill_kv_only(block, full_forward):
        def forward(hidden_states, *args, **kwargs):
            if hidden_states.shape[1] == 1 or args:
                return full_forward(hidden_states, *args, **kwargs)
            block.self_attn(hidden_states=block.input_layernorm(hidden_states), **kwargs)  # fills its cache
            return hidden_states
        return forward

    try:
        for i in removed:
            blocks[i].forward = prefill_kv_only(blocks[i], originals[i])
        yield model
    finally:
        for i in removed:
            del blocks[i].forward  # the class's forward again


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


def _agreement(tokens: Sequence[int], reference: Sequence[int]) -> dict:
    """How long a continuation follows the dense model's: tokens until the first difference, and the share of
    positions that agree."""
    first = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    same = sum(a == b for a, b in zip(tokens, reference))
    return {"tokens_before_divergence": first, "agreement": same / max(1, len(reference))}


def generation_collapse(model: nn.Module, tokenizer, removed: Sequence[int],
                        prompts: Sequence[str] = GENERATION_PROMPTS, max_new_tokens: int = 32,
                        pruned: Optional[nn.Module] = None) -> dict:
    """Greedy generation of the dense `model`, of the model with `removed` blocks dropped (plain removal) and of
    ShortGPT-gen over the same blocks, with repetition measures and agreement with the dense continuation.

    `pruned`: the plain-removal model if the caller has it; otherwise a pruned copy of `model` is made.
    Returns {"removed", "dense", "removal", "shortgpt_gen"}, each a generate_samples() result plus per-sample and
    mean agreement with "dense".
    """
    from ..surgery.in_memory import prune_model

    result = {"removed": list(removed), "dense": generate_samples(model, tokenizer, prompts, max_new_tokens)}
    plain = pruned if pruned is not None else prune_model(copy.deepcopy(model), removed)
    result["removal"] = generate_samples(plain, tokenizer, prompts, max_new_tokens)
    with shortgpt_gen(model, removed) as gen:
        result["shortgpt_gen"] = generate_samples(gen, tokenizer, prompts, max_new_tokens)
    for mode in ("dense", "removal", "shortgpt_gen"):
        samples = result[mode]["samples"]
        for sample, reference in zip(samples, result["dense"]["samples"]):
            sample.update(_agreement(sample["token_ids"], reference["token_ids"]))
        for key in ("tokens_before_divergence", "agreement"):
            result[mode]["mean"][key] = statistics.fmean(s[key] for s in samples)
    return result
