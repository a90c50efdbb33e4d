"""Blocks that do not carry one [batch, seq, hidden] state per forward: several residual streams, sequence-first
states, blocks run more than once, blocks the forward skips; and layer-relative attributes the verifier must accept
(or keep refusing). Tiny models from the architecture matrix, checked against float64 references written here."""
from __future__ import annotations

import warnings

import pytest
import torch

from shortgpt_fast.experiments import support_matrix as sm
from shortgpt_fast.models.architectures import find_block_stack
from shortgpt_fast.models.identity_oracle import identity_logits
from shortgpt_fast.ops.bi_reduce import Stat
from shortgpt_fast.scoring.block_influence import ScoringError, collect_layer_stats
from shortgpt_fast.surgery.in_memory import prune_model
from shortgpt_fast.surgery.verify_structure import StructureMismatch


def _model(name):
    row = sm.rows()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = row.make_config()
        torch.manual_seed(0)
        model = sm._model_class(row).from_config(config).eval()
    sm._perturb(model, seed=3)
    return model


def _bi(stats):
    per_layer = stats.per_sequence.sum(dim=1)
    return per_layer[:, Stat.SUM_ONE_MINUS_COS] / per_layer[:, Stat.TOKENS]


# How each model lays out a block's hidden state, written out per model rather than detected.
TO_TOKEN_ROWS = {
    "gemma3n_text": lambda t: t.permute(1, 2, 0, 3).flatten(2),  # AltUp [streams, batch, seq, hidden]
    "deepseek_v4": lambda t: t.flatten(2),  # mHC [batch, seq, streams, hidden]
    "xlnet": lambda t: t.transpose(0, 1),  # [seq, batch, hidden]
}


@pytest.mark.parametrize("name", list(TO_TOKEN_ROWS))
def test_multi_stream_and_sequence_first_blocks_match_float64_reference(name):
    model = _model(name)
    calib = sm.calibration()
    to_rows = TO_TOKEN_ROWS[name]
    blocks = find_block_stack(model).blocks
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)

    def hook_for(i):
        def hook(module, args, kwargs, output):
            a = to_rows((args[0] if args else kwargs["hidden_states"]).double())
            b = to_rows((output if isinstance(output, torch.Tensor) else output[0]).double())
            assert a.shape[:2] == tuple(calib.input_ids.shape)
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
            sums[i] += (1 - cos).sum()
            counts[i] += cos.numel()
        return hook

    handles = [b.register_forward_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        sm._logits(model, calib.input_ids)
    finally:
        for h in handles:
            h.remove()
    stats = collect_layer_stats(model, calib, batch_size=3, angular_span=2, progress=False)
    assert torch.allclose(_bi(stats), sums / counts, rtol=1e-5, atol=1e-7)
    assert 1 in stats.span_angular and torch.isfinite(stats.span_angular[1]).all()


@pytest.mark.parametrize("name", ["hrm_text", "dory"])
def test_blocks_that_run_repeatedly_are_refused(name):
    with pytest.raises(ScoringError, match="runs more than once per forward pass"):
        collect_layer_stats(_model(name), sm.calibration(), batch_size=3, angular_span=2, progress=False)


def test_a_block_the_forward_skips_scores_as_identity():
    # Mllama's cross-attention layer (3) is skipped without an image: its output is its input, BI exactly 0.
    model = _model("mllama")
    stats = collect_layer_stats(model, sm.calibration(), batch_size=3, angular_span=2, progress=False)
    bi = _bi(stats)
    assert torch.isfinite(bi).all()
    assert bi[3] == 0 and (bi[[0, 1, 2, 4, 5]] > 0).all()
    assert stats.per_sequence[3, :, Stat.TOKENS].sum() == stats.per_sequence[0, :, Stat.TOKENS].sum()
    # The angular distance over the skipped block equals the one over the block before it alone.
    assert torch.allclose(stats.span_angular[2][2], stats.span_angular[1][2])


@pytest.mark.parametrize("name", ["cpmant", "prophetnet"])
def test_blocks_with_extra_positions_are_refused(name):
    with pytest.raises(ScoringError, match="not one row per calibration token"):
        collect_layer_stats(_model(name), sm.calibration(), batch_size=3, angular_span=2, progress=False)


@pytest.mark.parametrize("name", ["minimax", "big_bird", "gpt_neo"])
def test_layer_relative_attributes_are_accepted_and_prune_exactly(name):
    # minimax: self_attn.num_hidden_layers (init-only), big_bird: attention.seed (the layer index),
    # gpt_neo: attn.attention_layers (the per-layer list). Verified prune == identity oracle, bit for bit.
    model, ids = _model(name), sm._test_ids()
    remove = list(sm.rows()[name].remove)
    expected = identity_logits(model, remove, ids, use_cache=False)
    prune_model(model, remove)
    assert torch.equal(sm._logits(model, ids), expected)


@pytest.mark.parametrize("name,field", [("diffllama", "lambda_init"), ("minicpm3", "residual_scale"),
                                        ("beam", "residual_add_idx")])
def test_index_dependent_values_are_still_refused(name, field):
    with pytest.raises(StructureMismatch, match=field):
        prune_model(_model(name), list(sm.rows()[name].remove))
