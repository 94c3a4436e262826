"""Active-learning query strategies: one registry, one interface (pool → ordered indices of a batch).

``get_strategy(name, **kw).select(pool, budget, rng)`` returns ``min(budget, n)`` unique indices into the
pool, most useful first. Strategies are pure numpy over a :class:`QueryPool` of model outputs; the ones that
need extra forward passes read the arrays :func:`build_pool` computes with the :class:`molal.student.Student`
(or call its methods through ``pool.model``/``pool.texts`` when the arrays are missing):

==================  =====================================================================================
random              uniform sample
entropy             max predictive entropy
margin              smallest gap between the two top probabilities
least_confidence    smallest top probability
coreset             k-center greedy on encoder embeddings, starting from the labelled items (Sener & Savarese)
noise_stability     5 weight perturbations of relative scale 1e-3; k-center greedy on the output changes,
                    starting from the least stable item (Li et al., "Deep AL by noise stability")
bemps               CoreMSE over MC-dropout samples; top 50% by score, k-means on the L2-normalised score
                    vectors, the item nearest each centroid (Tan et al., "Diversity enhanced AL with BEMPS")
badge               k-means++ seeding on gradient embeddings emb ⊗ (p − onehot(ŷ)) (Ash et al.)
==================  =====================================================================================

Memory stays linear in the pool size: distances are computed in chunks (never an n×n matrix), and BADGE
never materialises the d·K gradient embeddings (‖a⊗u − b⊗v‖² = ‖a‖²‖u‖² + ‖b‖²‖v‖² − 2(a·b)(u·v)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

#: rows per chunk of a distance computation (chunk × m floats at a time)
CHUNK = 4096


class QueryError(ValueError):
    """Bad query input (unknown strategy, missing pool arrays, bad budget)."""


@dataclass
class QueryPool:
    """The unlabelled candidates as the current model sees them.

    probs: (n, K) class probabilities of the current model (required).
    embeddings: (n, d) pooled encoder embeddings (coreset, badge).
    labeled_embeddings: (m, d) embeddings of the already-labelled items (coreset starts from them).
    mc_probs: (T, n, K) MC-dropout probabilities (bemps).
    perturbed_probs: (P, n, K) probabilities of weight-perturbed copies of the model (noise_stability).
    model, texts: optional hook: an object with ``mc_dropout_probs(texts, n)`` / ``perturbed_probs(texts,
        n, scale)`` (e.g. a fitted Student) used to fill the arrays above when missing.
    """

    probs: np.ndarray
    embeddings: np.ndarray | None = None
    labeled_embeddings: np.ndarray | None = None
    mc_probs: np.ndarray | None = None
    perturbed_probs: np.ndarray | None = None
    model: Any = None
    texts: list[str] | None = None

    def __post_init__(self) -> None:
        p = np.asarray(self.probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] < 2:
            raise QueryError(f"probs must be (n, K) with K >= 2, got shape {p.shape}")
        if not np.isfinite(p).all():
            raise QueryError("probs must be finite")
        self.probs = p
        n = p.shape[0]
        if self.embeddings is not None:
            self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
            if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n:
                raise QueryError(f"embeddings must be ({n}, d), got {self.embeddings.shape}")
        if self.labeled_embeddings is not None:
            self.labeled_embeddings = np.asarray(self.labeled_embeddings, dtype=np.float32)
            if self.embeddings is not None and (
                self.labeled_embeddings.ndim != 2 or self.labeled_embeddings.shape[1] != self.embeddings.shape[1]
            ):
                raise QueryError("labeled_embeddings must be (m, d) with the same d as embeddings")
        for name in ("mc_probs", "perturbed_probs"):
            arr = getattr(self, name)
            if arr is not None:
                arr = np.asarray(arr, dtype=np.float64)
                if arr.ndim != 3 or arr.shape[1:] != p.shape:
                    raise QueryError(f"{name} must be (S, {n}, {p.shape[1]}), got {arr.shape}")
                setattr(self, name, arr)
        if self.texts is not None and len(self.texts) != n:
            raise QueryError(f"{len(self.texts)} texts for {n} pool rows")

    @property
    def n(self) -> int:
        return self.probs.shape[0]

    def require(self, name: str, strategy: str) -> np.ndarray:
        arr = getattr(self, name)
        if arr is None:
            raise QueryError(f"strategy {strategy!r} needs pool.{name} (not given and no model/texts hook to compute it)")
        return arr


class Strategy:
    """Base class: ``select(pool, budget, rng)`` → ordered unique indices, ``len == min(budget, n)``."""

    name: ClassVar[str] = ""

    def select(self, pool: QueryPool, budget: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        if not isinstance(pool, QueryPool):
            raise QueryError(f"pool must be a QueryPool, got {type(pool).__name__}")
        if int(budget) != budget or budget < 0:
            raise QueryError(f"budget must be a non-negative integer, got {budget}")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        b = min(int(budget), pool.n)
        if b == 0:
            return np.zeros(0, dtype=np.int64)
        idx = np.asarray(self._select(pool, b, rng), dtype=np.int64)
        if len(idx) != b or len(np.unique(idx)) != b or idx.min() < 0 or idx.max() >= pool.n:  # pragma: no cover
            raise AssertionError(f"strategy {self.name} returned an invalid batch")
        return idx

    def _select(self, pool: QueryPool, b: int, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _top(scores: np.ndarray, b: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the b highest scores, highest first (ties broken at random)."""
    tie = rng.random(len(scores))
    return np.lexsort((tie, -scores))[:b]


class RandomStrategy(Strategy):
    name = "random"

    def _select(self, pool, b, rng):
        return rng.choice(pool.n, size=b, replace=False)


class EntropyStrategy(Strategy):
    name = "entropy"

    def _select(self, pool, b, rng):
        p = np.clip(pool.probs, 1e-12, 1.0)
        return _top(-(p * np.log(p)).sum(1), b, rng)


class MarginStrategy(Strategy):
    name = "margin"

    def _select(self, pool, b, rng):
        part = np.sort(pool.probs, axis=1)
        return _top(-(part[:, -1] - part[:, -2]), b, rng)


class LeastConfidenceStrategy(Strategy):
    name = "least_confidence"

    def _select(self, pool, b, rng):
        return _top(-pool.probs.max(1), b, rng)


# -- distances --------------------------------------------------------------------------------------------


def min_sq_dist(x: np.ndarray, centers: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """(n,) squared Euclidean distance from each row of x to its nearest center, in chunks."""
    x = np.asarray(x, dtype=np.float32)
    centers = np.asarray(centers, dtype=np.float32)
    out = np.full(len(x), np.inf, dtype=np.float32)
    if len(centers) == 0:
        return out
    xx = np.einsum("ij,ij->i", x, x)
    cc = np.einsum("ij,ij->i", centers, centers)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        for t in range(0, len(centers), chunk):
            cs = centers[t : t + chunk]
            d = xx[s : s + chunk, None] + cc[None, t : t + chunk] - 2.0 * (xs @ cs.T)
            out[s : s + chunk] = np.minimum(out[s : s + chunk], d.min(1))
    return np.maximum(out, 0.0)


def k_center_greedy(
    x: np.ndarray,
    b: int,
    centers: np.ndarray | None = None,
    first: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Greedy k-center: repeatedly pick the point farthest from all centers so far. Starts from ``centers``
    (e.g. the labelled set); without them from ``first`` (or a random point). O(b·n·d) time, O(n) memory."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    rng = rng or np.random.default_rng(0)
    chosen: list[int] = []
    xx = np.einsum("ij,ij->i", x, x)

    def sq_to(j: int) -> np.ndarray:  # ‖x_i − x_j‖² without an n×d temporary
        return np.maximum(xx + xx[j] - 2.0 * (x @ x[j]), 0.0)

    if centers is not None and len(centers):
        dist = min_sq_dist(x, centers)
    else:
        start = int(first) if first is not None else int(rng.integers(n))
        chosen.append(start)
        dist = sq_to(start)
    dist = dist.astype(np.float64)
    picked = np.zeros(n, dtype=bool)
    picked[chosen] = True
    dist[picked] = -1.0
    while len(chosen) < b:
        j = int(np.argmax(dist))
        if dist[j] <= 0:  # all remaining points coincide with a center: fill at random
            rest = np.flatnonzero(~picked)
            chosen.extend(rng.permutation(rest)[: b - len(chosen)].tolist())
            break
        chosen.append(j)
        picked[j] = True
        dist = np.minimum(dist, sq_to(j))
        dist[picked] = -1.0
    return np.asarray(chosen, dtype=np.int64)


class CoreSetStrategy(Strategy):
    name = "coreset"

    def _select(self, pool, b, rng):
        emb = pool.require("embeddings", self.name)
        return k_center_greedy(emb, b, centers=pool.labeled_embeddings, rng=rng)


class NoiseStabilityStrategy(Strategy):
    """Output change under ``n_perturb`` relative weight perturbations of scale ``scale`` (Li et al. 2024), as
    the paper's code runs it: only weight matrices are perturbed (no biases; ``weights_only``), and each item's
    change is divided by the norm of its unperturbed output (``normalize``); k-center greedy on the changes
    picks the batch, the largest change first. ``normalize=False, weights_only=False`` is molal's version
    before 2026-12."""

    name = "noise_stability"

    def __init__(self, n_perturb: int = 5, scale: float = 1e-3, normalize: bool = True, weights_only: bool = True) -> None:
        self.n_perturb = int(n_perturb)
        self.scale = float(scale)
        self.normalize = bool(normalize)
        self.weights_only = bool(weights_only)

    def _select(self, pool, b, rng):
        if pool.perturbed_probs is None and pool.model is not None and pool.texts is not None:
            pool.perturbed_probs = np.asarray(pool.model.perturbed_probs(pool.texts, n=self.n_perturb, scale=self.scale,
                                                                         weights_only=self.weights_only))
        pert = pool.require("perturbed_probs", self.name)
        diff = pert - pool.probs[None]  # (P, n, K)
        if self.normalize:
            diff = diff / np.maximum(np.linalg.norm(pool.probs, axis=1), 1e-12)[None, :, None]
        change = diff.transpose(1, 0, 2).reshape(pool.n, -1)  # (n, P*K)
        norms = (change**2).sum(1)
        return k_center_greedy(change, b, first=int(np.argmax(norms)), rng=rng)


class BEMPSStrategy(Strategy):
    """CoreMSE (BEMPS) with MC-dropout samples as the posterior over models.

    For candidate x, sample θ_e (e=1..E, uniform prior) and estimation points x' (a random subset of the
    pool of size ``n_estimation``): the score vector, as the paper's code computes it, is
    s(x)[x'] = Σ_y p(y|x) Σ_e Σ_ŷ (p(ŷ|θ_e,x') − p(ŷ|x', L+(x,y)))² where p(ŷ|x', L+(x,y)) =
    Σ_e p(θ_e|x,y) p(ŷ|θ_e,x'), p(θ_e|x,y) ∝ p(y|θ_e,x). Since Σ_e (q_e − new)² = Σ_e (q_e − q̄)² + E (q̄ − new)²,
    that is E × molal's earlier vector Σ_y p(y|x) Σ_ŷ (q̄ − new)² plus the per-model variance at x', a term
    the same for every x: it leaves the ranking (the top ``top_frac`` by mean score) unchanged but not the
    L2-normalised vectors the k-means clusters (``budget`` clusters; the item nearest each centroid is
    picked, clusters ordered by their best item's score). ``variance_term=False`` is molal's version before
    2026-12."""

    name = "bemps"

    def __init__(self, n_samples: int = 10, n_estimation: int = 200, top_frac: float = 0.5, chunk: int = 1024,
                 variance_term: bool = True) -> None:
        self.n_samples = int(n_samples)
        self.n_estimation = int(n_estimation)
        self.top_frac = float(top_frac)
        self.chunk = int(chunk)
        self.variance_term = bool(variance_term)

    def score_vectors(self, mc: np.ndarray, est_idx: np.ndarray) -> np.ndarray:
        e, n, k = mc.shape
        q = mc[:, est_idx, :]  # (E, m, K): p(ŷ|θ_e, x')
        m = q.shape[1]
        q_mean = q.mean(0).reshape(-1)  # (m*K,)
        qf = q.reshape(e, m * k)
        out = np.zeros((n, m), dtype=np.float32)
        var = ((q - q.mean(0, keepdims=True)) ** 2).sum((0, 2)) if self.variance_term else None  # (m,)
        for s in range(0, n, self.chunk):
            p = mc[:, s : s + self.chunk, :].transpose(1, 2, 0)  # (c, K, E): p(y|θ_e, x)
            c = p.shape[0]
            p_y = p.mean(2)  # (c, K): p(y|x, L)
            post = p / np.maximum(p.sum(2, keepdims=True), 1e-12)  # (c, K, E): p(θ_e|x, y)
            new = (post.reshape(c * k, e) @ qf).reshape(c, k, m, k)  # p(ŷ|x', L+(x,y))
            mse = ((new - q_mean.reshape(1, 1, m, k)) ** 2).sum(3)  # (c, K, m)
            reduction = (p_y[:, :, None] * mse).sum(1)  # (c, m)
            out[s : s + c] = reduction if var is None else e * reduction + var[None, :]
        return out

    def _select(self, pool, b, rng):
        if pool.mc_probs is None and pool.model is not None and pool.texts is not None:
            pool.mc_probs = np.asarray(pool.model.mc_dropout_probs(pool.texts, n=self.n_samples))
        mc = pool.require("mc_probs", self.name)
        n = pool.n
        est = rng.choice(n, size=min(self.n_estimation, n), replace=False)
        vec = self.score_vectors(mc, est)
        score = vec.mean(1)
        n_top = max(b, int(np.ceil(self.top_frac * n)))
        top = _top(score.astype(np.float64), n_top, rng)
        if b >= len(top):
            return top[:b]
        v = vec[top]
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        from sklearn.cluster import KMeans, MiniBatchKMeans

        seed = int(rng.integers(2**31 - 1))
        if len(v) > 20000:
            km = MiniBatchKMeans(n_clusters=b, random_state=seed, n_init=1, batch_size=4096).fit(v)
        else:
            km = KMeans(n_clusters=b, random_state=seed, n_init=1).fit(v)
        centers = km.cluster_centers_.astype(np.float32)
        chosen: list[int] = []
        taken = np.zeros(len(v), dtype=bool)
        for c in range(b):
            d = ((v - centers[c]) ** 2).sum(1)
            d[taken] = np.inf
            j = int(np.argmin(d))
            taken[j] = True
            chosen.append(j)
        chosen_arr = np.asarray(chosen)
        order = np.argsort(-score[top[chosen_arr]], kind="stable")
        return top[chosen_arr[order]]


class BadgeStrategy(Strategy):
    """k-means++ seeding on gradient embeddings g = emb ⊗ (p − onehot(argmax p)), first = largest ‖g‖."""

    name = "badge"

    def _select(self, pool, b, rng):
        emb = pool.require("embeddings", self.name)
        p = pool.probs
        u = p.copy()
        u[np.arange(pool.n), p.argmax(1)] -= 1.0
        ee = np.einsum("ij,ij->i", emb, emb).astype(np.float64)
        uu = (u * u).sum(1)
        gnorm = ee * uu  # ‖g‖²
        picked = np.zeros(pool.n, dtype=bool)
        first = int(np.argmax(gnorm))
        chosen = [first]
        picked[first] = True

        def sqdist(j: int) -> np.ndarray:
            return np.maximum(gnorm + gnorm[j] - 2.0 * (emb @ emb[j]).astype(np.float64) * (u @ u[j]), 0.0)

        dist = sqdist(first)
        dist[picked] = 0.0
        while len(chosen) < b:
            total = dist.sum()
            if total <= 0:
                rest = np.flatnonzero(~picked)
                chosen.extend(rng.permutation(rest)[: b - len(chosen)].tolist())
                break
            j = int(rng.choice(pool.n, p=dist / total))
            chosen.append(j)
            picked[j] = True
            dist = np.minimum(dist, sqdist(j))
            dist[picked] = 0.0
        return np.asarray(chosen, dtype=np.int64)


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s
    for s in (
        RandomStrategy,
        EntropyStrategy,
        MarginStrategy,
        LeastConfidenceStrategy,
        CoreSetStrategy,
        NoiseStabilityStrategy,
        BEMPSStrategy,
        BadgeStrategy,
    )
}

#: accepted spellings → registry names
ALIASES = {
    "max_entropy": "entropy",
    "max-entropy": "entropy",
    "least-confidence": "least_confidence",
    "lc": "least_confidence",
    "core_set": "coreset",
    "noise-stability": "noise_stability",
    "noisestability": "noise_stability",
}


def get_strategy(name: str, **kw: Any) -> Strategy:
    """A strategy instance by registry name (``STRATEGIES``), with its keyword options."""
    key = ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in STRATEGIES:
        raise QueryError(f"unknown query strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    try:
        return STRATEGIES[key](**kw)
    except TypeError as exc:
        raise QueryError(f"bad options for strategy {key!r}: {exc}") from None


def build_pool(
    strategy: Strategy | str,
    student: Any,
    texts: list[str],
    labeled_texts: list[str] | None = None,
    mc_samples: int = 10,
) -> QueryPool:
    """Compute what ``strategy`` needs from a fitted :class:`~molal.student.Student` over ``texts``."""
    st = get_strategy(strategy) if isinstance(strategy, str) else strategy
    probs, emb = student.infer(texts)
    pool = QueryPool(probs=probs, embeddings=emb, texts=list(texts), model=student)
    if st.name == "coreset" and labeled_texts:
        pool.labeled_embeddings = student.embed(labeled_texts)
    if st.name == "bemps":
        pool.mc_probs = student.mc_dropout_probs(texts, n=getattr(st, "n_samples", mc_samples))
    if st.name == "noise_stability":
        pool.perturbed_probs = student.perturbed_probs(texts, n=st.n_perturb, scale=st.scale)  # type: ignore[attr-defined]
    return pool


__all__: list[str] = [
    "QueryPool",
    "QueryError",
    "Strategy",
    "STRATEGIES",
    "get_strategy",
    "build_pool",
    "k_center_greedy",
    "min_sq_dist",
]
