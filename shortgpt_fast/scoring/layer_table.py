"""The per-layer table `score` and the demo print."""
from __future__ import annotations

from typing import Iterable


def format_layer_table(scores, removed: Iterable[int] = ()) -> str:
    """One line per layer: BI with its bootstrap 95% CI, angular distance (all tokens and last token) and relative
    magnitude; layers in `removed` are marked."""
    removed = set(removed)
    ci = scores.bi_ci95()
    lines = [f"{'layer':>5} {'BI':>9} {'BI 95% CI':>21} {'angular':>9} {'ang.last':>9} {'rel.mag':>9}"]
    for i in range(scores.num_layers):
        mark = "  removed" if i in removed else ""
        lines.append(f"{i:>5} {scores.bi[i]:>9.5f} [{ci[i, 0]:>9.5f},{ci[i, 1]:>9.5f}] {scores.angular[i]:>9.5f} "
                     f"{scores.angular_last_token[i]:>9.5f} {scores.relative_magnitude[i]:>9.5f}{mark}")
    return "\n".join(lines)
