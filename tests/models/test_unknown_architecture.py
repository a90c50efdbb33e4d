"""The generic fallback for a family the registry does not know: guess, warn once, or explain what was found."""
import warnings

import pytest
import torch
from torch import nn

from shortgpt_fast.models.architectures import ArchitectureError, checkpoint_layer_prefix, find_block_stack
from shortgpt_fast.models.config_surgery import ConfigSurgeryError, prune_config_dict
from shortgpt_fast.surgery.in_memory import prune_model
from shortgpt_fast.surgery.verify_structure import StructureMismatch


class Block(nn.Module):
    def __init__(self, width, index):
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.layer_idx = index

    def forward(self, x):
        return x + self.mix(x)


class HomegrownLM(nn.Module):
    """No `model.layers`, no registry entry: the stack sits under an unusual name."""

    def __init__(self, layers=5, width=12):
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.trunk = nn.ModuleList(Block(width, i) for i in range(layers))
        self.heads = nn.ModuleList([nn.Linear(width, 50)])  # a smaller list that must not be mistaken for it


def test_fallback_guesses_the_largest_identical_list_and_warns_once():
    model = HomegrownLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stack = find_block_stack(model)
        find_block_stack(model)
    assert stack.path == "trunk" and stack.guessed and len(stack.blocks) == 5
    assert sum("guessing" in str(w.message) for w in caught) == 1


def test_fallback_prunes_and_renumbers_only_when_told_to_skip_the_proof():
    model = HomegrownLM()
    # Without a transformers config nothing can rebuild the pruned model to prove it, so the default refuses and
    # leaves the model whole.
    with pytest.raises(StructureMismatch, match="no transformers config"):
        prune_model(model, [1, 3])
    assert len(model.trunk) == 5
    prune_model(model, [1, 3], verify=False)
    assert [b.layer_idx for b in model.trunk] == [0, 1, 2]
    x = torch.randn(2, 12)
    for block in model.trunk:
        x = block(x)
    assert torch.isfinite(x).all()


def test_layer_prefix_and_per_layer_fields_are_inferred():
    names = [f"net.trunk.{i}.mix.weight" for i in range(5)] + ["net.embed.weight", "net.heads.0.weight"]
    assert checkpoint_layer_prefix(names, 5, model_type="homegrown") == "net.trunk"
    # A list as long as the layer count whose meaning is unknown is refused, not guessed: falcon_h1's five
    # ssm_multipliers look per-layer on a 5-layer model and are not.
    cfg = {"num_hidden_layers": 5, "widths": [1, 2, 3, 4, 5], "eos_token_id": 3, "vocab": [9, 9]}
    with pytest.raises(ConfigSurgeryError, match="'widths' has one entry per layer"):
        prune_config_dict(cfg, [0, 4])
    out = prune_config_dict({"num_hidden_layers": 5, "eos_token_id": 3, "vocab": [9, 9]}, [0, 4])
    assert out["vocab"] == [9, 9] and out["num_hidden_layers"] == 3


def test_nothing_recognisable_lists_what_was_found():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])

    with pytest.raises(ArchitectureError, match=r"parts \(2 x Linear, ReLU\)"):
        find_block_stack(Odd())
    with pytest.raises(ArchitectureError, match="prefixes with numeric indices"):
        checkpoint_layer_prefix(["a.0.w", "a.1.w"], 5)
