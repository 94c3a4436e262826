"""Baseline aggregators with MoLAM's face: :class:`BestSingleLLM`, :class:`MajorityVote`, :class:`MeanProbs`,
:class:`DawidSkene` (EM over the pool, seeds clamped) and :class:`PaperXGBoost` (the paper's XGBoost on raw
probabilities + consistency, trained on the seeds only)."""

from __future__ import annotations

import numpy as np

from molal.aggregation.base import Aggregator, MoLAMError
from molal.aggregation.models import booster_from_str, booster_to_str, xgb_fit, xgb_predict
from molal.aggregation.signals import (
    best_single_source,
    ds_em,
    ds_observations,
    ds_posterior,
    paper_features,
    single_sources,
    source_probs,
    vote_shares,
)
from molal.data import LLMOutputs


class MajorityVote(Aggregator):
    """Pooled vote shares of all LLMs (sampled answers where recorded, else each LLM's argmax); ties
    and rows without votes are resolved by the mean probabilities."""

    kind = "majority_vote"

    def _fit(self, outputs, idx, labels):
        pass

    def _predict(self, outputs):
        return self.vote_shares(outputs)

    @staticmethod
    def vote_shares(outputs: LLMOutputs) -> np.ndarray:
        """Pooled votes (n, K), the mean probabilities as a tiny tie-breaker (:func:`signals.vote_shares`)."""
        return vote_shares(outputs)


class MeanProbs(Aggregator):
    """Mean over LLMs of the recorded class probabilities, renormalised."""

    kind = "mean_probs"

    def _fit(self, outputs, idx, labels):
        pass

    def _predict(self, outputs):
        return outputs.probs.mean(axis=1)


class BestSingleLLM(Aggregator):
    """The single source (one LLM's probabilities or its sampled votes) most accurate on the seeds;
    ties broken by agreement with the majority vote on the pool (no gold used). Fitted: ``source_``
    (``("probs" | "votes", llm index)``)."""

    kind = "best_single_llm"

    def __init__(self) -> None:
        super().__init__()
        self.source_: tuple[str, int] | None = None

    @staticmethod
    def sources(outputs: LLMOutputs) -> list[tuple[str, int, np.ndarray]]:
        """Every candidate source: (kind, LLM index, (n, K) scores)."""
        return single_sources(outputs)

    @classmethod
    def source_probs(cls, outputs: LLMOutputs, source: tuple[str, int]) -> np.ndarray:
        """The (n, K) scores of one source."""
        return source_probs(outputs, source)

    def _fit(self, outputs, idx, labels):
        best, acc, scores = best_single_source(outputs, idx, labels)
        self.source_ = best
        self.metadata["seed_accuracy"] = acc
        self.metadata["source"] = f"{outputs.llm_names[best[1]]}:{best[0]}"
        self.metadata["seed_accuracy_by_source"] = scores

    def _predict(self, outputs):
        return self.source_probs(outputs, self.source_)

    def _state(self):
        return {"source": list(self.source_) if self.source_ else None}

    def _set_state(self, state):
        s = state.get("source")
        self.source_ = (s[0], int(s[1])) if s else None


class DawidSkene(Aggregator):
    """Dawid–Skene EM over the whole pool: each LLM's votes and probabilities are soft annotations with a
    per-source confusion matrix; seed rows are clamped to their labels (semi-supervised)."""

    kind = "dawid_skene"

    def __init__(self, iters: int = 50, smooth: float = 0.01) -> None:
        super().__init__()
        self.iters = iters
        self.smooth = smooth

    def _validate(self):
        if int(self.iters) < 1 or not float(self.smooth) > 0:
            raise MoLAMError(f"iters must be >= 1 and smooth > 0, got {self.iters}, {self.smooth}")

    def _fit(self, outputs, idx, labels):
        _, self.prior_, self.logpi_ = ds_em(ds_observations(outputs), idx, labels, int(self.iters), float(self.smooth))

    def _predict(self, outputs):
        return ds_posterior(ds_observations(outputs), self.prior_, self.logpi_)

    def _state(self):
        return {"prior": self.prior_, "logpi": self.logpi_}

    def _set_state(self, state):
        self.prior_ = np.asarray(state["prior"], dtype=np.float64)
        self.logpi_ = np.asarray(state["logpi"], dtype=np.float64)


class PaperXGBoost(Aggregator):
    """The paper's MoLAM without the gold-selected restarts: XGBoost on raw probs + consistency
    (2·N·K features) trained on the seeds only. Classes absent from the seeds get probability 0.
    Defaults: TREC settings (lr 0.05, depth 6, 300 trees)."""

    kind = "paper_xgboost"

    def __init__(self, learning_rate: float = 0.05, max_depth: int = 6, n_estimators: int = 300,
                 nthread: int = 1, seed: int = 0) -> None:
        super().__init__()
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.n_estimators = n_estimators
        self.nthread = nthread
        self.seed = seed

    def _validate(self):
        if not float(self.learning_rate) > 0 or int(self.max_depth) < 1 or int(self.n_estimators) < 1:
            raise MoLAMError("learning_rate must be > 0, max_depth and n_estimators >= 1")

    def _fit(self, outputs, idx, labels):
        x = paper_features(outputs)
        self.booster_, self.present_ = xgb_fit(x[idx], labels, outputs.n_classes, float(self.learning_rate),
                                               int(self.max_depth), int(self.n_estimators), int(self.nthread),
                                               int(self.seed))

    def _predict(self, outputs):
        return xgb_predict(self.booster_, self.present_, paper_features(outputs), outputs.n_classes)

    def _state(self):
        return {"booster": booster_to_str(self.booster_), "present": self.present_}

    def _set_state(self, state):
        self.booster_ = booster_from_str(state.get("booster"))
        self.present_ = np.asarray(state["present"], dtype=np.int64)


BASELINES: dict[str, type[Aggregator]] = {
    "best_single_llm": BestSingleLLM,
    "majority_vote": MajorityVote,
    "mean_probs": MeanProbs,
    "paper_xgboost": PaperXGBoost,
    "dawid_skene": DawidSkene,
}
