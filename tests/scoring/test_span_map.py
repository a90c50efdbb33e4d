"""The full span map (angular_span="all") against the n-span values and a float64 reference."""
from __future__ import annotations

import math

import numpy as np
import torch
from test_scoring import capture_block_io
from tiny_models import random_ids, tiny_llama

from shortgpt_fast.data.calibration import from_tensors
from shortgpt_fast.scoring.block_influence import collect_layer_stats
from shortgpt_fast.scoring.plot import plot_span_map
from shortgpt_fast.scoring.report import Scores


def test_span_map_equals_n_span_values_and_float64_reference(tmp_path):
    model = tiny_llama(num_layers=7)
    lengths = [23, 9, 17, 23, 14]
    ids = random_ids(len(lengths), 23, seed=4)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, 23 - n:] = 1
    calib = from_tensors(ids, mask)
    full = Scores("tiny", collect_layer_stats(model, calib, batch_size=2, angular_span="all", progress=False), {})
    # Same batch size: torch's own float32 forward is not batch-shape invariant (a (3, 23) GEMM may round differently
    # from a (2, 23) one), and this compares two read-outs of one forward, not two forwards.
    short = Scores("tiny", collect_layer_stats(model, calib, batch_size=2, angular_span=3, progress=False), {})
    grid = full.span_map()
    assert grid.shape == (7, 7)
    for n in (1, 2, 3):
        np.testing.assert_array_equal(grid[n - 1, : 8 - n], short.angular_span(n))
    assert np.isnan(grid[6, 1:]).all() and not np.isnan(grid[6, 0])

    # Reference: last real token's state at every layer boundary, float64, arccos(cos)/pi averaged over sequences.
    captured = capture_block_io(model, ids, mask)
    boundary = [captured[0][0]] + [out for _, out in captured]
    last = torch.tensor(lengths).new_full((len(lengths),), 22)
    for n in range(1, 8):
        for start in range(0, 8 - n):
            a = boundary[start][torch.arange(len(lengths)), last].double()
            b = boundary[start + n][torch.arange(len(lengths)), last].double()
            cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
            want = float((torch.arccos(cos) / math.pi).mean())
            assert abs(grid[n - 1, start] - want) <= 1e-5 * want + 1e-6, (n, start)

    report = full.to_dict()
    spans = report["span_map"]
    for n in range(1, 8):
        assert spans["values"][n - 1][: 8 - n] == report["angular_span"][str(n)]
        assert spans["values"][n - 1][8 - n:] == [None] * (n - 1)
    for n in range(1, 7):
        start = int(np.argmin(grid[n - 1, : 8 - n]))
        # 0-based, inclusive of the start, n layers long: no off-by-one between the table and the choice.
        assert spans["best"][str(n)] == list(range(start, start + n)) == full.select("angular_span", n)
    plot_span_map(full, tmp_path / "spans.png")
    assert (tmp_path / "spans.png").stat().st_size > 1000
    assert "span_map" not in short.to_dict()
