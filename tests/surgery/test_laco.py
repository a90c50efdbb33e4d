"""LaCo (RDSC layer collapse): the merge equals a hand-computed float64 merge, in memory and on disk, and the search
follows the paper's loop."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_ids, tiny_llama, tiny_qwen3
from transformers import AutoModelForCausalLM

from shortgpt_fast.surgery import laco
from shortgpt_fast.surgery.laco import CollapsedLayer, LacoError, LacoPlan, rdsc


def _params(model, layer: int) -> dict:
    return {n: p.detach().clone() for n, p in model.model.layers[layer].named_parameters()}


def _hand_merge(originals: list[dict], base: int, absorbed: list[int], name: str) -> torch.Tensor:
    """θ_base + Σ (θ_k − θ_base), written out literally in float64 and rounded once."""
    theta = originals[base][name].double()
    total = theta.clone()
    for k in absorbed:
        total = total + (originals[k][name].double() - theta)
    return total.to(originals[base][name].dtype)


def _plan_merging(num_layers: int, base: int, absorbed: list[int]) -> LacoPlan:
    plan = LacoPlan.identity(num_layers)
    stack = plan.layers
    plan.layers = stack[:base] + [rdsc(stack[base:base + len(absorbed) + 1])] + stack[base + len(absorbed) + 1:]
    return plan


def test_rdsc_coefficients_compose_over_original_layers():
    layers = [CollapsedLayer(i, {i: 1.0}) for i in range(8)]
    merged = rdsc(layers[4:7])  # 4 absorbs 5, 6
    assert merged == CollapsedLayer(4, {4: -1.0, 5: 1.0, 6: 1.0})
    # 3 absorbs the merged 4: θ3 + (θ4* − θ3) = θ4* = θ5 + θ6 − θ4
    assert rdsc([layers[3], merged]) == CollapsedLayer(3, {4: -1.0, 5: 1.0, 6: 1.0})


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_collapse_model_equals_hand_computed_merge(make):
    model = make(num_layers=7)
    originals = [_params(model, i) for i in range(7)]
    plan = _plan_merging(7, 2, [3, 4])
    collapsed = laco.collapse_model(model, plan)
    assert plan.removed == [3, 4] and len(collapsed.model.layers) == 5 == collapsed.config.num_hidden_layers
    for name, value in _params(collapsed, 2).items():
        expected = originals[2][name] if value.dim() < 2 else _hand_merge(originals, 2, [3, 4], name)
        assert torch.equal(value, expected), name
    for new, old in ((0, 0), (1, 1), (3, 5), (4, 6)):
        assert all(torch.equal(v, originals[old][n]) for n, v in _params(collapsed, new).items())
    assert all(torch.equal(v, originals[i][n]) for i in range(7) for n, v in _params(model, i).items())  # untouched


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_collapse_checkpoint_loads_in_transformers_and_equals_the_hand_merge(make, tmp_path):
    pytest.importorskip("shortgpt_fast._C")
    model = make(num_layers=7)
    src = tmp_path / "src"
    model.save_pretrained(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    originals = [_params(model, i) for i in range(7)]
    # Two merges, the second absorbing the first's result: 4 absorbs 5 and 6, then 2 absorbs 3 and the merged 4.
    plan = _plan_merging(7, 4, [5, 6])
    stack = plan.layers
    plan.layers = stack[:2] + [rdsc(stack[2:5])]
    assert plan.removed == [3, 4, 5, 6]
    out = tmp_path / "laco"
    info = laco.collapse_checkpoint(src, plan, out)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source is only read
    assert info["removed"] == [3, 4, 5, 6] and info["merged_tensors"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 3
    for name, value in _params(loaded, 2).items():
        if value.dim() < 2:
            assert torch.equal(value, originals[2][name]), name
            continue
        t = [originals[i][name].double() for i in range(7)]
        merged_4 = t[4] + (t[5] - t[4]) + (t[6] - t[4])
        assert torch.equal(value, (t[2] + (t[3] - t[2]) + (merged_4 - t[2])).to(value.dtype)), name
    for new in (0, 1):
        assert all(torch.equal(v, originals[new][n]) for n, v in _params(loaded, new).items())
    # The same plan in memory gives the same model, logits included.
    in_memory = laco.collapse_model(model, plan)
    ids = random_ids(2, 11)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)
    record = json.loads((out / laco.PLAN_FILE).read_text())
    assert record["removed"] == [3, 4, 5, 6] and record["merged"][0]["layer"] == 2
    assert "laco" in (out / "README.md").read_text()


def test_a_plan_for_another_layer_count_is_refused(tmp_path):
    pytest.importorskip("shortgpt_fast._C")
    model = tiny_llama(num_layers=4)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(LacoError, match="plan is for 6 layers"):
        laco.collapse_checkpoint(tmp_path / "src", _plan_merging(6, 1, [2]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_search_follows_the_papers_loop():
    model = tiny_llama(num_layers=8)
    ids = random_ids(3, 9)
    # T = -2 keeps every merge: C = 3 from the top (layer 7 - 3 = 4): 4 absorbs 5, 6; then 3 absorbs 4* and 7 ...
    plan = laco.search(model, ids, merge_layers=3, threshold=-2.0, remove=3)
    trials = [(t["base"], t["absorbed"]) for t in plan.trials]
    assert trials == [(4, [5, 6]), (3, [4])]  # the budget caps the second merge at one layer
    assert plan.removed == [4, 5, 6] and [layer.keeps for layer in plan.layers] == [0, 1, 2, 3, 7]
    assert plan.layers[3].weights == {4: -1.0, 5: 1.0, 6: 1.0}
    assert all(-1.0 <= t["similarity"] <= 1.0 for t in plan.trials)
    # T above any cosine keeps nothing; without a budget that is one pass, as in the paper.
    none = laco.search(model, ids, merge_layers=3, threshold=1.5)
    assert none.removed == [] and len(none.trials) == 5 and not any(t["kept"] for t in none.trials)
    # With a budget the threshold is lowered until the budget is met, and the plan says so.
    met = laco.search(model, ids, merge_layers=3, threshold=1.5, remove=2, threshold_step=1.0)
    assert len(met.removed) == 2 and met.settings["threshold_used"] < 1.0


def test_similarity_of_a_merge_is_measured_against_the_original():
    model = tiny_llama(num_layers=6)
    ids = random_ids(2, 7)
    plan = laco.search(model, ids, merge_layers=2, threshold=-2.0, remove=1)
    (trial,) = plan.trials
    reference = laco._final_states(model, ids, None)
    merged = laco._final_states(laco.collapse_model(model, plan), ids, None)
    expected = sum(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
                   for a, b in zip(reference, merged)) / 2
    assert trial["similarity"] == pytest.approx(expected, abs=1e-12) and trial["similarity"] < 1.0
