"""The aggregate stage: MoLAM (a learned aggregator of a mixture of LLMs) and its baselines, one face::

    agg = MoLAM().fit(outputs, labeled_idx, labels)   # labeled_idx: rows of outputs; labels: class indices
    proba = agg.predict_proba(outputs)                 # (n, K), rows sum to 1
    agg.save("molam.json"); agg2 = load_aggregator("molam.json")  # or MoLAM.load(...)

Everything is chosen from the seed labels and the unlabeled pool only (never from gold labels of the
pool): MoLAM's candidate models are compared by repeated stratified cross-validation on the seeds, and a
safety net falls back to the best single LLM (judged on the seeds) when no learned model is clearly better.
Classes absent from the seeds are predicted from the LLMs' own evidence through an unsupervised Dawid–Skene
posterior fitted on the whole pool.

Modules: :mod:`~molal.aggregation.base` (the face, persistence), :mod:`~molal.aggregation.signals` (votes,
features, Dawid–Skene, negative labels), :mod:`~molal.aggregation.models` (MoLAM's candidates),
:mod:`~molal.aggregation.baselines`, :mod:`~molal.aggregation.text_model`, :mod:`~molal.aggregation.molam`.
"""

from molal.aggregation.base import Aggregator, MoLAMError, load_aggregator
from molal.aggregation.baselines import (
           BASELINES,
           BestSingleLLM,
           DawidSkene,
           MajorityVote,
           MeanProbs,
           PaperXGBoost,
)
from molal.aggregation.molam import MoLAM
from molal.aggregation.signals import least_confident, negative_labels

__all__ = ["BASELINES", "Aggregator", "BestSingleLLM", "DawidSkene", "MajorityVote", "MeanProbs", "MoLAM",
           "MoLAMError", "PaperXGBoost", "least_confident", "load_aggregator", "negative_labels"]
