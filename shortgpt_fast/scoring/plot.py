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


def plot_span_map(scores, path, title: Optional[str] = None) -> None:
    """Write the full span map of `scores` as a heatmap to `path`: x = start layer (0-based), y = span n (layers
    removed), colour = last-token angular distance from the input of `start` to the output of `start + n - 1`.
    The best start of each span (its argmin, what select("angular_span", n) removes) is marked with a dot.

    scores: a Scores scored with angular_span="all"; raises SelectionError otherwise (from Scores.span_map).
    Imports matplotlib lazily (Agg backend). Example: plot_span_map(scores, "out/spans.png").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = scores.span_map()
    n_layers = grid.shape[0]
    fig, ax = plt.subplots(figsize=(max(5, 0.22 * n_layers + 2.5), max(4, 0.2 * n_layers + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis",
                      extent=(-0.5, n_layers - 0.5, 0.5, n_layers + 0.5))
    best = [(int(np.nanargmin(grid[n - 1])), n) for n in range(1, n_layers)]
    ax.plot([s for s, _ in best], [n for _, n in best], "o", color="white", markersize=3, label="best start per span")
    ax.set_xlabel("start layer (0-based)")
    ax.set_ylabel("span n (layers removed: start .. start+n-1)")
    fig.colorbar(image, ax=ax, label="angular distance (last token)")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title or f"{scores.model}: angular distance of every block of layers, {scores.tokens} tokens",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
