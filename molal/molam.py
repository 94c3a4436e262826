"""MoLAM — the learned aggregator of a mixture of LLMs (aggregate stage), and its baselines.

Every aggregator has the same face::

    agg = MoLAM().fit(outputs, labeled_idx, labels)   # labeled_idx: rows of outputs; labels: class indices
    proba = agg.predict_proba(outputs)                 # (n, K), rows sum to 1
    agg.save("molam.json"); agg2 = load_aggregator("molam.json")  # or MoLAM.load(...)

Everything is chosen from the seed labels and the unlabeled pool only (never from gold labels of the
pool): the candidate models are compared by repeated stratified cross-validation on the seeds, and a
safety net falls back to the best single LLM (judged on the seeds) when no learned model is clearly
better. Classes absent from the seeds are predicted from the LLMs' own evidence through an unsupervised
Dawid–Skene posterior fitted on the whole pool.

Baselines with the same API: :class:`BestSingleLLM`, :class:`MajorityVote`, :class:`MeanProbs`,
:class:`PaperXGBoost` (the paper's XGBoost on raw probs + consistency, seeds only) and
:class:`DawidSkene` (EM over the pool, seeds clamped).
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from molal import __version__
from molal.data import LLMOutputs
from molal.io import atomic_write_bytes

FORMAT = "molal.aggregator"
FORMAT_VERSION = 1
_EPS = 1e-12

__all__ = [
    "Aggregator",
    "MoLAM",
    "BestSingleLLM",
    "MajorityVote",
    "MeanProbs",
    "PaperXGBoost",
    "DawidSkene",
    "BASELINES",
    "negative_labels",
    "load_aggregator",
    "MoLAMError",
]


class MoLAMError(ValueError):
    """Bad input to an aggregator (labels out of range, mismatched classes, unreadable model file...)."""


# --------------------------------------------------------------------------------------------------
# Signals and features
# --------------------------------------------------------------------------------------------------


def _votes(outputs: LLMOutputs) -> np.ndarray:
    """Per-LLM answer distribution (n, L, K): the sampled-answer consistency where recorded, else the
    one-hot argmax of the probabilities. A row with no valid answer (all zeros) stays all zeros."""
    if outputs.consistency is not None:
        return outputs.consistency
    p = outputs.probs
    out = np.zeros_like(p)
    np.put_along_axis(out, p.argmax(axis=2)[..., None], 1.0, axis=2)
    out[p.sum(axis=2) <= _EPS] = 0.0
    return out


def _normalize_rows(p: np.ndarray) -> np.ndarray:
    s = p.sum(axis=-1, keepdims=True)
    k = p.shape[-1]
    return np.where(s > _EPS, p / np.maximum(s, _EPS), 1.0 / k)


def _features(outputs: LLMOutputs, floor: float = 1e-3) -> np.ndarray:
    """General per-item features: per LLM, log of the renormalised probabilities (floored) and the vote
    shares; plus the mean probability vector and the pooled vote shares across LLMs."""
    n = outputs.n_items
    p = outputs.normalized_probs()
    v = _votes(outputs)
    parts = [np.log(np.maximum(p, floor)).reshape(n, -1)]
    if outputs.consistency is not None:
        parts.append(v.reshape(n, -1))
    parts.append(np.log(np.maximum(p.mean(axis=1), floor)))
    parts.append(_normalize_rows(v.sum(axis=1)))
    return np.concatenate(parts, axis=1)


def _paper_features(outputs: LLMOutputs) -> np.ndarray:
    """The paper's 2·N·K features: raw class probabilities and consistency per LLM, concatenated."""
    n = outputs.n_items
    return np.concatenate([outputs.probs.reshape(n, -1), _votes(outputs).reshape(n, -1)], axis=1)


def _ds_observations(outputs: LLMOutputs) -> np.ndarray:
    """Soft observations for Dawid–Skene: per LLM its vote shares and its renormalised probabilities
    (two "annotators" per LLM when consistency is recorded)."""
    p = outputs.normalized_probs()
    if outputs.consistency is None:
        return p
    return np.concatenate([outputs.consistency, p], axis=1)


def _ds_em(
    obs: np.ndarray,
    seed_idx: np.ndarray | None = None,
    seed_labels: np.ndarray | None = None,
    iters: int = 50,
    smooth: float = 0.01,
    tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dawid–Skene EM on soft observations ``obs`` (n, A, K). Returns (posterior (n,K), prior (K,),
    log confusion (A, K, K)). Seed rows (if given) are clamped to their labels."""
    n, _, k = obs.shape
    post = _normalize_rows(obs.mean(axis=1))
    eye = np.eye(k)
    if seed_idx is not None and len(seed_idx):
        post[seed_idx] = eye[seed_labels]
    prior = np.full(k, 1.0 / k)
    logpi = np.zeros((obs.shape[1], k, k))
    for _ in range(iters):
        prior = post.mean(axis=0) + 1e-6
        prior /= prior.sum()
        pi = np.einsum("nk,naj->akj", post, obs) + smooth
        pi /= pi.sum(axis=2, keepdims=True)
        logpi = np.log(pi)
        new = _ds_posterior(obs, prior, logpi)
        if seed_idx is not None and len(seed_idx):
            new[seed_idx] = eye[seed_labels]
        delta = float(np.abs(new - post).max())
        post = new
        if delta < tol:
            break
    return post, prior, logpi


def _ds_posterior(obs: np.ndarray, prior: np.ndarray, logpi: np.ndarray) -> np.ndarray:
    logt = np.log(prior)[None, :] + np.einsum("naj,akj->nk", obs, logpi)
    logt -= logt.max(axis=1, keepdims=True)
    t = np.exp(logt)
    return t / t.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Base class: validation, persistence
# --------------------------------------------------------------------------------------------------


def _check_fit_inputs(outputs: LLMOutputs, labeled_idx: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(outputs, LLMOutputs):
        raise MoLAMError(f"outputs must be an LLMOutputs, got {type(outputs).__name__}")
    idx = np.asarray(labeled_idx)
    lab = np.asarray(labels)
    if idx.ndim != 1 or lab.ndim != 1:
        raise MoLAMError("labeled_idx and labels must be 1-D sequences")
    if len(idx) != len(lab):
        raise MoLAMError(f"{len(idx)} labeled indices but {len(lab)} labels")
    if len(idx) == 0:
        raise MoLAMError("no seed labels: fit needs at least one labeled item (labeled_idx is empty)")
    if not np.issubdtype(idx.dtype, np.integer) or not np.issubdtype(lab.dtype, np.integer):
        raise MoLAMError("labeled_idx and labels must be integers (row indices and class indices)")
    idx = idx.astype(np.int64)
    lab = lab.astype(np.int64)
    if idx.min() < 0 or idx.max() >= outputs.n_items:
        raise MoLAMError(f"labeled_idx out of range [0, {outputs.n_items}): min {idx.min()}, max {idx.max()}")
    if len(np.unique(idx)) != len(idx):
        raise MoLAMError("labeled_idx has duplicate rows")
    if lab.min() < 0 or lab.max() >= outputs.n_classes:
        raise MoLAMError(
            f"labels out of range [0, {outputs.n_classes}) for classes {outputs.class_names}: "
            f"min {lab.min()}, max {lab.max()}"
        )
    return idx, lab


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _unjson(x: Any) -> Any:
    if isinstance(x, dict):
        if "__ndarray__" in x:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        return {k: _unjson(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjson(v) for v in x]
    return x


class Aggregator:
    """Common face of MoLAM and the baselines: fit / predict_proba / predict / save / load."""

    kind: ClassVar[str] = "aggregator"

    def __init__(self) -> None:
        self.class_names: list[str] | None = None
        self.llm_names: list[str] | None = None
        self.metadata: dict[str, Any] = {}

    # -- to override -------------------------------------------------------------------------------
    def _fit(self, outputs: LLMOutputs, idx: np.ndarray, labels: np.ndarray) -> None:
        raise NotImplementedError

    def _predict(self, outputs: LLMOutputs) -> np.ndarray:
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        return {}

    def _state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        pass

    # -- public ------------------------------------------------------------------------------------
    def fit(self, outputs: LLMOutputs, labeled_idx: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray):
        """Fit on ``outputs`` (the whole pool; unlabeled rows may be used) with seed labels ``labels``
        (class indices) at rows ``labeled_idx``. Returns self."""
        idx, lab = _check_fit_inputs(outputs, labeled_idx, labels)
        t0 = time.perf_counter()
        self.class_names = list(outputs.class_names)
        self.llm_names = list(outputs.llm_names)
        self.metadata = {}
        self._fit(outputs, idx, lab)
        counts = np.bincount(lab, minlength=outputs.n_classes)
        self.metadata.update(
            {
                "kind": self.kind,
                "molal_version": __version__,
                "format_version": FORMAT_VERSION,
                "class_names": self.class_names,
                "llm_names": self.llm_names,
                "n_pool": int(outputs.n_items),
                "n_seeds": int(len(idx)),
                "seed_class_counts": {c: int(n) for c, n in zip(self.class_names, counts, strict=True)},
                "classes_unseen_in_seeds": [c for c, n in zip(self.class_names, counts, strict=True) if n == 0],
                "has_consistency": outputs.consistency is not None,
                "fit_seconds": round(time.perf_counter() - t0, 4),
                "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "params": self._params(),
            }
        )
        return self

    def _check_predict(self, outputs: LLMOutputs) -> None:
        if self.class_names is None:
            raise MoLAMError(f"{type(self).__name__} is not fitted: call fit() or load() first")
        if not isinstance(outputs, LLMOutputs):
            raise MoLAMError(f"outputs must be an LLMOutputs, got {type(outputs).__name__}")
        if list(outputs.class_names) != self.class_names:
            raise MoLAMError(f"class names {outputs.class_names} do not match the fitted ones {self.class_names}")
        if list(outputs.llm_names) != self.llm_names:
            raise MoLAMError(f"LLM names {outputs.llm_names} do not match the fitted ones {self.llm_names}")
        if bool(self.metadata.get("has_consistency")) and outputs.consistency is None:
            raise MoLAMError("this model was fitted with consistency (sampled answers); these outputs have none")

    def predict_proba(self, outputs: LLMOutputs) -> np.ndarray:
        """(n, K) class distribution per item; rows sum to 1."""
        self._check_predict(outputs)
        p = np.asarray(self._predict(outputs), dtype=np.float64)
        p = np.clip(p, 0.0, None)
        return _normalize_rows(p)

    def predict(self, outputs: LLMOutputs) -> np.ndarray:
        """(n,) predicted class indices."""
        return self.predict_proba(outputs).argmax(axis=1)

    def to_dict(self) -> dict[str, Any]:
        if self.class_names is None:
            raise MoLAMError("cannot save an unfitted aggregator")
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "molal_version": __version__,
            "class_names": self.class_names,
            "llm_names": self.llm_names,
            "params": _jsonable(self._params()),
            "metadata": _jsonable(self.metadata),
            "state": _jsonable(self._state()),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted model as one JSON file, atomically (class/LLM names, version, metadata)."""
        data = json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8")
        return atomic_write_bytes(path, data, mode=0o644)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Aggregator:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise MoLAMError("not a molal aggregator file")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise MoLAMError(f"aggregator format version {d['format_version']} is newer than this molal")
        kind = d.get("kind")
        if kind not in _KINDS:
            raise MoLAMError(f"unknown aggregator kind {kind!r}")
        klass = _KINDS[kind]
        if cls is not Aggregator and not issubclass(klass, cls):
            raise MoLAMError(f"file holds a {klass.__name__}, not a {cls.__name__}")
        obj = klass(**_unjson(d.get("params", {})))
        obj.class_names = list(d["class_names"])
        obj.llm_names = list(d["llm_names"])
        obj.metadata = _unjson(d.get("metadata", {}))
        obj._set_state(_unjson(d.get("state", {})))
        return obj

    @classmethod
    def load(cls, path: str | os.PathLike[str]):
        """Read a model written by :meth:`save`."""
        p = Path(path)
        if not p.exists():
            raise MoLAMError(f"{p}: model file not found")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MoLAMError(f"{p}: cannot read model file ({exc})") from exc
        try:
            return cls.from_dict(d)
        except MoLAMError as exc:
            raise MoLAMError(f"{p}: {exc}") from None


def load_aggregator(path: str | os.PathLike[str]) -> Aggregator:
    """Load any aggregator (MoLAM or a baseline) saved with ``save``."""
    return Aggregator.load(path)


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


class MajorityVote(Aggregator):
    """Pooled vote shares of all LLMs (sampled answers where recorded, else each LLM's argmax); ties
    and rows without votes are resolved by the mean probabilities."""

    kind = "majority_vote"

    def _fit(self, outputs, idx, labels):
        pass

    def _predict(self, outputs):
        v = _votes(outputs).sum(axis=1)
        return v + 1e-6 * _normalize_rows(outputs.normalized_probs().mean(axis=1))


class MeanProbs(Aggregator):
    """Mean over LLMs of the recorded class probabilities, renormalised."""

    kind = "mean_probs"

    def _fit(self, outputs, idx, labels):
        pass

    def _predict(self, outputs):
        return outputs.probs.mean(axis=1)


class BestSingleLLM(Aggregator):
    """The single source (one LLM's probabilities or its sampled votes) most accurate on the seeds;
    ties broken by agreement with the majority vote on the pool (no gold used)."""

    kind = "best_single_llm"

    def __init__(self) -> None:
        super().__init__()
        self.source: tuple[str, int] | None = None  # ("probs"|"votes", llm index)

    @staticmethod
    def _sources(outputs: LLMOutputs) -> list[tuple[str, int, np.ndarray]]:
        p = outputs.normalized_probs()
        out = [("probs", m, p[:, m]) for m in range(outputs.n_llms)]
        if outputs.consistency is not None:
            # votes, with the probabilities as tie-breaker / fallback when no answer was valid
            out += [("votes", m, outputs.consistency[:, m] + 1e-3 * p[:, m]) for m in range(outputs.n_llms)]
        return out

    def _fit(self, outputs, idx, labels):
        mv = MajorityVote()._predict(outputs).argmax(axis=1)
        best, best_key = None, None
        scores = {}
        for name, m, p in self._sources(outputs):
            acc = float((p[idx].argmax(axis=1) == labels).mean())
            agree = float((p.argmax(axis=1) == mv).mean())
            scores[f"{outputs.llm_names[m]}:{name}"] = round(acc, 4)
            key = (acc, agree)
            if best_key is None or key > best_key:
                best, best_key = (name, m), key
        self.source = best
        self.metadata["seed_accuracy"] = best_key[0]
        self.metadata["source"] = f"{outputs.llm_names[best[1]]}:{best[0]}"
        self.metadata["seed_accuracy_by_source"] = scores

    def _predict(self, outputs):
        name, m = self.source
        for n2, m2, p in self._sources(outputs):
            if (n2, m2) == (name, m):
                return p
        raise MoLAMError(f"source {name} of LLM {m} not available in these outputs")

    def _state(self):
        return {"source": list(self.source) if self.source else None}

    def _set_state(self, state):
        s = state.get("source")
        self.source = (s[0], int(s[1])) if s else None


class DawidSkene(Aggregator):
    """Dawid–Skene EM over the whole pool: each LLM's votes and probabilities are soft annotations with a
    per-source confusion matrix; seed rows are clamped to their labels (semi-supervised)."""

    kind = "dawid_skene"

    def __init__(self, iters: int = 50, smooth: float = 0.01) -> None:
        super().__init__()
        self.iters = int(iters)
        self.smooth = float(smooth)
        self.prior: np.ndarray | None = None
        self.logpi: np.ndarray | None = None

    def _params(self):
        return {"iters": self.iters, "smooth": self.smooth}

    def _fit(self, outputs, idx, labels):
        _, self.prior, self.logpi = _ds_em(_ds_observations(outputs), idx, labels, self.iters, self.smooth)

    def _predict(self, outputs):
        return _ds_posterior(_ds_observations(outputs), self.prior, self.logpi)

    def _state(self):
        return {"prior": self.prior, "logpi": self.logpi}

    def _set_state(self, state):
        self.prior = np.asarray(state["prior"], dtype=np.float64)
        self.logpi = np.asarray(state["logpi"], dtype=np.float64)


def _xgb_fit(x: np.ndarray, y: np.ndarray, k: int, lr: float, depth: int, trees: int, nthread: int, seed: int):
    """XGBoost softprob on classes present in y; returns (booster raw json str, classes present)."""
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


class _SavedBooster:
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


def _xgb_predict(booster, present: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(x), k))
    if booster is None:
        out[:, present] = 1.0
        return out
    import xgboost as xgb

    if isinstance(booster, _SavedBooster):
        booster = booster.get()
    out[:, present] = booster.predict(xgb.DMatrix(x)).reshape(len(x), len(present))
    return out


def _booster_to_str(booster) -> str | None:
    if booster is None:
        return None
    if isinstance(booster, _SavedBooster):
        return booster.raw
    return bytes(booster.save_raw("json")).decode("utf-8")


def _booster_from_str(s: str | None) -> _SavedBooster | None:
    return None if s is None else _SavedBooster(s)


class PaperXGBoost(Aggregator):
    """The paper's MoLAM without the gold-selected restarts: XGBoost on raw probs + consistency
    (2·N·K features) trained on the seeds only. Classes absent from the seeds get probability 0.
    Defaults: TREC settings (lr 0.05, depth 6, 300 trees)."""

    kind = "paper_xgboost"

    def __init__(self, learning_rate: float = 0.05, max_depth: int = 6, n_estimators: int = 300,
                 nthread: int = 1, seed: int = 0) -> None:
        super().__init__()
        self.learning_rate = float(learning_rate)
        self.max_depth = int(max_depth)
        self.n_estimators = int(n_estimators)
        self.nthread = int(nthread)
        self.seed = int(seed)
        self.booster = None
        self.present: np.ndarray | None = None

    def _params(self):
        return {"learning_rate": self.learning_rate, "max_depth": self.max_depth,
                "n_estimators": self.n_estimators, "nthread": self.nthread, "seed": self.seed}

    def _fit(self, outputs, idx, labels):
        x = _paper_features(outputs)
        self.booster, self.present = _xgb_fit(x[idx], labels, outputs.n_classes, self.learning_rate,
                                              self.max_depth, self.n_estimators, self.nthread, self.seed)

    def _predict(self, outputs):
        return _xgb_predict(self.booster, self.present, _paper_features(outputs), outputs.n_classes)

    def _state(self):
        return {"booster": _booster_to_str(self.booster), "present": self.present}

    def _set_state(self, state):
        self.booster = _booster_from_str(state.get("booster"))
        self.present = np.asarray(state["present"], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# MoLAM
# --------------------------------------------------------------------------------------------------


def _lr_fit(x: np.ndarray, y: np.ndarray, c: float, weights: np.ndarray | None = None):
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


def _lr_predict(coef, inter, present, x: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((x.shape[0], k))
    if coef is None:
        out[:, present] = 1.0
        return out
    z = x @ coef.T + inter
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out[:, present] = e / e.sum(axis=1, keepdims=True)
    return out


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    return mu, np.where(sd > 1e-9, sd, 1.0)


_TEXT_FLOOR = 1e-3


def embed_texts_cached(texts: list[str], encoder: str = "minilm", max_length: int = 64, device: str = "cpu") -> np.ndarray:
    """(n, d) unit-norm embeddings of ``texts`` with a sentence encoder (``"minilm"`` = bundled), reusing
    the process-wide embedding cache of :mod:`molal.annotators.embedding` (an aggregator's fit and its
    predictions on the same pool embed each text once)."""
    from molal.annotators.embedding import embed_texts_shared

    emb, _ = embed_texts_shared(texts, encoder, device, 64, int(max_length))
    return emb.astype(np.float64)


def _stratified_folds(labels: np.ndarray, n_folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Fold id per seed, classes spread evenly across folds."""
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.where(labels == c)[0])
        fold[members] = (np.arange(len(members)) + offset) % n_folds
        offset += len(members)
    return fold


class MoLAM(Aggregator):
    """Mixture-of-LLMs aggregator chosen by cross-validation on the seeds.

    Candidates: logistic regression on general features (per-LLM log-probabilities and vote shares,
    their means, and the pool's Dawid–Skene posterior) at several regularisation strengths, XGBoost on the
    same features, the Dawid–Skene posterior itself, and the best single LLM. The candidate with the best
    repeated stratified out-of-fold accuracy on the seeds is the reference; by the one-standard-error rule the
    steadiest candidate within one standard error of it is chosen (the average of the low-variance models,
    then Dawid–Skene, then the best single LLM, then the rest by accuracy). Safety net: the choice is never
    more than one standard error below the best single LLM's out-of-fold accuracy. Classes absent from the seeds keep
    the probability mass the Dawid–Skene posterior gives them.

    Args:
        candidates: names among ``lr_C`` (C in ``lr_cs``), ``xgb``, ``ds``, ``best_single``, ``avg``
            (mean of the lr_*, xgb, ds and best_single models); None = all.
        lr_cs: regularisation strengths tried for the logistic regression.
        n_folds, n_repeats: the cross-validation on the seeds.
        xgb_params: learning_rate / max_depth / n_estimators of the XGBoost candidate.
        nthread: threads for XGBoost and the BLAS pools during fit (1 is fastest for ~50 seeds).
        seed: random seed of the folds and XGBoost.
        progress: show a rich progress bar during model selection.
        text_features: None (default: the LLM outputs only) or a sentence encoder (``"minilm"`` = the
            bundled all-MiniLM-L6-v2, or a local model folder) to correct the chosen model with the texts
            themselves (needs ``outputs.texts``). Transductive text model: every pool text is embedded;
            a multinomial logistic regression on the embeddings (+ hashed word n-grams, ``text_ngrams``)
            is trained on the whole pool with the
            LLM-only MoLAM's labels (weighted by their confidence; the seeds with their gold labels,
            weight ``text_seed_weight``), cross-fitted in ``text_folds`` folds assigned by a hash of the
            text, so no item's text prediction comes from a model that saw its own label (and
            duplicates share a fold). Prediction = the LLM-only MoLAM's distribution times the text
            model's distribution to the power ``text_weight``, renormalised. Texts outside the fit pool
            are scored by the fold model their hash picks, exactly like the pool. TREC, 50 seeds
            (bench/molam_quality.py): non-seed label accuracy 0.783 -> 0.806 (draws 0-4) and 0.778 -> 0.799
            (held-out draws 5-9) with the defaults; +30 s fit on 5,452 items (+ embedding the pool once).
        text_weight: exponent of the text model's distribution in the product (0 = no effect).
        text_c: inverse regularisation strength of the text logistic regression.
        text_folds: cross-fitting folds of the text model (>= 2).
        text_seed_weight: sample weight of a seed (gold) row in the text model; pool rows weigh their
            MoLAM confidence (at most 1).
        text_rounds: self-training rounds of the text model: round r+1 learns from the labels (and
            confidences) of round r's product; the last round's model is kept.
        text_ngrams: 0 (embeddings only) or the number of hashed word uni/bigram features (L2-normalised
            counts, stateless ``HashingVectorizer``) appended to the embeddings: TREC's classes hang on
            question words that sentence embeddings blur. The saved model grows by 6·K·text_ngrams floats.
        text_max_length: encoder truncation (tokens).
        text_device: torch device of the encoder (``"auto"`` = CUDA when available).
    """

    kind = "molam"

    def __init__(
        self,
        candidates: Sequence[str] | None = None,
        lr_cs: Sequence[float] = (0.03, 0.1, 0.3, 1.0),
        n_folds: int = 5,
        n_repeats: int = 3,
        xgb_params: dict[str, Any] | None = None,
        nthread: int = 1,
        seed: int = 0,
        progress: bool = False,
        text_features: str | None = None,
        text_weight: float = 1.0,
        text_c: float = 3.0,
        text_folds: int = 5,
        text_seed_weight: float = 10.0,
        text_rounds: int = 3,
        text_ngrams: int = 4096,
        text_max_length: int = 64,
        text_device: str = "cpu",
    ) -> None:
        super().__init__()
        if text_features is not None and (not isinstance(text_features, str) or not text_features.strip()):
            raise MoLAMError(f"text_features must be None or an encoder name/folder (e.g. 'minilm'), got {text_features!r}")
        if not float(text_weight) >= 0:
            raise MoLAMError(f"text_weight must be >= 0, got {text_weight}")
        if not float(text_c) > 0:
            raise MoLAMError(f"text_c must be > 0, got {text_c}")
        if int(text_folds) < 2:
            raise MoLAMError(f"text_folds must be >= 2, got {text_folds}")
        if not float(text_seed_weight) > 0:
            raise MoLAMError(f"text_seed_weight must be > 0, got {text_seed_weight}")
        if int(text_rounds) < 1:
            raise MoLAMError(f"text_rounds must be >= 1, got {text_rounds}")
        if int(text_ngrams) < 0:
            raise MoLAMError(f"text_ngrams must be >= 0 (0 = embeddings only), got {text_ngrams}")
        if int(text_max_length) < 8:
            raise MoLAMError(f"text_max_length must be >= 8, got {text_max_length}")
        self.text_features = text_features
        self.text_weight = float(text_weight)
        self.text_c = float(text_c)
        self.text_folds = int(text_folds)
        self.text_seed_weight = float(text_seed_weight)
        self.text_rounds = int(text_rounds)
        self.text_ngrams = int(text_ngrams)
        self.text_max_length = int(text_max_length)
        self.text_device = str(text_device)
        self.candidates = list(candidates) if candidates is not None else None
        self.lr_cs = [float(c) for c in lr_cs]
        self.n_folds = int(n_folds)
        self.n_repeats = int(n_repeats)
        self.xgb_params = dict(xgb_params or {"learning_rate": 0.05, "max_depth": 3, "n_estimators": 200})
        self.nthread = int(nthread)
        self.seed = int(seed)
        self.progress = bool(progress)
        # fitted state
        self.choice: str | None = None
        self.ds_prior: np.ndarray | None = None
        self.ds_logpi: np.ndarray | None = None
        self.mu: np.ndarray | None = None
        self.sd: np.ndarray | None = None
        self.model: dict[str, Any] = {}
        self.unseen: np.ndarray | None = None
        self.text_model: list[dict[str, Any]] | None = None  # one logistic regression per text fold

    def _params(self):
        text = {}
        if self.text_features is not None:  # only then: files written without the option stay as before
            text = {"text_features": self.text_features, "text_weight": self.text_weight, "text_c": self.text_c,
                    "text_folds": self.text_folds, "text_seed_weight": self.text_seed_weight, "text_rounds": self.text_rounds, "text_ngrams": self.text_ngrams,
                    "text_max_length": self.text_max_length, "text_device": self.text_device}
        return {**text,
            "candidates": self.candidates,
            "lr_cs": self.lr_cs,
            "n_folds": self.n_folds,
            "n_repeats": self.n_repeats,
            "xgb_params": self.xgb_params,
            "nthread": self.nthread,
            "seed": self.seed,
            "progress": self.progress,
        }

    # -- features ----------------------------------------------------------------------------------
    def _ds(self, outputs: LLMOutputs) -> np.ndarray:
        return _ds_posterior(_ds_observations(outputs), self.ds_prior, self.ds_logpi)

    def _x(self, outputs: LLMOutputs, ds_post: np.ndarray) -> np.ndarray:
        x = np.concatenate([_features(outputs), np.log(np.maximum(ds_post, 1e-4))], axis=1)
        return (x - self.mu) / self.sd

    # -- candidates --------------------------------------------------------------------------------
    def _candidate_names(self, outputs: LLMOutputs) -> list[str]:
        names = [f"lr_{c:g}" for c in self.lr_cs] + ["xgb", "ds", "best_single", "avg"]
        if self.candidates is not None:
            unknown = [c for c in self.candidates if c not in names]
            if unknown:
                raise MoLAMError(f"unknown MoLAM candidates {unknown}; choose from {names}")
            names = [c for c in names if c in self.candidates]
        return names

    def _avg_members(self, names: list[str]) -> list[str]:
        """Members of the ``avg`` candidate: the logistic regressions, XGBoost, Dawid–Skene and the best
        single LLM (their mean is steadier than any one of them chosen on 50 noisy seeds)."""
        base = [f"lr_{c:g}" for c in self.lr_cs] + ["xgb", "ds", "best_single"]
        return [n for n in base if n in names] or base

    def _fit_candidate(self, name: str, outputs, x, ds_post, idx, labels, members=None) -> dict[str, Any]:
        k = outputs.n_classes
        if name == "avg":
            return {"type": "avg", "members": [self._fit_candidate(m, outputs, x, ds_post, idx, labels)
                                               for m in (members or self._avg_members([]))]}
        if name.startswith("lr_"):
            coef, inter, present = _lr_fit(x[idx], labels, float(name[3:]))
            return {"type": "lr", "coef": coef, "intercept": inter, "present": present}
        if name == "xgb":
            booster, present = _xgb_fit(x[idx], labels, k, float(self.xgb_params["learning_rate"]),
                                        int(self.xgb_params["max_depth"]), int(self.xgb_params["n_estimators"]),
                                        self.nthread, self.seed)
            return {"type": "xgb", "booster": booster, "present": present}
        if name == "ds":
            return {"type": "ds"}
        if name == "best_single":
            b = BestSingleLLM()
            b.class_names, b.llm_names = list(outputs.class_names), list(outputs.llm_names)
            b._fit(outputs, idx, labels)
            return {"type": "best_single", "source": list(b.source)}
        raise MoLAMError(f"unknown candidate {name}")

    def _predict_candidate(self, model: dict[str, Any], outputs, x, ds_post, rows=None) -> np.ndarray:
        k = outputs.n_classes
        sel = slice(None) if rows is None else rows
        t = model["type"]
        if t == "avg":
            return np.mean([_normalize_rows(np.clip(self._predict_candidate(m, outputs, x, ds_post, rows), 0, None))
                            for m in model["members"]], axis=0)
        if t == "lr":
            p = _lr_predict(model["coef"], model["intercept"], model["present"], x[sel], k)
        elif t == "xgb":
            p = _xgb_predict(model["booster"], model["present"], x[sel], k)
        elif t == "ds":
            return ds_post[sel]
        elif t == "best_single":
            b = BestSingleLLM()
            b.source = (model["source"][0], int(model["source"][1]))
            return _normalize_rows(b._predict(outputs)[sel])
        else:
            raise MoLAMError(f"unknown candidate type {t}")
        return self._fill_unseen(p, ds_post[sel], model["present"], k)

    @staticmethod
    def _fill_unseen(p: np.ndarray, ds_post: np.ndarray, present: np.ndarray, k: int) -> np.ndarray:
        """Give classes the model never saw the Dawid–Skene posterior's mass; scale the rest."""
        unseen = np.setdiff1d(np.arange(k), present)
        if len(unseen) == 0:
            return p
        u = ds_post[:, unseen].sum(axis=1, keepdims=True)
        out = p * (1.0 - u)
        out[:, unseen] = ds_post[:, unseen]
        return out

    # -- fit / predict -----------------------------------------------------------------------------
    def _fit(self, outputs, idx, labels):
        from threadpoolctl import threadpool_limits

        if self.text_features is not None and outputs.texts is None:
            raise MoLAMError("text_features needs the texts of the pool (outputs.texts is None)")
        self.text_model = None
        emb, t_emb = None, 0.0
        if self.text_features is not None:  # the encoder runs outside the one-thread limit below
            t0 = time.perf_counter()
            emb = self._embed(outputs.texts)
            t_emb = time.perf_counter() - t0
        # many tiny fits: thread pools only add contention (tens of times slower on a busy machine)
        with threadpool_limits(limits=self.nthread):
            self._fit_select(outputs, idx, labels)
            if emb is not None:
                self._fit_text(outputs, idx, labels, emb, t_emb)

    # -- text model (text_features) ----------------------------------------------------------------
    def _embed(self, texts: Sequence[str]):
        """Text-model inputs: unit-norm sentence embeddings of ``texts`` (shared in-process cache with the
        embedding annotators), plus hashed word n-grams when ``text_ngrams`` > 0 (then a sparse matrix)."""
        emb = embed_texts_cached(list(texts), self.text_features or "minilm", self.text_max_length, self.text_device)
        if self.text_ngrams <= 0 or len(texts) == 0:
            return emb
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import HashingVectorizer

        grams = HashingVectorizer(n_features=self.text_ngrams, ngram_range=(1, 2), alternate_sign=False,
                                  norm="l2").transform(list(texts))
        return sp.hstack([sp.csr_matrix(emb), grams]).tocsr()

    def _text_fold(self, texts: Sequence[str]) -> np.ndarray:
        """Cross-fitting fold of each text: a hash of the text and the seed (stable across processes)."""
        salt = f"{self.seed}\x1f".encode()
        return np.array([zlib.crc32(salt + t.encode("utf-8")) % self.text_folds for t in texts], dtype=np.int64)

    def _fit_text(self, outputs, idx, labels, emb: np.ndarray, t_emb: float):
        t0 = time.perf_counter()
        base = _normalize_rows(np.clip(np.asarray(self._predict_base(outputs), dtype=np.float64), 0, None))
        fold = self._text_fold(outputs.texts)
        current = base
        for _ in range(self.text_rounds):  # self-training: each round learns from the previous round's labels
            y = current.argmax(axis=1)
            w = current.max(axis=1)
            y[idx], w[idx] = labels, self.text_seed_weight
            models = []
            for f in range(self.text_folds):
                tr = fold != f
                coef, inter, present = _lr_fit(emb[tr], y[tr], self.text_c, w[tr]) if tr.any() else (None, None, np.unique(y))
                models.append({"coef": coef, "intercept": inter, "present": present})
            self.text_model = models
            t = self._text_proba(emb, fold, outputs.n_classes)
            current = _normalize_rows(base * t**self.text_weight)
        rest = np.setdiff1d(np.arange(outputs.n_items), idx)
        self.metadata["text"] = {
            "encoder": self.text_features,
            "embed_seconds": round(t_emb, 3),
            "fit_seconds": round(time.perf_counter() - t0, 3),
            "seed_accuracy_text_model": float((t[idx].argmax(1) == labels).mean()),
            # how often the text model changes the LLM-only label on the unlabeled pool (no gold used)
            "changed_share_non_seed": float((current[rest].argmax(1) != base[rest].argmax(1)).mean()) if len(rest) else 0.0,
        }

    def _text_proba(self, emb, fold: np.ndarray, k: int) -> np.ndarray:
        out = np.zeros((emb.shape[0], k))
        for f, m in enumerate(self.text_model or []):
            rows = fold == f
            if rows.any():
                out[rows] = _lr_predict(m["coef"], m["intercept"], m["present"], emb[rows], k)
        # a class the text model never saw keeps a small floor instead of vetoing the product
        return (1.0 - _TEXT_FLOOR) * out + _TEXT_FLOOR / k

    def _fit_select(self, outputs, idx, labels):
        from molal.progress import progress_bar

        k = outputs.n_classes
        _, self.ds_prior, self.ds_logpi = _ds_em(_ds_observations(outputs), idx, labels)
        ds_post = self._ds(outputs)
        raw = np.concatenate([_features(outputs), np.log(np.maximum(ds_post, 1e-4))], axis=1)
        self.mu, self.sd = _standardize(raw)
        x = (raw - self.mu) / self.sd
        names = self._candidate_names(outputs)
        members = self._avg_members(names)
        if "avg" in names:  # the average needs its members' out-of-fold predictions
            names = [n for n in names if n != "avg"] + [m for m in members if m not in names] + ["avg"]
        rng = np.random.default_rng(self.seed)
        # out-of-fold predictions on the seeds, repeated stratified K-fold
        n_folds = max(2, min(self.n_folds, len(idx)))
        acc = {n: [] for n in names}
        ll = {n: [] for n in names}
        can_cv = len(idx) >= 2 * n_folds
        total = self.n_repeats * n_folds * len(names) if can_cv else 1
        with progress_bar("MoLAM model selection", total, enabled=self.progress) as bar:
            if can_cv:
                for _ in range(self.n_repeats):
                    fold = _stratified_folds(labels, n_folds, rng)
                    oof = {n: np.zeros((len(idx), k)) for n in names}
                    for f in range(n_folds):
                        tr, te = fold != f, fold == f
                        for n in names:
                            if n == "avg":
                                continue
                            m = self._fit_candidate(n, outputs, x, ds_post, idx[tr], labels[tr])
                            oof[n][te] = self._predict_candidate(m, outputs, x, ds_post, idx[te])
                            bar.advance()
                        bar.advance()
                    if "avg" in names:
                        oof["avg"] = np.mean([_normalize_rows(np.clip(oof[m], 0, None)) for m in members], axis=0)
                    for n in names:
                        pr = _normalize_rows(np.clip(oof[n], 0, None))
                        acc[n].append(float((pr.argmax(1) == labels).mean()))
                        ll[n].append(float(-np.log(np.maximum(pr[np.arange(len(labels)), labels], 1e-6)).mean()))
        cv = {n: {"accuracy": float(np.mean(acc[n])) if acc[n] else None,
                  "log_loss": float(np.mean(ll[n])) if ll[n] else None} for n in names}
        # best single LLM on all seeds (the safety-net reference)
        ref = BestSingleLLM()
        ref.class_names, ref.llm_names = list(outputs.class_names), list(outputs.llm_names)
        ref._fit(outputs, idx, labels)
        ref_acc = float(ref.metadata["seed_accuracy"])
        se = 0.0
        if can_cv:
            # one-standard-error rule: among candidates whose out-of-fold accuracy is within one standard
            # error of the best, take the steadiest (the average of models, then DS, then the best LLM).
            best_acc = max(cv[n]["accuracy"] for n in names)
            se = float(np.sqrt(max(best_acc * (1 - best_acc), 1e-3) / len(idx)))
            steady = {"avg": 3, "ds": 2, "best_single": 1}
            close = [n for n in names if cv[n]["accuracy"] >= best_acc - se]
            choice = max(close, key=lambda n: (steady.get(n, 0), cv[n]["accuracy"], -cv[n]["log_loss"]))
            # safety net: never clearly worse out-of-fold than the best single LLM
            if "best_single" in names and cv[choice]["accuracy"] < cv["best_single"]["accuracy"] - se:
                choice = "best_single"
        else:
            choice = "ds" if "ds" in names else names[0]
        self.choice = choice
        self.model = self._fit_candidate(choice, outputs, x, ds_post, idx, labels, members=members)
        self.metadata.update(
            {
                "choice": choice,
                "cv": cv,
                "cv_folds": n_folds if can_cv else 0,
                "cv_repeats": self.n_repeats if can_cv else 0,
                "cv_standard_error": se if can_cv else None,
                "best_single_source": ref.metadata["source"],
                "best_single_seed_accuracy": ref_acc,
            }
        )

    def _predict_base(self, outputs):
        ds_post = self._ds(outputs)
        x = self._x(outputs, ds_post) if self.model.get("type") in ("lr", "xgb", "avg") else None
        return self._predict_candidate(self.model, outputs, x, ds_post)

    def _predict(self, outputs):
        base = self._predict_base(outputs)
        if not self.text_model:
            return base
        if outputs.texts is None:
            raise MoLAMError("this MoLAM uses text features: the outputs need their texts (outputs.texts is None)")
        base = _normalize_rows(np.clip(np.asarray(base, dtype=np.float64), 0, None))
        t = self._text_proba(self._embed(outputs.texts), self._text_fold(outputs.texts), outputs.n_classes)
        return base * t**self.text_weight

    @staticmethod
    def _model_out(m: dict[str, Any]) -> dict[str, Any]:
        m = dict(m)
        if m.get("type") == "xgb":
            m["booster"] = _booster_to_str(m["booster"])
        if m.get("type") == "avg":
            m["members"] = [MoLAM._model_out(x) for x in m["members"]]
        return m

    @staticmethod
    def _model_in(m: dict[str, Any]) -> dict[str, Any]:
        m = dict(m)
        if m.get("type") == "xgb":
            m["booster"] = _booster_from_str(m["booster"])
        if m.get("type") == "avg":
            m["members"] = [MoLAM._model_in(x) for x in m["members"]]
        if m.get("present") is not None:
            m["present"] = np.asarray(m["present"], dtype=np.int64)
        for key in ("coef", "intercept"):
            if m.get(key) is not None:
                m[key] = np.asarray(m[key], dtype=np.float64)
        return m

    def _state(self):
        m = self._model_out(self.model)
        state = {"choice": self.choice, "ds_prior": self.ds_prior, "ds_logpi": self.ds_logpi,
                 "mu": self.mu, "sd": self.sd, "model": m}
        if self.text_model is not None:
            state["text_model"] = [{"coef": t["coef"], "intercept": t["intercept"], "present": t["present"]}
                                   for t in self.text_model]
        return state

    def _set_state(self, state):
        self.choice = state["choice"]
        self.ds_prior = np.asarray(state["ds_prior"], dtype=np.float64)
        self.ds_logpi = np.asarray(state["ds_logpi"], dtype=np.float64)
        self.mu = np.asarray(state["mu"], dtype=np.float64)
        self.sd = np.asarray(state["sd"], dtype=np.float64)
        self.model = self._model_in(state["model"])
        tm = state.get("text_model")  # absent in files written without text_features (and before it existed)
        self.text_model = None if tm is None else [
            {"coef": None if t["coef"] is None else np.asarray(t["coef"], dtype=np.float64),
             "intercept": None if t["intercept"] is None else np.asarray(t["intercept"], dtype=np.float64),
             "present": np.asarray(t["present"], dtype=np.int64)} for t in tm]
        if self.text_model is not None and self.text_features is None:
            raise MoLAMError("model file has a text model but no text_features parameter")


BASELINES: dict[str, type[Aggregator]] = {
    "best_single_llm": BestSingleLLM,
    "majority_vote": MajorityVote,
    "mean_probs": MeanProbs,
    "paper_xgboost": PaperXGBoost,
    "dawid_skene": DawidSkene,
}
_KINDS: dict[str, type[Aggregator]] = {"molam": MoLAM, **BASELINES}


# --------------------------------------------------------------------------------------------------
# Negative labels
# --------------------------------------------------------------------------------------------------


def least_confident(probs: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` rows of ``probs`` whose top class is least probable, least confident first
    (ties keep row order): the labels the hybrid loop sends to people (``molal simulate --mode hybrid``,
    the backend's ``human_per_round``)."""
    conf = np.asarray(probs, dtype=np.float64).max(axis=1) if len(probs) else np.zeros(0)
    return np.argsort(conf, kind="stable")[: max(0, int(k))]


def negative_labels(outputs: LLMOutputs, threshold: float = 1e-3, predicted: np.ndarray | None = None) -> np.ndarray:
    """Classes each item surely is not: bool (n, K), True where the mean over LLMs of the recorded
    probability is ≤ ``threshold`` (the paper's rule). The predicted class — argmax of ``predicted``
    (n, K) if given, else of the mean probabilities — is never negative."""
    if not isinstance(outputs, LLMOutputs):
        raise MoLAMError(f"outputs must be an LLMOutputs, got {type(outputs).__name__}")
    if not threshold >= 0:
        raise MoLAMError(f"threshold must be >= 0, got {threshold}")
    mean = outputs.probs.mean(axis=1)
    neg = mean <= threshold
    if predicted is not None:
        predicted = np.asarray(predicted)
        if predicted.shape != mean.shape:
            raise MoLAMError(f"predicted has shape {predicted.shape}, expected {mean.shape}")
        top = predicted.argmax(axis=1)
    else:
        top = mean.argmax(axis=1)
    neg[np.arange(len(neg)), top] = False
    return neg
