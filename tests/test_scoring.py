"""Scoring against an independent float64 reference, and the traps public implementations fell into."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import TINY_MODELS, random_ids, tiny_llama

from shortgpt_fast import api
from shortgpt_fast.data.calibration import from_tensors
from shortgpt_fast.models.architectures import find_block_stack
from shortgpt_fast.scoring.block_influence import ScoringError, collect_layer_stats


def capture_block_io(model, input_ids, attention_mask=None):
    """Each block's own input and output, captured with plain hooks (independent of the scorer's code path)."""
    blocks = find_block_stack(model).blocks
    captured = []

    def hook(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output if isinstance(output, torch.Tensor) else output[0]
        captured.append((hidden_in.detach().clone(), hidden_out.detach().clone()))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            kwargs = {"input_ids": input_ids, "use_cache": False}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
                kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return captured


def reference_metrics(captured, mask=None):
    """Token-weighted BI, angular distance and relative magnitude per layer, all in float64."""
    out = []
    for hidden_in, hidden_out in captured:
        a = hidden_in.double().reshape(-1, hidden_in.shape[-1])
        b = hidden_out.double().reshape(-1, hidden_out.shape[-1])
        keep = torch.ones(a.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
        a, b = a[keep], b[keep]
        cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
        rel = (b - a).norm(dim=1) / b.norm(dim=1)
        out.append({"bi": float((1 - cos).mean()), "angular": float((torch.arccos(cos) / math.pi).mean()),
                    "relative_magnitude": float(rel.mean())})
    return out


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_metrics_match_float64_reference(family):
    model = TINY_MODELS[family]()
    ids = random_ids(5, 37)
    scores = api.score(model, ids, batch_size=2, progress=False)
    ref = reference_metrics(capture_block_io(model, ids))
    assert scores.num_layers == len(ref)
    for name in ("bi", "angular", "relative_magnitude"):
        ours = getattr(scores, name)
        want = np.array([r[name] for r in ref])
        np.testing.assert_allclose(ours, want, rtol=1e-5, err_msg=f"{family} {name}")
    assert scores.tokens == 5 * 37


@pytest.mark.slow
def test_metrics_match_reference_on_smollm2(smollm2):
    model, tokenizer = smollm2
    calib = api.calibration_set(None, tokenizer, samples=2, seq_len=48, seed=3)
    scores = api.score(model, calib, batch_size=2, progress=False)
    ref = reference_metrics(capture_block_io(model, calib.input_ids))
    for name in ("bi", "angular", "relative_magnitude"):
        np.testing.assert_allclose(getattr(scores, name), [r[name] for r in ref], rtol=1e-5, err_msg=name)
    assert scores.num_layers == 30


def test_last_layer_bi_is_not_the_final_norm_version():
    """Scoring the last block against the final-normed output is the known trap (`hidden_states[-1]` in
    transformers 4.x and in several tools). Our last-layer BI must match the raw block output and not that."""
    model = tiny_llama()
    with torch.no_grad():
        # A freshly initialised RMSNorm has unit weight and preserves direction; trained ones do not.
        model.model.norm.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    ids = random_ids(3, 29)
    scores = api.score(model, ids, progress=False)
    captured = capture_block_io(model, ids)
    last_in, last_out = captured[-1]
    with torch.no_grad():
        normed = model.model.norm(last_out)
    wrong_last = reference_metrics([(last_in, normed)])[0]["bi"]
    right_last = reference_metrics(captured)[-1]["bi"]
    assert scores.bi[-1] == pytest.approx(right_last, rel=1e-5)
    assert abs(scores.bi[-1] - wrong_last) > 1e-3 * abs(wrong_last)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_padding_does_not_change_real_token_scores(family, side):
    model = TINY_MODELS[family]()
    lengths = [31, 12, 25, 7]
    seq_len = 31
    ids = random_ids(len(lengths), seq_len, seed=5)
    padded = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(seq_len - n, seq_len)
        padded[row, sl] = ids[row, :n]
        mask[row, sl] = 1
    padded_stats = collect_layer_stats(model, from_tensors(padded, mask), batch_size=4, progress=False)
    for row, n in enumerate(lengths):
        alone = collect_layer_stats(model, from_tensors(ids[row:row + 1, :n]), batch_size=1, progress=False)
        got = padded_stats.per_sequence[:, row]
        want = alone.per_sequence[:, 0]
        assert torch.equal(got[:, 0], want[:, 0]), "token counts differ: padding was counted"
        # Different GEMM shapes (padded vs unpadded) round differently; 1e-5 relative is far below any BI gap.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_scores_do_not_depend_on_batch_size():
    model = tiny_llama()
    ids = random_ids(7, 23)
    base = collect_layer_stats(model, from_tensors(ids), batch_size=1, progress=False).per_sequence
    for batch_size in (2, 3, 7):
        other = collect_layer_stats(model, from_tensors(ids), batch_size=batch_size, progress=False).per_sequence
        torch.testing.assert_close(other, base, rtol=1e-5, atol=1e-9)


def test_same_inputs_same_scores_bit_for_bit_across_thread_counts():
    model = tiny_llama()
    ids = random_ids(4, 33)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(collect_layer_stats(model, from_tensors(ids), batch_size=2, progress=False).per_sequence)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_nan_activations_name_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        find_block_stack(model).blocks[3].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(ScoringError, match="layer 3"):
        api.score(model, random_ids(2, 11), progress=False)


def test_report_structure_and_rankings():
    model = tiny_llama(num_layers=8)
    scores = api.score(model, random_ids(6, 19), batch_size=4, progress=False, angular_span=3)
    report = scores.to_dict()
    assert report["num_layers"] == 8 and report["tokens"] == 6 * 19
    assert set(report["layers"][0]) == {"index", "bi", "bi_ci95", "angular", "angular_last_token",
                                        "relative_magnitude"}
    for layer in report["layers"]:
        lo, hi = layer["bi_ci95"]
        assert lo <= layer["bi"] <= hi
    assert report["ranking"]["bi"] == sorted(range(8), key=lambda i: report["layers"][i]["bi"])
    assert report["ranking"]["reverse"] == list(range(7, -1, -1))
    assert report["ranking"]["last"][:2] == [6, 5]
    assert sorted(report["ranking"]["random"]) == list(range(8))
    assert len(report["angular_span"]["3"]) == 6
    block = scores.select("angular_span", 3)
    assert block == list(range(block[0], block[0] + 3))
    assert 0.0 <= report["rank_stability"]["same_set_fraction"] <= 1.0
    assert {"torch", "transformers", "shortgpt_fast"} <= set(report["versions"])
