"""Figure helpers shared by the bench report and the projection: short method labels with a key, saving."""

from __future__ import annotations


def short_labels(labels, width: int = 16) -> dict:
    """Plot labels: a method's own label when it is at most ``width`` characters, else ``M<i>`` (its 1-based place
    in the run), explained by :func:`label_key`."""
    return {m: (m if len(m) <= width else f"M{i}") for i, m in enumerate(labels, 1)}


def label_key(short: dict, wrap: int = 110) -> str:
    import textwrap

    items = [f"{s} = {m}" for m, s in short.items() if s != m]
    return "\n".join(textwrap.fill(t, wrap, subsequent_indent="      ") for t in items)


def _save(fig, path, key: str) -> None:
    """Lay out (labels are short, see :func:`short_labels`), then save with the label key below the figure; the
    saved bounding box grows to hold it and any legend placed outside the axes."""
    fig.tight_layout()
    if key:
        fig.text(0.01, -0.01, key, ha="left", va="top", fontsize=7, family="monospace")
    fig.savefig(path, dpi=120, bbox_inches="tight")
