"""User metrics through the shared accumulator, against float64 references computed from independently captured
block inputs and outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_scoring import capture_block_io
from tiny_models import random_ids, tiny_gpt2, tiny_llama

from shortgpt_fast.data.calibration import from_tensors
from shortgpt_fast.scoring.block_influence import collect_layer_stats
from shortgpt_fast.scoring.metrics import MetricError, register_metric, registered_metrics
from shortgpt_fast.scoring.report import Scores


def cube_change(x_in, x_out, mask):
    # Not a built-in: the sum of cubed changes, in the model's dtype, NaN on padding (which must not leak).
    values = ((x_out - x_in) ** 3).sum(-1)
    return torch.where(mask, values, torch.full_like(values, float("nan")))


register_metric("test_cube_change", cube_change, description="test metric", replace=True)


def left_padded(lengths, seq_len, seed=3):
    ids = random_ids(len(lengths), seq_len, seed=seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, seq_len - n:] = 1
    return ids, mask


def scored(model, ids, mask, batch_size, metrics):
    stats = collect_layer_stats(model, from_tensors(ids, mask), batch_size=batch_size, progress=False,
                                metrics=metrics)
    return Scores("tiny", stats, {})


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_user_metric_equals_float64_reference_with_padding_excluded(make_model):
    model = make_model()
    lengths = [29, 7, 18, 29, 11]  # odd lengths, a short row in every batch of 2
    ids, mask = left_padded(lengths, 29)
    scores = scored(model, ids, mask, 2, ["test_cube_change", "euclidean"])
    captured = capture_block_io(model, ids, mask)
    keep = mask.reshape(-1).bool()
    for layer, (hidden_in, hidden_out) in enumerate(captured):
        a = hidden_in.double().reshape(-1, hidden_in.shape[-1])[keep]
        b = hidden_out.double().reshape(-1, hidden_out.shape[-1])[keep]
        want_cube = float(((b - a) ** 3).sum(1).mean())
        want_euclid = float((b - a).norm(dim=1).mean())
        assert scores.metric("test_cube_change")[layer] == pytest.approx(want_cube, rel=1e-4, abs=1e-7)
        assert scores.metric("euclidean")[layer] == pytest.approx(want_euclid, rel=1e-5)
    assert scores.tokens == sum(lengths)
    # Per-sequence sums: a sequence scored alone gives the same sum as inside a padded batch.
    alone = scored(model, ids[1:2, -7:], None, 1, ["euclidean"])
    torch.testing.assert_close(scores.stats.metric_sums["euclidean"][:, 1], alone.stats.metric_sums["euclidean"][:, 0],
                               rtol=1e-5, atol=1e-9)


def paper_linearity_residual(x, y):
    """1 - linearity score (Razzhigaev et al. 2024), float64 numpy, independent of the torch implementation."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    x = x / np.linalg.norm(x)
    y = y / np.linalg.norm(y)
    fit = np.linalg.lstsq(x, y, rcond=None)[0]
    return float(np.linalg.norm(x @ fit - y) ** 2)


def test_secretly_linear_equals_the_papers_score_per_batch():
    model = tiny_llama(num_layers=4)
    lengths = [41, 30, 41, 39, 37, 41]  # batches of 3 hold 112 and 117 real tokens, more than hidden 72
    ids, mask = left_padded(lengths, 41, seed=8)
    scores = scored(model, ids, mask, 3, ["secretly_linear"])
    captured = capture_block_io(model, ids, mask)
    for layer, (hidden_in, hidden_out) in enumerate(captured):
        per_batch, weights = [], []
        for rows in (slice(0, 3), slice(3, 6)):
            keep = mask[rows].reshape(-1).bool().numpy()
            x = hidden_in[rows].double().reshape(-1, 72).numpy()[keep]
            y = hidden_out[rows].double().reshape(-1, 72).numpy()[keep]
            per_batch.append(paper_linearity_residual(x, y))
            weights.append(int(keep.sum()))
        want = np.average(per_batch, weights=weights)
        assert scores.metric("secretly_linear")[layer] == pytest.approx(want, rel=1e-6)
        assert 0 < want < 1


def test_user_metric_gets_ci_ranking_selection_and_report():
    model = tiny_llama(num_layers=7)
    scores = scored(model, random_ids(6, 19), None, 4, ["euclidean"])
    values = scores.metric("euclidean")
    ci = scores.ci95("euclidean")
    assert np.all(ci[:, 0] <= values) and np.all(values <= ci[:, 1])
    assert scores.ranking("euclidean") == [int(i) for i in np.argsort(values, kind="stable")]
    assert scores.select("euclidean", 3) == sorted(scores.ranking("euclidean")[:3])
    report = scores.to_dict()
    assert report["ranking"]["euclidean"] == scores.ranking("euclidean")
    assert report["layers"][2]["euclidean"] == pytest.approx(values[2])
    assert report["user_metrics"] == {"euclidean": registered_metrics()["euclidean"].description}


def test_bad_metrics_are_refused_in_one_line():
    with pytest.raises(MetricError, match="built in"):
        register_metric("bi", cube_change)
    with pytest.raises(MetricError, match="lower-case identifier"):
        register_metric("My Metric", cube_change)
    with pytest.raises(MetricError, match="already registered"):
        register_metric("euclidean", cube_change)
    register_metric("test_bad_shape", lambda a, b, m: (b - a), replace=True)
    model = tiny_llama(num_layers=2)
    with pytest.raises(MetricError, match=r"one floating value per token, shape \[26\]"):
        scored(model, random_ids(2, 13), None, 2, ["test_bad_shape"])
    with pytest.raises(MetricError, match="unknown user metric"):
        scored(model, random_ids(2, 13), None, 2, ["no_such_metric"])
    with pytest.raises(MetricError, match="raise --batch-size"):
        scored(model, random_ids(2, 13), None, 2, ["secretly_linear"])


def test_register_metric_is_exported_lazily():
    import shortgpt_fast as sf

    assert sf.register_metric is register_metric


def test_api_score_with_user_metrics_and_span_map_writes_the_report(tmp_path):
    from shortgpt_fast import api

    model = tiny_llama(num_layers=4)
    scores = api.score(model, random_ids(4, 15), batch_size=2, progress=False, metrics=["euclidean"],
                       angular_span="all")
    api.write_report(scores, tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ranking"]["euclidean"] == scores.ranking("euclidean")
    assert len(report["span_map"]["values"]) == 4
    assert (tmp_path / "report.png").exists() and (tmp_path / "report_spans.png").exists()
