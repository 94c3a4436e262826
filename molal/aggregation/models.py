"""The models MoLAM chooses among (its *candidates*), and the two learners under them.

A candidate is an object with ``fit(data)``, ``predict(data, rows)``, a ``state()`` it is saved as (a dict
whose ``"type"`` names its class: the saved format of MoLAM files) and ``from_state``. ``data``
(:class:`CandidateData`) carries what candidates read: the pool's outputs, MoLAM's standardised feature
matrix and the pool's Dawid–Skene posterior. Classes a candidate never saw in training keep the
posterior's mass for them (:func:`fill_unseen`).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from molal.aggregation.base import MoLAMError
from molal.aggregation.signals import best_single_source, normalize_rows, source_probs
from molal.data import LLMOutputs


# -- the learners ----------------------------------------------------------------------------------------
def lr_fit(x: np.ndarray, y: np.ndarray, c: float, weights: np.ndarray | None = None):
    """Multinomial logistic regression; returns (coef, intercept, classes present)."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y)
    if len(present) == 1:
        return None, None, present
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LogisticRegression(C=c, max_iter=2000).fit(x, y, sample_weight=weights)
    coef, inter = m.coef_, m.intercept_
    if len(present) == 2:  # sklearn keeps one row for binary problems
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        inter = np.array([-inter[0] / 2, inter[0] / 2])
    return coef, inter, present


def lr_predict(coef, inter, present, x: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((x.shape[0], k))
    if coef is None:
        out[:, present] = 1.0
        return out
    z = x @ coef.T + inter
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out[:, present] = e / e.sum(axis=1, keepdims=True)
    return out


def xgb_fit(x: np.ndarray, y: np.ndarray, k: int, lr: float, depth: int, trees: int, nthread: int, seed: int):
    """XGBoost softprob on classes present in y; returns (booster, classes present)."""
    import xgboost as xgb

    present = np.unique(y)
    remap = {c: i for i, c in enumerate(present)}
    yy = np.array([remap[c] for c in y])
    if len(present) == 1:
        return None, present
    params = {
        "objective": "multi:softprob",
        "num_class": len(present),
        "eta": lr,
        "max_depth": depth,
        "nthread": nthread,
        "seed": seed,
        "verbosity": 0,
    }
    booster = xgb.train(params, xgb.DMatrix(x, label=yy, nthread=nthread), num_boost_round=trees)
    return booster, present


class SavedBooster:
    """An XGBoost booster kept as its saved JSON and built on first use. Importing xgboost costs ~4 s (it
    imports scikit-learn): a published model loaded to answer Label Studio's /setup (3 s budget) must not
    pay it; the first prediction does."""

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self._booster = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._booster is None:
                import xgboost as xgb

                b = xgb.Booster()
                b.load_model(bytearray(self.raw.encode("utf-8")))
                self._booster = b
            return self._booster


def xgb_predict(booster, present: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(x), k))
    if booster is None:
        out[:, present] = 1.0
        return out
    import xgboost as xgb

    if isinstance(booster, SavedBooster):
        booster = booster.get()
    out[:, present] = booster.predict(xgb.DMatrix(x)).reshape(len(x), len(present))
    return out


def booster_to_str(booster) -> str | None:
    if booster is None:
        return None
    if isinstance(booster, SavedBooster):
        return booster.raw
    return bytes(booster.save_raw("json")).decode("utf-8")


def booster_from_str(s: str | None) -> SavedBooster | None:
    return None if s is None else SavedBooster(s)


def fill_unseen(p: np.ndarray, ds_post: np.ndarray, present: np.ndarray, k: int) -> np.ndarray:
    """Give classes the model never saw the Dawid–Skene posterior's mass; scale the rest."""
    unseen = np.setdiff1d(np.arange(k), present)
    if len(unseen) == 0:
        return p
    u = ds_post[:, unseen].sum(axis=1, keepdims=True)
    out = p * (1.0 - u)
    out[:, unseen] = ds_post[:, unseen]
    return out


# -- candidates ------------------------------------------------------------------------------------------
@dataclass
class CandidateData:
    """What candidates fit on and predict from: the pool's ``outputs``, MoLAM's standardised features ``x``
    (None when no candidate in use needs them) and the pool's Dawid–Skene posterior ``ds_post``."""

    outputs: LLMOutputs
    x: np.ndarray | None
    ds_post: np.ndarray

    @property
    def n_classes(self) -> int:
        return self.outputs.n_classes


class Candidate:
    """One model MoLAM may choose. ``uses_features``: it reads ``data.x``."""

    type: ClassVar[str] = ""
    uses_features: ClassVar[bool] = False

    def fit(self, data: CandidateData, idx: np.ndarray, labels: np.ndarray) -> Candidate:
        return self

    def predict(self, data: CandidateData, rows: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {"type": self.type}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Candidate:
        return cls()


class LogisticCandidate(Candidate):
    """Multinomial logistic regression with inverse regularisation ``c`` on the features."""

    type = "lr"
    uses_features = True

    def __init__(self, c: float = 1.0) -> None:
        self.c = c
        self.coef_ = self.intercept_ = None
        self.present_ = np.zeros(0, dtype=np.int64)

    def fit(self, data, idx, labels):
        self.coef_, self.intercept_, self.present_ = lr_fit(data.x[idx], labels, float(self.c))
        return self

    def predict(self, data, rows=None):
        sel = slice(None) if rows is None else rows
        p = lr_predict(self.coef_, self.intercept_, self.present_, data.x[sel], data.n_classes)
        return fill_unseen(p, data.ds_post[sel], self.present_, data.n_classes)

    def state(self):
        return {"type": self.type, "coef": self.coef_, "intercept": self.intercept_, "present": self.present_}

    @classmethod
    def from_state(cls, state):
        m = cls()
        m.coef_ = None if state.get("coef") is None else np.asarray(state["coef"], dtype=np.float64)
        m.intercept_ = None if state.get("intercept") is None else np.asarray(state["intercept"], dtype=np.float64)
        m.present_ = np.asarray(state["present"], dtype=np.int64)
        return m


class XGBCandidate(Candidate):
    """XGBoost (softprob) on the features; ``params``: learning_rate / max_depth / n_estimators."""

    type = "xgb"
    uses_features = True

    def __init__(self, params: dict[str, Any] | None = None, nthread: int = 1, seed: int = 0) -> None:
        self.params = params or {}
        self.nthread = nthread
        self.seed = seed
        self.booster_ = None
        self.present_ = np.zeros(0, dtype=np.int64)

    def fit(self, data, idx, labels):
        p = self.params
        self.booster_, self.present_ = xgb_fit(data.x[idx], labels, data.n_classes, float(p["learning_rate"]),
                                               int(p["max_depth"]), int(p["n_estimators"]), int(self.nthread),
                                               int(self.seed))
        return self

    def predict(self, data, rows=None):
        sel = slice(None) if rows is None else rows
        p = xgb_predict(self.booster_, self.present_, data.x[sel], data.n_classes)
        return fill_unseen(p, data.ds_post[sel], self.present_, data.n_classes)

    def state(self):
        return {"type": self.type, "booster": booster_to_str(self.booster_), "present": self.present_}

    @classmethod
    def from_state(cls, state):
        m = cls()
        m.booster_ = booster_from_str(state.get("booster"))
        m.present_ = np.asarray(state["present"], dtype=np.int64)
        return m


class DawidSkeneCandidate(Candidate):
    """The pool's Dawid–Skene posterior itself (nothing to fit on the seeds beyond it)."""

    type = "ds"

    def predict(self, data, rows=None):
        return data.ds_post[slice(None) if rows is None else rows]


class BestSingleCandidate(Candidate):
    """The single LLM source most accurate on the seeds (:func:`molal.aggregation.signals.best_single_source`,
    as :class:`molal.aggregation.baselines.BestSingleLLM`)."""

    type = "best_single"

    def __init__(self) -> None:
        self.source_: tuple[str, int] | None = None

    def fit(self, data, idx, labels):
        self.source_ = best_single_source(data.outputs, idx, labels)[0]
        return self

    def predict(self, data, rows=None):
        p = source_probs(data.outputs, self.source_)
        return normalize_rows(p[slice(None) if rows is None else rows])

    def state(self):
        return {"type": self.type, "source": list(self.source_)}

    @classmethod
    def from_state(cls, state):
        m = cls()
        m.source_ = (state["source"][0], int(state["source"][1]))
        return m


class AverageCandidate(Candidate):
    """The mean of its members' (clipped, renormalised) predictions."""

    type = "avg"

    def __init__(self, members: list[Candidate] | None = None) -> None:
        self.members = list(members or [])

    @property
    def uses_features(self) -> bool:  # type: ignore[override]
        return any(m.uses_features for m in self.members)

    def fit(self, data, idx, labels):
        for m in self.members:
            m.fit(data, idx, labels)
        return self

    def predict(self, data, rows=None):
        return np.mean([normalize_rows(np.clip(m.predict(data, rows), 0, None)) for m in self.members], axis=0)

    def state(self):
        return {"type": self.type, "members": [m.state() for m in self.members]}

    @classmethod
    def from_state(cls, state):
        return cls([candidate_from_state(m) for m in state["members"]])


CANDIDATE_TYPES: dict[str, type[Candidate]] = {
    c.type: c for c in (LogisticCandidate, XGBCandidate, DawidSkeneCandidate, BestSingleCandidate, AverageCandidate)
}


def candidate_from_state(state: dict[str, Any]) -> Candidate:
    """The candidate a saved state describes (its ``"type"``)."""
    klass = CANDIDATE_TYPES.get(state.get("type"))
    if klass is None:
        raise MoLAMError(f"unknown candidate type {state.get('type')!r}")
    return klass.from_state(state)


__all__ = ["CANDIDATE_TYPES", "AverageCandidate", "BestSingleCandidate", "Candidate", "CandidateData",
           "DawidSkeneCandidate", "LogisticCandidate", "XGBCandidate", "candidate_from_state", "fill_unseen",
           "lr_fit", "lr_predict", "xgb_fit", "xgb_predict"]
