"""MoLAM's transductive text model (``MoLAM(text_features=...)``): the texts themselves correct the labels the
LLMs' outputs give.

Every pool text is embedded (:mod:`molal.embeddings`, plus hashed word n-grams). A multinomial logistic
regression on those inputs learns the LLM-only MoLAM's labels over the whole pool (each weighted by its
confidence; the seeds with their gold labels, weight ``seed_weight``). It is cross-fitted in ``folds`` folds
assigned by a hash of the text, so no item's text prediction comes from a model that saw its own label, and
duplicates share a fold. It self-trains for ``rounds`` rounds. The corrected distribution is the LLM-only
one times the text model's to the power ``weight``, renormalised. Measured effect: bench/RESULTS.md (MoLAM
section).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from molal.aggregation.models import lr_fit, lr_predict
from molal.aggregation.signals import normalize_rows

#: a class the text model never saw keeps this floor instead of vetoing the product
TEXT_FLOOR = 1e-3


def embed_texts_cached(texts: list[str], encoder: str = "minilm", max_length: int = 64, device: str = "cpu") -> np.ndarray:
    """(n, d) unit-norm embeddings of ``texts`` with a sentence encoder (``"minilm"`` = bundled), through
    :func:`molal.embeddings.embed` (each text embedded once per encoder and max length, across processes when
    the embedding store is on)."""
    from molal.embeddings import embed

    emb, _ = embed(texts, encoder, max_length=int(max_length), device=device, batch_size=64)
    return emb.astype(np.float64)


class TextModel:
    """The cross-fitted text classifier of the module docstring (fitted: ``models_``, one per fold)."""

    def __init__(self, encoder: str = "minilm", weight: float = 1.0, c: float = 3.0, folds: int = 5,
                 seed_weight: float = 10.0, rounds: int = 3, ngrams: int = 4096, max_length: int = 64,
                 device: str = "cpu", seed: int = 0) -> None:
        self.encoder = encoder
        self.weight = weight
        self.c = c
        self.folds = folds
        self.seed_weight = seed_weight
        self.rounds = rounds
        self.ngrams = ngrams
        self.max_length = max_length
        self.device = device
        self.seed = seed
        self.models_: list[dict[str, Any]] | None = None

    def inputs(self, texts: Sequence[str]):
        """Unit-norm sentence embeddings of ``texts``, plus hashed word n-grams when ``ngrams`` > 0 (then a
        sparse matrix)."""
        emb = embed_texts_cached(list(texts), self.encoder or "minilm", int(self.max_length), str(self.device))
        if int(self.ngrams) <= 0 or len(texts) == 0:
            return emb
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import HashingVectorizer

        grams = HashingVectorizer(n_features=int(self.ngrams), ngram_range=(1, 2), alternate_sign=False,
                                  norm="l2").transform(list(texts))
        return sp.hstack([sp.csr_matrix(emb), grams]).tocsr()

    def fold_of(self, texts: Sequence[str]) -> np.ndarray:
        """Cross-fitting fold of each text: a hash of the text and the seed (stable across processes)."""
        salt = f"{int(self.seed)}\x1f".encode()
        return np.array([zlib.crc32(salt + t.encode("utf-8")) % int(self.folds) for t in texts], dtype=np.int64)

    def proba(self, emb, fold: np.ndarray, k: int) -> np.ndarray:
        """The text model's (n, K) distribution, each row from the model of its fold."""
        out = np.zeros((emb.shape[0], k))
        for f, m in enumerate(self.models_ or []):
            rows = fold == f
            if rows.any():
                out[rows] = lr_predict(m["coef"], m["intercept"], m["present"], emb[rows], k)
        return (1.0 - TEXT_FLOOR) * out + TEXT_FLOOR / k

    def fit(self, texts: Sequence[str], base: np.ndarray, idx: np.ndarray, labels: np.ndarray, emb=None) -> dict:
        """Fit on the pool ``texts`` given the LLM-only distribution ``base`` (n, K) and the seeds; ``emb``:
        precomputed :meth:`inputs`. Returns what the fit found (for the aggregator's metadata)."""
        emb = self.inputs(texts) if emb is None else emb
        k = base.shape[1]
        fold = self.fold_of(texts)
        current = base
        t = base
        for _ in range(int(self.rounds)):  # self-training: each round learns from the previous round's labels
            y = current.argmax(axis=1)
            w = current.max(axis=1)
            y[idx], w[idx] = labels, float(self.seed_weight)
            models = []
            for f in range(int(self.folds)):
                tr = fold != f
                coef, inter, present = lr_fit(emb[tr], y[tr], float(self.c), w[tr]) if tr.any() else (None, None, np.unique(y))
                models.append({"coef": coef, "intercept": inter, "present": present})
            self.models_ = models
            t = self.proba(emb, fold, k)
            current = normalize_rows(base * t ** float(self.weight))
        rest = np.setdiff1d(np.arange(len(texts)), idx)
        return {
            "seed_accuracy_text_model": float((t[idx].argmax(1) == labels).mean()),
            # how often the text model changes the LLM-only label on the unlabeled pool (no gold used)
            "changed_share_non_seed": float((current[rest].argmax(1) != base[rest].argmax(1)).mean()) if len(rest) else 0.0,
        }

    def correct(self, base: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """``base`` (n, K) times the text model's distribution to the power ``weight`` (not renormalised)."""
        t = self.proba(self.inputs(texts), self.fold_of(texts), base.shape[1])
        return base * t ** float(self.weight)

    def state(self) -> list[dict[str, Any]]:
        return [{"coef": m["coef"], "intercept": m["intercept"], "present": m["present"]} for m in self.models_ or []]

    def set_state(self, state: list[dict[str, Any]]) -> None:
        self.models_ = [
            {"coef": None if m["coef"] is None else np.asarray(m["coef"], dtype=np.float64),
             "intercept": None if m["intercept"] is None else np.asarray(m["intercept"], dtype=np.float64),
             "present": np.asarray(m["present"], dtype=np.int64)} for m in state]
