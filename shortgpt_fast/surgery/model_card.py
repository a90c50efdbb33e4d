"""The one writer of the model-card section that records a removal, used by `cut`, `prune` and the API alike.

The section goes after the source model's own card (its license and usage notes still apply), once: a model pruned
through checkpoint surgery states its removal a single time, credited to what chose the layers.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .. import __version__

_METRIC_NOTES = {"bi": " (ShortGPT Block Influence, arXiv 2403.03853)"}


def removal_section(removed: Sequence[int], num_layers: int, chosen_by: str = "manual",
                    source: Optional[str] = None, report: bool = False) -> str:
    """Markdown naming the removed layers (original indices), what chose them and the renumbering.

    Example: removal_section([21, 22], 32, chosen_by="bi") -> "## Layers removed with shortgpt_fast\\n..."
    """
    kept = num_layers - len(removed)
    lines = ["## Layers removed with shortgpt_fast", ""]
    if source:
        lines.append(f"- Source model: `{source}`")
    lines += [
        f"- Layers removed ({len(removed)} of {num_layers}, original indices): {', '.join(map(str, removed))}; "
        f"the remaining {kept} layers are renumbered 0-{kept - 1}",
        f"- Chosen by: `{chosen_by}`" + _METRIC_NOTES.get(chosen_by, ""),
        f"- Tool: shortgpt_fast {__version__}",
    ]
    if report:
        lines += ["", "See `report.json` for the per-layer scores, the ranking and the old-to-new layer index map."]
    return "\n".join(lines) + "\n"


def with_removal(existing_card: str, section: str) -> str:
    """The source card followed by the removal section."""
    if not existing_card:
        return section
    return existing_card + ("" if existing_card.endswith("\n") else "\n") + "\n" + section
