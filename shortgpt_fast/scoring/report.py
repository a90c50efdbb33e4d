"""Metrics, rankings, bootstrap confidence intervals and the JSON report, all derived from per-sequence sums."""
from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..errors import ShortGPTError
from ..ops.bi_reduce import Stat
from .block_influence import LayerStats

# Metrics ranked "least important first" by ascending value: a block that changes its input least goes first.
SCORE_METRICS = ("bi", "angular", "angular_last_token", "relative_magnitude")
BASELINE_METRICS = ("reverse", "random", "last")
SPAN_METRIC = "angular_span"  # Gromov et al.: best block of n consecutive layers
METRICS = SCORE_METRICS + BASELINE_METRICS + (SPAN_METRIC,)
BOOTSTRAP_RESAMPLES = 1000
DEFAULT_RATIO = 0.25


class SelectionError(ShortGPTError):
    """A layer choice that cannot be made: unknown metric, impossible --remove/--ratio count, or a span or ranking the
    scores/report do not hold. One line saying what to choose instead.
    """

    pass


def _versions() -> dict:
    import transformers

    return {"shortgpt_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@dataclass
class Scores:
    """Per-layer scores of one model on one calibration set. `to_dict()` is the stable JSON report."""

    model: str
    stats: LayerStats
    calibration: dict
    seed: int = 0
    timings: dict = field(default_factory=dict)
    removed: Optional[list] = None
    removal_metric: Optional[str] = None
    index_map: Optional[dict] = None
    _bootstrap: Optional[np.ndarray] = field(default=None, repr=False)

    # ---- raw metrics -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of scored blocks (int), the first dimension of stats.per_sequence."""
        return int(self.stats.per_sequence.shape[0])

    @property
    def tokens(self) -> int:
        """Number of real (unmasked) calibration tokens each layer was scored on (int)."""
        return int(self.stats.per_sequence[0, :, Stat.TOKENS].sum())

    def _token_mean(self, column: Stat) -> np.ndarray:
        sums = self.stats.per_sequence[:, :, column].sum(dim=1)
        return (sums / self.stats.per_sequence[:, :, Stat.TOKENS].sum(dim=1)).numpy()

    @property
    def bi(self) -> np.ndarray:
        """Block Influence per layer, float64 ndarray [num_layers]: the token-weighted mean of 1 - cos(x_in, x_out).

        Lower means the block changes its input less, so it ranks as less important. Example: scores.bi.argmin().
        """
        return self._token_mean(Stat.SUM_ONE_MINUS_COS)

    @property
    def angular(self) -> np.ndarray:
        """Mean angular distance arccos(cos)/π per layer, float64 ndarray [num_layers], weighted by tokens like `bi`."""
        return self._token_mean(Stat.SUM_ANGULAR)

    @property
    def relative_magnitude(self) -> np.ndarray:
        """Mean ‖x_out - x_in‖ / ‖x_out‖ per layer, float64 ndarray [num_layers], weighted by tokens like `bi`."""
        return self._token_mean(Stat.SUM_REL_MAGNITUDE)

    @property
    def angular_last_token(self) -> np.ndarray:
        """Angular distance on each sequence's last real token, averaged over the sequences that have any token:
        float64 ndarray [num_layers].
        """
        per_seq = self.stats.per_sequence
        has_tokens = (per_seq[:, :, Stat.TOKENS] > 0).to(torch.float64)
        return ((per_seq[:, :, Stat.LAST_ANGULAR] * has_tokens).sum(dim=1) / has_tokens.sum(dim=1)).numpy()

    @property
    def user_metrics(self) -> list[str]:
        """Names of the user metrics (scoring/metrics.py) these scores were computed with, in scoring order."""
        return list(self.stats.metric_sums)

    def metric(self, name: str) -> np.ndarray:
        """The per-layer values of a score metric by name, float64 ndarray [num_layers]. Example: scores.metric("bi").

        User metrics computed at scoring time are token-weighted means of their per-token values, like `bi`.
        Raises SelectionError for a name outside SCORE_METRICS and the user metrics scored (baselines such as
        "random" have rankings, not values).
        """
        if name in self.stats.metric_sums:
            return self._sums_per_token(self.stats.metric_sums[name])
        if name not in SCORE_METRICS:
            raise SelectionError(f"unknown score metric {name!r}; choose one of {SCORE_METRICS + tuple(self.user_metrics)}"
                                 " (user metrics must be named at scoring time: score(..., metrics=[...]))")
        return getattr(self, name)

    def _sums_per_token(self, sums: torch.Tensor) -> np.ndarray:
        return (sums.sum(dim=1) / self.stats.per_sequence[:, :, Stat.TOKENS].sum(dim=1)).numpy()

    def angular_span(self, n: int) -> np.ndarray:
        """Last-token angular distance from layer ℓ to ℓ + n, averaged over sequences:
        float64 ndarray [num_layers - n + 1]. Gromov et al.: its argmin starts the n consecutive layers to remove.

        Raises SelectionError when spans of n layers were not computed at scoring time (rescore with --angular-span).
        """
        if n not in self.stats.span_angular:
            raise SelectionError(
                f"angular distance over {n} layers was not computed (spans 1..{max(self.stats.span_angular, default=0)}); "
                "rescore with a larger --angular-span")
        return self.stats.span_angular[n].mean(dim=1).numpy()

    @property
    def has_span_map(self) -> bool:
        """True when every span 1..num_layers was scored (angular_span="all"), so `span_map()` is complete."""
        return len(self.stats.span_angular) == self.num_layers and self.num_layers > 0

    def span_map(self) -> np.ndarray:
        """Angular distance for every (span, start): float64 ndarray [num_layers, num_layers], row n-1 = span n,
        column = start layer (0-based); entry [n-1, s] is the distance from the input of layer s to the output of
        layer s+n-1, i.e. what removing layers s..s+n-1 (inclusive) skips. NaN where s + n > num_layers.

        Raises SelectionError unless scoring kept every span (angular_span="all").
        """
        if not self.has_span_map:
            raise SelectionError("the full span map needs every span; rescore with --angular-span all")
        grid = np.full((self.num_layers, self.num_layers), np.nan)
        for n in range(1, self.num_layers + 1):
            grid[n - 1, : self.num_layers - n + 1] = self.angular_span(n)
        return grid

    def span_map_dict(self) -> dict:
        """The span map as JSON-ready dict: values [span n][start] (null past the last layer) and, per n < num_layers,
        the best block as its 0-based removed layers, the same choice as select("angular_span", n).
        """
        grid = self.span_map()
        return {
            "rows": "span n = 1..num_layers (layers removed)",
            "columns": "start layer, 0-based; entry removes layers start..start+n-1 inclusive",
            "values": [[None if np.isnan(v) else float(v) for v in row] for row in grid],
            "best": {str(n): self.select(SPAN_METRIC, n) for n in range(1, self.num_layers)},
        }

    # ---- bootstrap ---------------------------------------------------------------------------------------------
    def _resample_counts(self) -> np.ndarray:
        # The same seeded resamples for every metric, so their CIs describe the same draws of sequences.
        num_seqs = self.stats.per_sequence.shape[1]
        rng = np.random.default_rng(self.seed)
        return rng.multinomial(num_seqs, np.full(num_seqs, 1.0 / num_seqs), size=BOOTSTRAP_RESAMPLES)

    def _bootstrap_of(self, sums: np.ndarray) -> np.ndarray:
        counts = self._resample_counts()
        tokens = counts @ self.stats.per_sequence[:, :, Stat.TOKENS].numpy().T
        return (counts @ sums.T) / np.maximum(tokens, 1)

    def bootstrap_bi(self) -> np.ndarray:
        """BI of every layer under BOOTSTRAP_RESAMPLES resamples of whole sequences: [resamples, layers]."""
        if self._bootstrap is None:
            self._bootstrap = self._bootstrap_of(self.stats.per_sequence[:, :, Stat.SUM_ONE_MINUS_COS].numpy())
        return self._bootstrap

    def ci95(self, name: str) -> np.ndarray:
        """Bootstrap 95% CI of a metric's per-layer value: float64 ndarray [num_layers, 2], for "bi" and the user
        metrics scored (the same seeded resamples of whole sequences as `bi_ci95`).

        Raises SelectionError for any other name (the other built-in metrics keep no CI).
        """
        if name == "bi":
            return self.bi_ci95()
        if name not in self.stats.metric_sums:
            raise SelectionError(f"no confidence interval for {name!r}; CIs exist for 'bi' and the user metrics "
                                 f"scored {self.user_metrics}")
        boot = self._bootstrap_of(self.stats.metric_sums[name].numpy())
        return np.percentile(boot, [2.5, 97.5], axis=0).T

    def bi_ci95(self) -> np.ndarray:
        """Bootstrap 95% confidence interval of each layer's BI: float64 ndarray [num_layers, 2] of (2.5th, 97.5th)
        percentiles over BOOTSTRAP_RESAMPLES resamples of whole sequences (seeded by `seed`, cached).
        """
        return np.percentile(self.bootstrap_bi(), [2.5, 97.5], axis=0).T

    def rank_stability(self, n_remove: int) -> dict:
        """How often resampling the calibration sequences changes the BI-chosen set of `n_remove` layers."""
        chosen = set(self.select("bi", n_remove))
        boot = self.bootstrap_bi()
        picks = np.argsort(boot, axis=1, kind="stable")[:, :n_remove]
        same = np.mean([set(row.tolist()) == chosen for row in picks])
        freq = np.bincount(picks.ravel(), minlength=self.num_layers) / len(picks)
        return {"n_remove": n_remove, "same_set_fraction": float(same),
                "selection_frequency": [round(float(f), 4) for f in freq]}

    # ---- rankings and selection --------------------------------------------------------------------------------
    def ranking(self, metric: str) -> list[int]:
        """Layer indices, least important first."""
        n = self.num_layers
        if metric in SCORE_METRICS or metric in self.stats.metric_sums:
            return [int(i) for i in np.argsort(self.metric(metric), kind="stable")]
        if metric == "reverse":
            return list(range(n - 1, -1, -1))
        if metric == "random":
            return [int(i) for i in np.random.default_rng(self.seed).permutation(n)]
        if metric == "last":
            # The deepest layers except the final one, which the paper shows is the most harmful to remove.
            return list(range(n - 2, -1, -1)) + [n - 1]
        raise SelectionError(f"unknown metric {metric!r}; choose one of {METRICS + tuple(self.user_metrics)}")

    def select(self, metric: str, n_remove: int) -> list[int]:
        """The `n_remove` layers `metric` removes, as a sorted list[int]. Example: scores.select("bi", 8) on 32 layers.

        For "angular_span" the choice is the n consecutive layers with the smallest span distance; otherwise the first
        n_remove of `ranking(metric)`. Raises SelectionError for an unknown metric or n_remove outside 1..num_layers-1.
        """
        return _choose(self.num_layers, metric, n_remove, self.ranking, self.angular_span)

    # ---- report ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The stable JSON report as a dict: model, num_layers, tokens, calibration, block_path, per-layer metrics with
        bi_ci95, rankings, angular spans, bootstrap settings, rank stability, timings and versions; plus removed,
        removal_metric and index_map once `mark_removed` was called; user_metrics (name -> description, each layer
        gaining <name> and <name>_ci95) when user metrics were scored, span_map with angular_span="all".
        Imports transformers to record its version.
        """
        ci = self.bi_ci95()
        bi, ang, ang_last, rel = self.bi, self.angular, self.angular_last_token, self.relative_magnitude
        layers = [{
            "index": i,
            "bi": float(bi[i]),
            "bi_ci95": [float(ci[i, 0]), float(ci[i, 1])],
            "angular": float(ang[i]),
            "angular_last_token": float(ang_last[i]),
            "relative_magnitude": float(rel[i]),
        } for i in range(self.num_layers)]
        for name in self.user_metrics:
            values, user_ci = self.metric(name), self.ci95(name)
            for i, layer in enumerate(layers):
                layer[name] = float(values[i])
                layer[f"{name}_ci95"] = [float(user_ci[i, 0]), float(user_ci[i, 1])]
        default_n = max(1, layers_for_ratio(self.num_layers, DEFAULT_RATIO)) if self.num_layers > 1 else 0
        report = {
            "model": self.model,
            "num_layers": self.num_layers,
            "tokens": self.tokens,
            "calibration": self.calibration,
            "block_path": self.stats.block_path,
            "layers": layers,
            "ranking": {m: self.ranking(m) for m in SCORE_METRICS + tuple(self.user_metrics) + BASELINE_METRICS},
            "angular_span": {str(n): [float(v) for v in self.angular_span(n)] for n in sorted(self.stats.span_angular)},
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "unit": "sequence", "seed": self.seed},
            "rank_stability": self.rank_stability(len(self.removed) if self.removed else default_n)
            if self.num_layers > 1 else None,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "versions": _versions(),
        }
        if self.user_metrics:
            from .metrics import registered_metrics

            known = registered_metrics()
            report["user_metrics"] = {name: known[name].description if name in known else ""
                                      for name in self.user_metrics}
        if self.has_span_map:
            report["span_map"] = self.span_map_dict()
        if self.removed is not None:
            report["removed"] = list(self.removed)
            report["removal_metric"] = self.removal_metric
            report["index_map"] = {str(k): v for k, v in self.index_map.items()}
        return report

    def save(self, path) -> None:
        """Write `to_dict()` as JSON to `path` (str or Path). Example: scores.save("scores.json").

        Raises OSError when the file cannot be written.
        """
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)

    def mark_removed(self, removed: list, metric: str, index_map: dict) -> None:
        """Record a cut in the report: `removed` layer indices (stored sorted), the metric that chose them and the
        old -> new layer index_map (copied). Returns None; raises nothing.
        Example: scores.mark_removed([3, 5], "bi", {0: 0, 1: 1, 2: 2, 4: 3}).
        """
        self.removed, self.removal_metric, self.index_map = sorted(removed), metric, dict(index_map)


def layers_for_ratio(num_layers: int, ratio: float) -> int:
    """The one ratio -> layer-count rule: round half up (0.25 of 26 layers is 6.5 -> 7), never banker's rounding.

    Example: layers_for_ratio(32, 0.25) == 8; layers_for_ratio(26, 0.25) == 7.
    """
    return math.floor(ratio * num_layers + 0.5)


def removal_count(num_layers: int, remove: Optional[int] = None, ratio: Optional[float] = None) -> int:
    """How many layers `--remove N` or `--ratio R` asks for on a model with `num_layers`, or SelectionError."""
    if remove is not None:
        if remove < 1 or remove >= num_layers:
            raise SelectionError(f"--remove {remove} is impossible for a model with {num_layers} layers; "
                                 f"choose 1..{num_layers - 1}")
        return remove
    if ratio is not None:
        if not 0 < ratio < 1:
            raise SelectionError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")
        n = layers_for_ratio(num_layers, ratio)
        if n < 1 or n >= num_layers:
            raise SelectionError(f"--ratio {ratio} removes {n} of {num_layers} layers; choose a ratio that removes "
                                 f"1..{num_layers - 1}")
        return n
    raise SelectionError("say how many layers to remove: --remove N, --ratio R or --layers i,j")


def _choose(num_layers: int, metric: str, n_remove: int, ranking, span) -> list[int]:
    if not 1 <= n_remove < num_layers:
        raise SelectionError(f"cannot remove {n_remove} of {num_layers} layers; choose 1..{num_layers - 1}")
    if metric == SPAN_METRIC:
        start = int(np.argmin(span(n_remove)))
        return list(range(start, start + n_remove))
    return sorted(ranking(metric)[:n_remove])


def select_from_report(report: dict, metric: str, n_remove: int) -> list[int]:
    """The same choice as `Scores.select`, from a saved JSON report (no rescoring).

    report: the dict `Scores.to_dict()` wrote (json.load of scores.json). Returns a sorted list[int] of layers.
    Example: select_from_report(json.load(open("scores.json")), "bi", 8).
    Raises SelectionError when the report lacks that metric's ranking or span, or n_remove is out of range.
    """
    def ranking(name):
        if name not in report["ranking"]:
            raise SelectionError(f"the report has no ranking for {name!r}; it has {sorted(report['ranking'])}")
        return report["ranking"][name]

    def span(n):
        spans = report.get("angular_span", {})
        if str(n) not in spans:
            raise SelectionError(f"the report has no angular distance over {n} layers; rescore with --angular-span {n}")
        return np.asarray(spans[str(n)])

    return _choose(report["num_layers"], metric, n_remove, ranking, span)
