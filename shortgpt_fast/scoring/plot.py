"""The per-layer BI plot written beside every report."""
from __future__ import annotations

from typing import Optional, Sequence


def plot_scores(scores, path, removed: Optional[Sequence[int]] = None, title: Optional[str] = None) -> None:
    """Write the per-layer BI bar chart (log scale, bootstrap 95% CI error bars) of `scores` to `path`.

    scores: a Scores (uses .bi, .bi_ci95(), .model, .tokens); path: file name, its extension picks the format
    (e.g. "scores.png"); removed: layer indices drawn in red; title overrides the default label. Returns None.
    Example: plot_scores(scores, "out/bi.png", removed=[20, 21]).
    Imports matplotlib lazily (Agg backend): ImportError when it is not installed; OSError when path is not writable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bi = scores.bi
    ci = scores.bi_ci95()
    layers = np.arange(len(bi))
    removed = set(removed or [])
    colors = ["tab:red" if i in removed else "tab:blue" for i in layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(bi) + 2), 3.6))
    ax.bar(layers, bi, color=colors, yerr=[bi - ci[:, 0], ci[:, 1] - bi], capsize=2, error_kw={"lw": 0.8})
    ax.set_xlabel("layer")
    ax.set_ylabel("Block Influence (1 - cos)")
    ax.set_yscale("log")
    ax.set_xticks(layers[:: max(1, len(layers) // 16)])
    label = f"{scores.model}: BI with bootstrap 95% CI, {scores.tokens} tokens"
    if removed:
        label += f"; red = removed ({len(removed)})"
    ax.set_title(title or label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
