"""How much the layers chosen depend on the calibration text (the paper's warning about unrepresentative data).

Given the Scores of one model on several calibration sources, report per pair of sources the Kendall τ of their
rankings and the overlap of the sets removed at the chosen ratio, and per source the layers whose bootstrap 95% CI
overlaps the cut line: the layers whose side of the cut the calibration sample itself does not settle.
"""
from __future__ import annotations

from itertools import combinations
from typing import Mapping

import numpy as np

from ..errors import ShortGPTError
from .report import DEFAULT_RATIO, Scores, layers_for_ratio


class CalibrationSensitivityError(ShortGPTError):
    """Scores that cannot be compared: fewer than two sources, different layer counts, or a metric without values."""

    pass


def kendall_tau(values_a: np.ndarray, values_b: np.ndarray) -> float:
    """Kendall τ-b between two per-layer score vectors (scipy.stats.kendalltau): 1 = the same order."""
    from scipy.stats import kendalltau

    return float(kendalltau(values_a, values_b).statistic)


def cut_line(values: np.ndarray, n_remove: int) -> float:
    """The score between the last layer removed and the first kept (midpoint of the n-th and n+1-th lowest)."""
    ordered = np.sort(values, kind="stable")
    return float((ordered[n_remove - 1] + ordered[n_remove]) / 2)


def uncertain_layers(scores: Scores, metric: str, n_remove: int) -> list[int]:
    """Layers whose bootstrap 95% CI of `metric` contains the cut line at `n_remove`: resampling the calibration
    sequences can move them across the cut. Sorted list[int]; SelectionError for a metric without CIs.
    """
    ci = scores.ci95(metric)
    line = cut_line(scores.metric(metric), n_remove)
    return [i for i in range(scores.num_layers) if ci[i, 0] <= line <= ci[i, 1]]


def calibration_sensitivity(scores: Mapping[str, Scores], ratio: float = DEFAULT_RATIO, metric: str = "bi") -> dict:
    """Compare the `metric` rankings of one model scored on several calibration sources.

    scores: source label -> Scores (same model, at least two sources); ratio: fraction of layers removed, turned into
    a count by layers_for_ratio; metric: "bi" or a user metric scored on every source (they need CIs).
    Returns a JSON-ready dict: n_remove, per source the removed layers, the cut line and the layers whose CI overlaps
    it, and per pair Kendall τ, the removed-set overlap |A ∩ B| / n and the layers removed by only one of them.
    Example: calibration_sensitivity({"prose": s1, "code": s2}, ratio=0.25)["pairs"][0]["kendall_tau"].
    Raises CalibrationSensitivityError for fewer than two sources or different layer counts, SelectionError for a
    metric some Scores lack or a ratio that removes no layer or all of them.
    """
    from .report import SelectionError

    if len(scores) < 2:
        raise CalibrationSensitivityError(f"calibration sensitivity compares at least two sources, got {len(scores)}")
    counts = {label: s.num_layers for label, s in scores.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationSensitivityError(f"the scores come from models with different layer counts {counts}; "
                                          "score one model on every source")
    num_layers = next(iter(counts.values()))
    n_remove = layers_for_ratio(num_layers, ratio)
    if not 1 <= n_remove < num_layers:
        raise SelectionError(f"ratio {ratio} removes {n_remove} of {num_layers} layers; choose a ratio that removes "
                             f"1..{num_layers - 1}")
    sources = {}
    for label, s in scores.items():
        values = s.metric(metric)
        sources[label] = {
            "calibration": s.calibration,
            "tokens": s.tokens,
            "removed": s.select(metric, n_remove),
            "cut_line": cut_line(values, n_remove),
            "ci_overlaps_cut": uncertain_layers(s, metric, n_remove),
            "ranking": s.ranking(metric),
        }
    pairs = []
    for a, b in combinations(scores, 2):
        removed_a, removed_b = set(sources[a]["removed"]), set(sources[b]["removed"])
        pairs.append({
            "a": a, "b": b,
            "kendall_tau": kendall_tau(scores[a].metric(metric), scores[b].metric(metric)),
            "removed_overlap": len(removed_a & removed_b) / n_remove,
            "only_a": sorted(removed_a - removed_b),
            "only_b": sorted(removed_b - removed_a),
        })
    return {"metric": metric, "ratio": ratio, "num_layers": num_layers, "n_remove": n_remove, "sources": sources,
            "pairs": pairs}


def markdown_table(result: dict) -> str:
    """The pairwise part of `calibration_sensitivity` as a markdown table (one row per pair), plus one row per
    source listing the layers whose CI overlaps the cut line."""
    n = result["n_remove"]
    lines = [f"| calibration A | calibration B | Kendall τ ({result['metric']}) | removed-set overlap at "
             f"{n}/{result['num_layers']} | removed only by A | removed only by B |",
             "|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['kendall_tau']:.3f} | {round(p['removed_overlap'] * n)}/{n} | "
                     f"{p['only_a'] or '–'} | {p['only_b'] or '–'} |")
    lines += ["", "| calibration | removed | layers whose 95% CI overlaps the cut line |", "|---|---|---|"]
    for label, s in result["sources"].items():
        lines.append(f"| {label} | {s['removed']} | {s['ci_overlaps_cut'] or '–'} |")
    return "\n".join(lines)
