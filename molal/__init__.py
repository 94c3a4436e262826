"""molal — Mixture-of-LLMs-in-the-Loop active learning (library; usable without Label Studio)."""

from __future__ import annotations

__version__ = "0.1.0"

from molal.data import DataError, LLMOutputs, TextDataset, load_dataset  # noqa: E402

__all__ = ["__version__", "LLMOutputs", "TextDataset", "load_dataset", "DataError"]


def __getattr__(name: str):  # lazy: importing molal must stay cheap (no xgboost/torch at import)
    if name in ("MoLAM", "negative_labels"):
        from molal import molam

        return getattr(molam, name)
    raise AttributeError(f"module 'molal' has no attribute {name!r}")
