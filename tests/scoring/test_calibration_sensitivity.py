"""Calibration sensitivity: Kendall τ against a hand count of concordant pairs, removed sets by the one ratio rule,
and the CI-overlap layers against the CIs themselves."""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from tiny_models import random_ids, tiny_llama

from shortgpt_fast.data.calibration import from_tensors
from shortgpt_fast.scoring.block_influence import collect_layer_stats
from shortgpt_fast.scoring.calibration_sensitivity import (
    CalibrationSensitivityError,
    calibration_sensitivity,
    markdown_table,
)
from shortgpt_fast.scoring.report import Scores, layers_for_ratio


def scores_on(model, ids):
    return Scores("tiny", collect_layer_stats(model, from_tensors(ids), batch_size=4, progress=False), {})


def tau_by_hand(a, b):
    # No ties in real-valued scores: τ = (concordant - discordant) / number of pairs.
    pairs = list(combinations(range(len(a)), 2))
    signs = [np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs]
    return sum(signs) / len(pairs)


def test_pairwise_tau_overlap_and_uncertain_layers():
    model = tiny_llama(num_layers=9)
    scored = {"random": scores_on(model, random_ids(6, 21, seed=1)),
              "repeated": scores_on(model, random_ids(1, 21, seed=2).repeat(6, 1) % 7 + 1),
              "random_again": scores_on(model, random_ids(6, 21, seed=1))}
    result = calibration_sensitivity(scored, ratio=0.3)
    n = layers_for_ratio(9, 0.3)
    assert result["n_remove"] == n == 3
    for pair in result["pairs"]:
        a, b = scored[pair["a"]], scored[pair["b"]]
        assert pair["kendall_tau"] == pytest.approx(tau_by_hand(a.bi, b.bi), abs=1e-12)
        removed_a = set(np.argsort(a.bi)[:n].tolist())
        removed_b = set(np.argsort(b.bi)[:n].tolist())
        assert pair["removed_overlap"] == len(removed_a & removed_b) / n
        assert pair["only_a"] == sorted(removed_a - removed_b)
    same = next(p for p in result["pairs"] if {p["a"], p["b"]} == {"random", "random_again"})
    assert same["kendall_tau"] == 1.0 and same["removed_overlap"] == 1.0
    for label, source in result["sources"].items():
        ci, ordered = scored[label].bi_ci95(), np.sort(scored[label].bi)
        line = (ordered[n - 1] + ordered[n]) / 2
        assert source["cut_line"] == pytest.approx(line)
        assert source["ci_overlaps_cut"] == [i for i in range(9) if ci[i, 0] <= line <= ci[i, 1]]
        assert source["removed"] == sorted(np.argsort(scored[label].bi)[:n].tolist())
    table = markdown_table(result)
    assert table.count("\n| random |") == 3 and "Kendall τ (bi)" in table  # two pairs and its own row


def test_refusals():
    model = tiny_llama(num_layers=3)
    one = scores_on(model, random_ids(4, 9))
    with pytest.raises(CalibrationSensitivityError, match="at least two"):
        calibration_sensitivity({"a": one})
    other = scores_on(tiny_llama(num_layers=4), random_ids(4, 9))
    with pytest.raises(CalibrationSensitivityError, match="different layer counts"):
        calibration_sensitivity({"a": one, "b": other})
