"""MoLAM and its baselines (the aggregate stage): the public module. The code lives in
:mod:`molal.aggregation`; this module keeps the import path ``molal.molam`` that scripts and saved
configurations use."""

from molal.aggregation import (
    BASELINES,
    Aggregator,
    BestSingleLLM,
    DawidSkene,
    MajorityVote,
    MeanProbs,
    MoLAM,
    MoLAMError,
    PaperXGBoost,
    least_confident,
    load_aggregator,
    negative_labels,
)
from molal.aggregation.text_model import embed_texts_cached

__all__ = ["BASELINES", "Aggregator", "BestSingleLLM", "DawidSkene", "MajorityVote", "MeanProbs", "MoLAM",
           "MoLAMError", "PaperXGBoost", "embed_texts_cached", "least_confident", "load_aggregator",
           "negative_labels"]
