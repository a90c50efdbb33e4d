"""User metrics: the extension point through which other tools add a per-block score.

A metric is a function `fn(x_in, x_out, mask) -> values`:

- x_in, x_out: [tokens, hidden], one block's input and output for one calibration batch, flattened batch-major
  (sequence b owns rows b*seq_len .. (b+1)*seq_len - 1), in the model's dtype and on the block's device;
- mask: [tokens] bool, True for real tokens (padding is False);
- values: [tokens] floating, one value per token. Values at padding rows are ignored (replaced by 0 before the
  reduction, so a NaN there does no harm).

The accumulator sums the values per sequence in float64, exactly like the built-in metrics; the report divides by
the number of real tokens, so every user metric gets the token-weighted mean per layer, bootstrap CIs over sequences,
a ranking (ascending: the lowest value is removed first) and `Scores.select(name, n)` for free.

    import shortgpt_fast as sf
    sf.register_metric("l1", lambda x_in, x_out, mask: (x_out - x_in).abs().sum(-1))
    scores = sf.score(model, data, metrics=["l1"]); scores.select("l1", 4)

Two metrics ship through this same door: "euclidean" (‖x_out − x_in‖ per token) and "secretly_linear" (the
linear-fit residual of Razzhigaev et al. 2024, "Your Transformer is Secretly Linear").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import ShortGPTError, quote

MetricFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class MetricError(ShortGPTError):
    """A user metric that cannot be registered or that returned something other than one value per token."""

    pass


@dataclass(frozen=True)
class UserMetric:
    """A registered metric: its name (the report key and ranking name), the function and a one-line description."""

    name: str
    fn: MetricFn
    description: str = ""


_REGISTRY: dict[str, UserMetric] = {}


def register_metric(name: str, fn: MetricFn, *, description: str = "", replace: bool = False) -> UserMetric:
    """Register `fn(x_in, x_out, mask) -> [tokens] values` under `name` so `score(..., metrics=[name])` computes it.

    name: lower-case identifier (letters, digits, "_"), not a built-in metric or baseline name. replace=True
    overwrites an earlier registration of the same name. Returns the UserMetric.
    Example: register_metric("l1", lambda a, b, m: (b - a).abs().sum(-1), description="L1 change per token").
    Raises MetricError for an invalid or reserved name, a non-callable fn, or a duplicate name without replace.
    """
    from .report import METRICS

    if not isinstance(name, str) or not _NAME.match(name):
        raise MetricError(f"metric name {quote(str(name))} must be a lower-case identifier such as 'my_metric'")
    if name in METRICS:
        raise MetricError(f"metric name {quote(name)} is built in; choose another name")
    if not callable(fn):
        raise MetricError(f"metric {quote(name)} needs a function fn(x_in, x_out, mask) -> per-token values")
    if name in _REGISTRY and not replace:
        raise MetricError(f"metric {quote(name)} is already registered; pass replace=True to overwrite it")
    metric = UserMetric(name, fn, description)
    _REGISTRY[name] = metric
    return metric


def registered_metrics() -> dict[str, UserMetric]:
    """A copy of the registry: name -> UserMetric, the shipped metrics included."""
    return dict(_REGISTRY)


def resolve_metrics(names: Sequence[str]) -> list[UserMetric]:
    """The UserMetrics for `names` (order kept, duplicates dropped); MetricError for a name never registered."""
    resolved = []
    for name in dict.fromkeys(names or ()):
        if name not in _REGISTRY:
            raise MetricError(f"unknown user metric {quote(name)}; registered: {sorted(_REGISTRY)} "
                              "(add one with shortgpt_fast.register_metric)")
        resolved.append(_REGISTRY[name])
    return resolved


def per_sequence_sums(metric: UserMetric, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor,
                      batch: int, layer: int) -> torch.Tensor:
    """float64 [batch] sums of `metric` over each sequence's real tokens; x_in/x_out [batch*seq_len, hidden].

    The sum runs over a [batch, seq_len] view in a fixed order, so the result does not depend on the thread count.
    Raises MetricError when the function returns anything but a floating tensor of shape [tokens] on the same device.
    """
    values = metric.fn(x_in, x_out, mask)
    tokens = x_in.shape[0]
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (tokens,) or not values.is_floating_point():
        got = f"shape {list(values.shape)} {values.dtype}" if isinstance(values, torch.Tensor) else type(values).__name__
        raise MetricError(f"metric {quote(metric.name)} returned {got} at layer {layer}; it must return one floating "
                          f"value per token, shape [{tokens}]")
    if values.device != mask.device:
        raise MetricError(f"metric {quote(metric.name)} returned values on {values.device}, its inputs are on "
                          f"{mask.device}; return them on the inputs' device")
    kept = torch.where(mask, values.to(torch.float64), torch.zeros((), dtype=torch.float64, device=mask.device))
    return kept.reshape(batch, -1).sum(dim=1)


# ---- the shipped metrics -----------------------------------------------------------------------------------------
def euclidean(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """‖x_out − x_in‖₂ per token, float32 (or float64 for float64 inputs) [tokens]."""
    dtype = torch.promote_types(x_in.dtype, torch.float32)
    return (x_out.to(dtype) - x_in.to(dtype)).norm(dim=-1)


def secretly_linear(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token share of 1 − linearity score (Razzhigaev et al. 2024, "Your Transformer is Secretly Linear").

    The paper centres the real tokens' states X (input) and Y (output), scales each to unit Frobenius norm, fits
    A = argmin ‖X̃A − Ỹ‖²_F and reports linearity = 1 − ‖X̃A − Ỹ‖²_F. Here the fit runs in float64 on the real tokens
    of the batch, and token i gets n·‖x̃ᵢA − ỹᵢ‖², so the token mean over the batch is exactly 1 − linearity: low means
    the block is nearly linear (the paper's candidates for removal). Over several batches the report gives the
    token-weighted mean of the per-batch residuals, so the value depends on --batch-size.
    Raises MetricError when a batch has no more real tokens than the hidden size: the fit is then exact and the
    residual is 0 for every block, which would rank nothing.
    """
    x = x_in[mask].to(torch.float64)
    y = x_out[mask].to(torch.float64)
    n, hidden = x.shape
    if n <= hidden:
        raise MetricError(f"secretly_linear fits a {hidden}-wide linear map per batch and needs more real tokens than "
                          f"that; this batch has {n}: raise --batch-size or --seq-len")
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    x = x / x.norm()
    y = y / y.norm()
    fit = torch.linalg.lstsq(x, y).solution
    residual = ((x @ fit - y) ** 2).sum(dim=1) * n
    values = torch.zeros(mask.shape[0], dtype=torch.float64, device=mask.device)
    values[mask] = residual
    return values


# Entered directly rather than through register_metric, whose built-in-name check imports report.py, which imports
# block_influence, which imports this module.
for _shipped in (UserMetric("euclidean", euclidean, "mean Euclidean distance ||x_out - x_in|| per token"),
                 UserMetric("secretly_linear", secretly_linear,
                            "1 - linearity score of Razzhigaev et al. 2024 (linear-fit residual), per batch")):
    _REGISTRY[_shipped.name] = _shipped
