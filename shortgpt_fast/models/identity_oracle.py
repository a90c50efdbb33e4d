"""The oracle every removal is judged against: the original model with the removed blocks turned into the identity.

A correct prune or cut computes exactly what this computes (bit for bit on CPU, same kernels, same order), so tests
and `shortgpt-fast archs` compare against it rather than against our own earlier output. It is built from forward
hooks on the live model, which leaves the model's weights and config untouched and works for blocks that return a
bare tensor (transformers 5) or a tuple whose first entry is the hidden state (4.x style, Falcon, RWKV).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from .architectures import find_block_stack


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in ("hidden_states", "hidden", "x", "inputs_embeds"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    raise TypeError("cannot find the hidden-state input of a block: neither a first positional tensor nor a "
                    "'hidden_states' keyword; the identity oracle does not know this block signature")


def _identity_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    x = block_input(args, kwargs)
    if isinstance(output, torch.Tensor):
        return x
    if isinstance(output, tuple):
        return (x,) + tuple(output[1:])
    if isinstance(output, list):
        return [x] + list(output[1:])
    raise TypeError(f"{type(module).__name__} returns {type(output).__name__}; the identity oracle handles tensors "
                    "and tuples whose first entry is the hidden state")


@contextmanager
def removed_blocks_as_identity(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """Within the context, blocks `layers` of `model` return their input unchanged; afterwards nothing is left over.

    Example:
        with removed_blocks_as_identity(model, [1, 4]):
            expected = model(input_ids=ids, use_cache=False).logits
        prune_model(model, [1, 4])
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, expected)
    """
    blocks = find_block_stack(model).blocks
    handles = [blocks[i].register_forward_hook(_identity_hook, with_kwargs=True) for i in sorted(set(layers))]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def identity_logits(model: nn.Module, layers: Sequence[int], input_ids: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Logits of `model` on `input_ids` with `layers` skipped (their blocks still run; their output is discarded)."""
    with removed_blocks_as_identity(model, layers):
        return model(input_ids=input_ids, **forward_kwargs).logits
