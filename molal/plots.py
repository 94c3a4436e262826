"""PNG figures for MoLAM evaluation (matplotlib, Agg backend, atomic writes)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

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


def _rate_bars(ax: Any, rates: list[dict | None], j: int, label: str, color: str) -> None:
    """Bars of agreement rates (``Rate.to_dict()``; None or no rate: no bar) with their intervals, the j-th of
    two side by side at each x."""
    xs, ys, lo, hi = [], [], [], []
    for i, r in enumerate(rates):
        if r and r.get("rate") is not None:
            xs.append(i + (j - 0.5) * 0.38)
            ys.append(r["rate"])
            lo.append(r["rate"] - r["low"])
            hi.append(r["high"] - r["rate"])
    ax.bar(xs, ys, width=0.36, color=color, label=label, yerr=[lo, hi], capsize=3)


def quality_figure(report: dict, path: str | os.PathLike[str]) -> Path:
    """The quality report of :mod:`molal.service.quality` as one PNG: agreement with people's labels per
    source (MoLAM's pre-fill, each LLM) on the audit and on the queue with 95% intervals; MoLAM's per class;
    its confusion matrix on the audit; the pre-fill's agreement per model version."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    classes = list(report.get("classes") or [])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    where = [("audit", "audit (random)", "#5b7bd5"), ("queue", "queue (strategy)", "#d59b5b")]
    names = list(((report.get("audit") or {}).get("prefill") or {}).keys())
    for j, (w, label, color) in enumerate(where):
        src = (report.get(w) or {}).get("prefill") or {}
        _rate_bars(ax, [(src.get(n) or {}).get("overall") for n in names], j, label, color)
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("agreement with people (95% CI)")
    ax.set_title("Pre-fill and LLM votes vs people's labels")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for j, (w, label, color) in enumerate(where):
        per = ((((report.get(w) or {}).get("prefill") or {}).get("molam") or {}).get("per_class") or {})
        _rate_bars(ax, [per.get(c) for c in classes], j, label, color)
    ax.set_xticks(range(len(classes)), classes, rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("molal's pre-fill per class (by the person's label)")
    ax = axes[1][0]
    conf = ((((report.get("audit") or {}).get("prefill") or {}).get("molam") or {}).get("confusion") or {})
    cm = np.asarray(conf.get("counts") or np.zeros((len(classes), len(classes))), dtype=np.int64)
    if cm.size:
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(cm.shape[0]):
            for k in range(cm.shape[1]):
                if cm[i, k]:
                    ax.text(k, i, str(cm[i, k]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(classes)), [c[:8] for c in classes], rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), [c[:8] for c in classes], fontsize=7)
    ax.set_xlabel("molal's pre-fill")
    ax.set_ylabel("person's label")
    ax.set_title("Confusion on the audit")
    ax = axes[1][1]
    vers = report.get("by_version") or []
    for w, label, color in where:
        pts = [(i, v[w]) for i, v in enumerate(vers) if (v.get(w) or {}).get("rate") is not None]
        if pts:
            ax.errorbar([i for i, _ in pts], [r["rate"] for _, r in pts],
                        yerr=[[r["rate"] - r["low"] for _, r in pts], [r["high"] - r["rate"] for _, r in pts]],
                        marker="o", capsize=3, color=color, label=label)
    ax.set_xticks(range(len(vers)), [v["version"] for v in vers], rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("Pre-fill agreement by model version")
    fig.suptitle(f"molal quality report · {report.get('version', '')}")
    fig.tight_layout()
    return _save(fig, path)
