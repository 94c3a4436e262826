"""PNG figures for MoLAM evaluation (matplotlib, Agg backend, atomic writes)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from molal.io import atomic_write_bytes


def _save(fig, path: str | os.PathLike[str]) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue(), mode=0o644)


def reliability_diagram(bins: dict, path: str | os.PathLike[str], title: str = "Reliability") -> Path:
    """Bar chart of accuracy per confidence bin against the diagonal (from metrics.reliability_bins)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    edges = bins["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    mask = bins["count"] > 0
    ax.bar(centers[mask], bins["accuracy"][mask], width=edges[1] - edges[0], edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def confusion_grid(matrices: dict[str, np.ndarray], class_names: list[str], path: str | os.PathLike[str]) -> Path:
    """One row-normalised confusion matrix per source (e.g. per LLM), side by side."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, (name, cm) in zip(axes[0], matrices.items(), strict=True):
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(name)
        ax.set_xticks(range(len(class_names)), [c[:6] for c in class_names], rotation=90, fontsize=7)
        ax.set_yticks(range(len(class_names)), [c[:6] for c in class_names], fontsize=7)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6)
    axes[0][0].set_ylabel("true")
    return _save(fig, path)
