"""How far to trust the machine's labels, measured against people's labels. No Label Studio in it.

Two faces:

* **Measured quality** — :func:`agreement` (one labeller against people's labels: overall and per class,
  with 95% Clopper–Pearson intervals and counts, and the confusion matrix) and :func:`agreement_by_source`
  (MoLAM's pre-annotation and each LLM's vote at once)::

      report = agreement_by_source({"molam": molam_pred, "qwen": qwen_vote}, human, class_names)
      report["molam"].overall.rate, report["molam"].overall.low, report["molam"].to_dict()

* **Certified labels** — :func:`certify` / :func:`certified_threshold`: from a random *audit* of the pool (items
  drawn uniformly at random and labelled by people), the lowest confidence threshold ``t`` such that, with
  probability at least 1 − δ over the audit's draw, at most a share ε of the pool's items with confidence
  ≥ ``t`` carry a wrong machine label::

      cert = certify(conf[audit], pred[audit] == human_label, epsilon=0.05, delta=0.1, pool_confidence=conf)
      if cert.threshold is not None:
          accept = conf >= cert.threshold     # else cert.reason says why nothing could be certified

The method is Learn-then-Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021) with fixed-sequence testing
over descending thresholds and exact binomial / hypergeometric (Clopper–Pearson type) p-values; the details,
and what exactly is guaranteed under which assumption, are in :func:`certify`. Measured on recorded LLM
outputs: ``molal molam certify``, bench/certify.py, bench/RESULTS.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: share of the audit that only places the start of the sequence when no pool is given
SPLIT_SHARE = 0.2
#: at most this many thresholds are tested over a pool (its confidences at even steps of coverage)
MAX_GRID = 2000
#: with a pool: the share of δ spent bounding how many audit items lie at or above each threshold, and at how
#: many checkpoints (see :func:`certify`)
BAND_SHARE = 0.1
BAND_POINTS = 32


class TrustError(ValueError):
    """Bad input to a trust measurement (lengths differ, a label out of range, ε not in (0, 1)...)."""


# -- measured agreement ------------------------------------------------------------------------------------
def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided ``confidence`` interval (Clopper–Pearson) for a binomial rate with ``k`` successes in
    ``n`` trials; (0, 1) when n = 0."""
    from scipy.special import betaincinv

    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise TrustError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise TrustError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    a = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, a))
    high = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - a))
    return low, high


@dataclass(frozen=True)
class Rate:
    """``k`` agreements out of ``n``: the rate (None when n = 0) and its Clopper–Pearson interval."""

    k: int
    n: int
    rate: float | None
    low: float
    high: float

    @classmethod
    def of(cls, k: int, n: int, confidence: float = 0.95) -> Rate:
        low, high = clopper_pearson(k, n, confidence)
        return cls(int(k), int(n), (k / n) if n else None, low, high)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "n": self.n, "rate": self.rate, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Agreement:
    """How often one labeller agreed with people's labels.

    ``overall``: over every item with both labels; ``per_class``: by the *person's* label (of the items people
    labelled c, the share the labeller also labelled c); ``confusion``: (K, K) counts, rows = the person's
    label, columns = the labeller's; ``no_prediction``: items the labeller gave no label (-1), left out of
    the rates."""

    class_names: list[str]
    overall: Rate
    per_class: dict[str, Rate]
    confusion: np.ndarray
    no_prediction: int
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the confusion matrix as nested lists)."""
        return {
            "confidence": self.confidence,
            "overall": self.overall.to_dict(),
            "per_class": {c: r.to_dict() for c, r in self.per_class.items()},
            "confusion": {"rows": "person", "columns": "labeller", "class_names": list(self.class_names),
                          "counts": self.confusion.tolist()},
            "no_prediction": self.no_prediction,
        }


def _labels(x: Any, name: str, k: int, allow_missing: bool) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise TrustError(f"{name} must be a 1-D sequence of class indices, got shape {a.shape}")
    if len(a) and not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise TrustError(f"{name} must hold class indices (integers), got dtype {a.dtype}")
    a = a.astype(np.int64)
    low = -1 if allow_missing else 0
    bad = (a < low) | (a >= k)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        rule = f"-1 (no label) or 0..{k - 1}" if allow_missing else f"0..{k - 1}"
        raise TrustError(f"{name}[{i}] = {a[i]} is not a class index ({rule})")
    return a


def agreement(predicted: Sequence[int] | np.ndarray, human: Sequence[int] | np.ndarray,
              class_names: Sequence[str], confidence: float = 0.95) -> Agreement:
    """Agreement of ``predicted`` class indices (-1 = the labeller gave none) with people's labels ``human``
    (class indices into ``class_names``), overall and per class, with ``confidence`` Clopper–Pearson
    intervals and counts, and the confusion matrix. Empty inputs give n = 0 rates (interval (0, 1))."""
    names = [str(c) for c in class_names]
    if not names or len(set(names)) != len(names):
        raise TrustError(f"class_names must be a non-empty list of distinct names, got {list(class_names)}")
    k = len(names)
    pred = _labels(predicted, "predicted", k, allow_missing=True)
    hum = _labels(human, "human", k, allow_missing=False)
    if len(pred) != len(hum):
        raise TrustError(f"{len(pred)} predicted labels but {len(hum)} human labels")
    given = pred >= 0
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (hum[given], pred[given]), 1)
    per = {c: Rate.of(int(cm[i, i]), int(cm[i].sum()), confidence) for i, c in enumerate(names)}
    return Agreement(names, Rate.of(int(np.trace(cm)), int(cm.sum()), confidence), per, cm,
                     int((~given).sum()), float(confidence))


def agreement_by_source(predictions: Mapping[str, Sequence[int] | np.ndarray], human: Sequence[int] | np.ndarray,
                        class_names: Sequence[str], confidence: float = 0.95) -> dict[str, Agreement]:
    """:func:`agreement` of each labeller in ``predictions`` (name → class indices, e.g. ``"molam"`` and one
    entry per LLM) with the same people's labels, in the order given."""
    return {str(name): agreement(p, human, class_names, confidence) for name, p in predictions.items()}


# -- certified threshold ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Certificate:
    """The outcome of :func:`certify`.

    ``threshold``: accept the machine's label where its confidence ≥ threshold (None: nothing certified, and
    ``reason`` says why). ``method``: ``"ltt-hypergeometric"`` (with the pool's confidences) or
    ``"ltt-binomial-split"`` (audit only). Audit counts: every audit item (``n_audit``, ``n_audit_wrong``) and
    those at or above the threshold (``n_audit_above``, ``n_audit_wrong_above``); ``p_value`` of the last
    test passed; ``pool_size`` / ``pool_certified``: the pool's items and how many the threshold accepts
    (None without a pool)."""

    threshold: float | None
    epsilon: float
    delta: float
    method: str
    n_audit: int
    n_audit_wrong: int
    n_audit_above: int = 0
    n_audit_wrong_above: int = 0
    p_value: float | None = None
    pool_size: int | None = None
    pool_certified: int | None = None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def certified(self) -> bool:
        return self.threshold is not None

    @property
    def coverage(self) -> float | None:
        """Share of the pool the threshold accepts (None without a pool)."""
        if self.pool_size is None or self.pool_certified is None:
            return None
        return self.pool_certified / self.pool_size if self.pool_size else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "epsilon": self.epsilon, "delta": self.delta, "method": self.method,
                "n_audit": self.n_audit, "n_audit_wrong": self.n_audit_wrong, "n_audit_above": self.n_audit_above,
                "n_audit_wrong_above": self.n_audit_wrong_above, "p_value": self.p_value,
                "pool_size": self.pool_size, "pool_certified": self.pool_certified, "coverage": self.coverage,
                "reason": self.reason, **({"details": self.details} if self.details else {})}


def _confidences(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise TrustError(f"{name} must be a 1-D sequence of confidences, got shape {a.shape}")
    if len(a) == 0:
        return np.zeros(0)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) or a.dtype == bool:
        raise TrustError(f"{name} must hold numbers in [0, 1], got dtype {a.dtype}")
    a = a.astype(np.float64)
    bad = ~np.isfinite(a) | (a < -1e-9) | (a > 1 + 1e-9)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TrustError(f"{name}[{i}] = {a[i]!r} is not a confidence in [0, 1]")
    return np.clip(a, 0.0, 1.0)


def _correct(x: Any, n: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or len(a) != n:
        raise TrustError(f"audit_correct must be a 1-D sequence as long as audit_confidence ({n}), got shape {a.shape}")
    if len(a) == 0:
        return np.zeros(0, dtype=bool)
    if a.dtype == bool:
        return a
    if np.issubdtype(a.dtype, np.number) and np.isin(a, (0, 1)).all():
        return a.astype(bool)
    raise TrustError("audit_correct must hold booleans (or 0/1): did the machine's label match the person's?")


def level(x: Any, name: str) -> float:
    """``x`` as a probability level strictly between 0 and 1 (ε, δ); TrustError (a ValueError) names ``name``."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TrustError(f"{name} must be a number in (0, 1), got {x!r}") from None
    if not 0 < v < 1:
        raise TrustError(f"{name} must be in (0, 1), got {v}")
    return v


def min_audit_items(epsilon: float, delta: float) -> int:
    """The fewest audit items at or above a threshold that can certify it at all (all of them right):
    the smallest k with (1 − ε)^k ≤ δ."""
    eps, dlt = level(epsilon, "epsilon"), level(delta, "delta")
    return max(1, math.ceil(math.log(dlt) / math.log1p(-eps) - 1e-12))


def _binom_cdf(x: np.ndarray, n: np.ndarray, p: float) -> np.ndarray:
    """P(Binomial(n, p) ≤ x), elementwise; 1 where n = 0."""
    from scipy.special import bdtr

    x, n = np.asarray(x, dtype=np.int64), np.asarray(n, dtype=np.int64)
    out = np.ones(x.shape)
    ok = (n > 0) & (x < n)
    out[ok] = bdtr(x[ok], n[ok], p)
    return out


def _hyper_cdf(x: np.ndarray, big_n: np.ndarray, bad: np.ndarray, n: np.ndarray) -> np.ndarray:
    """P(X ≤ x) for X ~ Hypergeometric(population ``big_n`` with ``bad`` marked items, ``n`` drawn without
    replacement), elementwise, exact up to floating point (pmf at the lower end of the support from log
    binomial coefficients, then the pmf ratio recursion)."""
    from scipy.special import gammaln

    x, big_n, bad, n = (np.asarray(a, dtype=np.int64) for a in (x, big_n, bad, n))
    lo = np.maximum(0, n - (big_n - bad))
    hi = np.minimum(n, bad)
    out = np.where(x >= hi, 1.0, 0.0)
    rows = np.flatnonzero((x >= lo) & (x < hi))
    if len(rows) == 0:
        return out
    xr, nn, kk, mm, lr = (a[rows].astype(np.float64) for a in (x, big_n, bad, n, lo))

    def lchoose(a, b):
        return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)

    pmf = np.exp(lchoose(kk, lr) + lchoose(nn - kk, mm - lr) - lchoose(nn, mm))
    total = pmf.copy()
    i = lr.copy()
    steps = int((xr - lr).max())
    for _ in range(steps):
        live = i < xr
        ratio = (kk - i) * (mm - i) / ((i + 1) * (nn - kk - mm + i + 1))
        pmf = np.where(live, pmf * ratio, pmf)
        total = np.where(live, total + pmf, total)
        i = np.where(live, i + 1, i)
    out[rows] = np.minimum(total, 1.0)
    return out


def _hyper_upper(size: int, counts: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Per entry of ``counts``: the smallest m with P(X > m) ≤ ``alpha`` for X ~ Hypergeometric(``size``
    items, ``counts`` marked, ``n`` drawn) — how many of the ``n`` drawn items fall among the marked ones."""
    from scipy.special import gammaln

    def lchoose(a, b):
        return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)

    k = np.asarray(counts, dtype=np.float64)[:, None]
    i = np.arange(n + 1, dtype=np.float64)[None, :]
    ok = (i <= k) & (n - i <= size - k)
    with np.errstate(invalid="ignore"):
        logp = lchoose(k, np.where(ok, i, 0)) + lchoose(size - k, np.where(ok, n - i, 0)) - lchoose(size, n)
    cdf = np.cumsum(np.where(ok, np.exp(logp), 0.0), axis=1)
    return (cdf < 1.0 - alpha - 1e-12).sum(axis=1).astype(np.int64)


def _binom_cdf_table(m: np.ndarray, p: np.ndarray, top: int) -> np.ndarray:
    """(len(m), top + 1): P(Binomial(m_i, p_i) ≤ k) for k = 0..top (pmf ratio recursion; p clipped inside
    (0, 1) so the recursion stays finite)."""
    m = np.asarray(m, dtype=np.float64)[:, None]
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)[:, None]
    k = np.arange(top, dtype=np.float64)[None, :]
    ratio = np.clip(m - k, 0.0, None) / (k + 1) * (p / (1 - p))
    pmf = np.exp(m * np.log1p(-p)) * np.concatenate([np.ones((len(m), 1)), np.cumprod(ratio, axis=1)], axis=1)
    return np.minimum(np.cumsum(pmf, axis=1), 1.0)


def _planned_start(proxy_desc: np.ndarray, cand: np.ndarray, n_test: int, eps: float | np.ndarray,
                   dlt: float, proxy_sample: int | None = None) -> int:
    """Where the fixed sequence starts: the candidate (positions ``cand`` into ``proxy_desc``, confidences
    sorted descending, standing for the pool) with the largest coverage × chance of passing its test *if the
    confidences were calibrated* (a random audit of ``n_test`` items, of which a pessimistic 10% quantile
    fall at or above it — wider when the proxy is itself a sample of ``proxy_sample`` items; the items wrong
    with probability 1 − confidence). Reads no audit label, so any miscalibration costs coverage, never the
    guarantee. Ties go to the higher threshold."""
    size = len(proxy_desc)
    covered = cand + 1  # items at or above the candidate (cand = the last position of its value)
    q = covered / size
    spread = n_test * q * (1.0 - q) * (1.0 + (n_test / proxy_sample if proxy_sample else 0.0))
    m = np.maximum(np.floor(n_test * q - 1.2816 * np.sqrt(spread) + 1e-9), 0.0)
    pred = (np.cumsum(1.0 - proxy_desc)[cand] / covered).clip(0.0, 1.0)
    eps = np.broadcast_to(np.asarray(eps, dtype=np.float64), m.shape)
    top = int(np.ceil((eps * m).max())) + 2
    # the most wrong items a test of m items can pass with (the p-value grows with them): -1 = none
    x_crit = np.where(m > 0, (_binom_cdf_table(m, eps, top) <= dlt).sum(axis=1) - 1, -1)
    chance = np.take_along_axis(_binom_cdf_table(m, pred, top), np.maximum(x_crit, 0)[:, None], axis=1)[:, 0]
    chance = np.where(x_crit >= 0, chance, 0.0)
    score = chance * q
    return int(np.argmax(score)) if score.max() > 0 else len(cand) - 1


def _candidates(n: int, most: int = 100) -> np.ndarray:
    """At most ``most`` positions among ``n`` grid points, evenly spread, the last included."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, most).round().astype(np.int64))


def _first_failure(pvalues_at, start: int, stop: int, delta: float, chunk: int = 256) -> int:
    """Index of the first threshold from ``start`` whose p-value exceeds ``delta`` (``stop`` if none),
    computing p-values in chunks (``pvalues_at(lo, hi)`` -> array)."""
    lo = start
    while lo < stop:
        hi = min(stop, lo + chunk)
        p = pvalues_at(lo, hi)
        bad = np.flatnonzero(p > delta)
        if len(bad):
            return lo + int(bad[0])
        lo = hi
        chunk *= 2
    return stop


def certify(audit_confidence: Sequence[float] | np.ndarray, audit_correct: Sequence[bool] | np.ndarray,
            epsilon: float = 0.05, delta: float = 0.1, *, pool_confidence: Sequence[float] | np.ndarray | None = None,
            seed: int = 0) -> Certificate:
    """A confidence threshold whose accepted labels are wrong at most a share ``epsilon`` of the time, with
    probability at least 1 − ``delta`` over the random audit — or no threshold, and why.

    **Method: Learn-then-Test** (Angelopoulos et al. 2021) with **fixed-sequence testing** over descending
    confidence thresholds t₁ > t₂ > …: for each t the null hypothesis "more than a share ε of the items with
    confidence ≥ t are wrong" is tested with an exact p-value; the sequence stops at the first test that fails,
    and the certified threshold is the last one passed. One test per threshold at the full level is enough (no
    multiplicity correction) because the sequence is fixed before any audit label is read: a bad threshold can
    only be certified by rejecting the *first* true null of the sequence, and that one test errs with
    probability at most its level.

    **Assumption:** the audit items were drawn uniformly at random (without replacement) from the pool the
    threshold is applied to, and the served model's confidence and label on them are what it serves (it was
    not fitted on the audit's labels). Nothing is assumed about the confidence being calibrated.

    *With* ``pool_confidence`` (the served model's confidence on every item of that pool, audit items
    included) — ``method = "ltt-hypergeometric"``, exact for this very pool, whose items and labels are fixed
    (the only randomness is which of them the audit drew). With N_t pool items at or above t, W_t of them
    wrong, and n_t, x_t the audit's items and wrong ones among them, the guarantee is on the items *outside
    the audit* (those the machine would label alone):

        P( W_t̂ − x_t̂  >  ε · (N_t̂ − n_t̂) ) ≤ δ,

    which also bounds the error of the final labels at or above t̂ (the audit's carry people's labels).

    - Given n_t, the audit items at or above t are a uniform random subset of those N_t, so x_t follows
      Hypergeometric(N_t, W_t, n_t) whatever n_t is; its lower tail at the smallest W_t a null allows is an
      exact p-value, valid conditionally on n_t and so unconditionally.
    - The null must not depend on the audit. Since x_t ≥ 0 and n_t ≤ n̄_t, the failure above implies
      W_t > ε (N_t − n̄_t), where n̄_t bounds n_t at every threshold at once except with probability
      ``BAND_SHARE`` · δ (hypergeometric upper quantiles at ``BAND_POINTS`` checkpoints, union bound; n_t
      only grows between them). The tests run at level (1 − ``BAND_SHARE``) δ, so the two errors add up to δ.
    - Thresholds are the pool's own confidences (at most ``MAX_GRID``, at even steps of coverage).

    *Without* a pool — ``method = "ltt-binomial-split"``: the items are taken as independent draws from one
    distribution, and the guarantee is on the conditional error rate P(wrong | confidence ≥ t̂) of a new item
    from it. The audit items at or above a fixed t are then, given their number n_t, independent draws from
    that conditional distribution, so P(Binomial(n_t, ε) ≤ x_t) is an exact conditional (Clopper–Pearson)
    p-value. The start must be fixed independently of the items tested (the audit's own confidences would
    bias it), so a random share ``SPLIT_SHARE`` of the audit (drawn with ``seed``) only places the start,
    standing for the pool; the rest is tested.

    **The start.** Nothing above the start is tested, and the sequence cannot begin at the top (too few
    items lie there to pass anything: see :func:`min_audit_items`). It begins at the threshold with the most
    coverage × chance to pass *were the confidences calibrated*, computed from the pool's (or the placing
    items') confidences alone, never from an audit label: miscalibration costs coverage, never the guarantee.

    Args:
        audit_confidence: the served model's confidence (top-class probability, in [0, 1]) on the audit items.
        audit_correct: whether its label matched the person's, per audit item.
        epsilon: the largest acceptable share of wrong labels among accepted items, in (0, 1).
        delta: the largest acceptable probability that the certificate is wrong, in (0, 1).
        pool_confidence: the model's confidence on every pool item (audit included); see above.
        seed: the audit split without a pool.

    Returns a :class:`Certificate`; ``threshold`` None with ``reason`` when nothing can be certified (an
    empty or too small audit, too many wrong labels near the top). Raises :class:`TrustError` on bad input.
    """
    conf = _confidences(audit_confidence, "audit_confidence")
    ok = _correct(audit_correct, len(conf))
    eps, dlt = level(epsilon, "epsilon"), level(delta, "delta")
    pool = None if pool_confidence is None else _confidences(pool_confidence, "pool_confidence")
    n = len(conf)
    wrong = ~ok
    base = {"epsilon": eps, "delta": dlt, "n_audit": n, "n_audit_wrong": int(wrong.sum())}
    if pool is not None:
        if len(pool) < n:
            raise TrustError(f"pool_confidence has {len(pool)} items but the audit {n}: the audit must be drawn "
                             "from the pool (its items included in pool_confidence)")
        base.update(method="ltt-hypergeometric", pool_size=int(len(pool)))
    else:
        base.update(method="ltt-binomial-split")
    if n == 0:
        return Certificate(None, **base, pool_certified=0 if pool is not None else None,
                           reason="empty audit: no item of the pool has been checked by a person")
    k_min = min_audit_items(eps, dlt)
    if pool is not None:
        return _certify_pool(conf, wrong, pool, eps, dlt, k_min, base)
    return _certify_split(conf, wrong, eps, dlt, k_min, seed, base)


def _certify_pool(conf, wrong, pool, eps, dlt, k_min, base) -> Certificate:
    n, size = len(conf), len(pool)
    asc = np.sort(pool)
    desc = asc[::-1]
    if size > MAX_GRID:  # the pool's confidences at even steps of coverage
        ranks = np.ceil(np.arange(1, MAX_GRID + 1) * size / MAX_GRID).astype(np.int64) - 1
        grid = np.unique(desc[ranks])[::-1]
    else:
        grid = np.unique(pool)[::-1]
    big_n = size - np.searchsorted(asc, grid, side="left")
    a_asc = np.sort(conf)
    n_t = n - np.searchsorted(a_asc, grid, side="left")
    w_sorted = np.cumsum(wrong[np.argsort(-conf, kind="stable")])  # wrong among the top-k audit items
    x_t = np.where(n_t > 0, w_sorted[np.maximum(n_t - 1, 0)], 0)
    at = np.unique(conf)  # every audit item must be a pool item: never more audit than pool items above a value
    over = np.flatnonzero(n - np.searchsorted(a_asc, at, side="left") > size - np.searchsorted(asc, at, side="left"))
    if len(over):
        v = at[over[0]]
        raise TrustError(f"{int((conf >= v).sum())} audit items have confidence >= {v:.6g} but only "
                         f"{int((pool >= v).sum())} pool items do: the audit must be drawn from the pool "
                         "(its items included in pool_confidence, with the same confidences)")
    d_band = BAND_SHARE * dlt
    d_test = dlt - d_band
    pos = _candidates(len(grid))
    # the plan: as many audit items at or above each candidate as the band below will allow for
    expect = n * big_n[pos] / size
    eps_plan = eps * np.clip(1.0 - (expect + 3.0 * np.sqrt(expect + 1.0)) / big_n[pos], 0.0, 1.0)
    start = int(pos[_planned_start(desc, big_n[pos] - 1, n, eps_plan, d_test)])
    # the band: at checkpoints from the start down, the most audit items that lie at or above them, exceeded
    # with probability <= d_band in all (hypergeometric upper quantiles, union bound); between checkpoints
    # the count only grows, so the next checkpoint's bound holds
    checks = np.unique(np.linspace(start, len(grid) - 1, BAND_POINTS).round().astype(np.int64))
    top = _hyper_upper(size, big_n[checks], n, d_band / len(checks))
    n_bar = np.zeros(len(grid), dtype=np.int64)
    n_bar[start:] = top[np.searchsorted(checks, np.arange(start, len(grid)))]
    n_bar = np.minimum(n_bar, np.minimum(n, big_n))
    # the null at each threshold: more than ε of the pool items outside the audit wrong, were the audit to
    # hold n_bar of them — i.e. at least this many wrong items at or above the threshold in the pool
    bad0 = np.floor(eps * (big_n - n_bar)).astype(np.int64) + 1

    def pvals(lo, hi):
        return _hyper_cdf(x_t[lo:hi], big_n[lo:hi], bad0[lo:hi], n_t[lo:hi])

    fail = _first_failure(pvals, start, len(grid), d_test)
    base["details"] = {"start_threshold": float(grid[start]), "thresholds": int(len(grid)),
                       "tests": int(min(fail + 1, len(grid)) - start), "min_audit_items": k_min,
                       "test_level": d_test, "band_level": d_band}
    if fail == start:
        p = float(pvals(start, start + 1)[0])
        return Certificate(None, **base, pool_certified=0, p_value=p, reason=_why_not(
            int(n_t[start]), int(x_t[start]), float(grid[start]), p, eps, dlt, k_min, int(big_n[start]), size))
    j = fail - 1
    return Certificate(float(grid[j]), **base, n_audit_above=int(n_t[j]), n_audit_wrong_above=int(x_t[j]),
                       p_value=float(pvals(j, j + 1)[0]), pool_certified=int(big_n[j]),
                       reason=_why(int(n_t[j]), int(x_t[j]), eps, dlt, fail == len(grid)))


def _certify_split(conf, wrong, eps, dlt, k_min, seed, base) -> Certificate:
    n = len(conf)
    n_place = min(n - 1, max(1, math.ceil(SPLIT_SHARE * n))) if n > 1 else 0
    perm = np.random.default_rng(int(seed)).permutation(n)
    place, test = perm[:n_place], perm[n_place:]
    tc, tw = conf[test], wrong[test]
    m = len(tc)
    # the start, planned on the placing items' confidences (they stand for the pool; see _planned_start)
    t0 = -math.inf
    if n_place:
        pc = np.sort(conf[place])[::-1]
        last = np.flatnonzero(np.r_[pc[1:] != pc[:-1], True])  # the last position of each distinct value
        j = _planned_start(pc, last, m, eps, dlt, proxy_sample=n_place)
        if j < len(last) - 1:
            t0 = float(pc[last[j]])
    # then the tested items' own confidences below the start, descending
    grid = np.concatenate([[t0], np.unique(tc[tc < t0])[::-1]]) if np.isfinite(t0) else np.array([-math.inf])
    t_asc = np.sort(tc)
    n_t = m - np.searchsorted(t_asc, grid, side="left")
    w_sorted = np.cumsum(tw[np.argsort(-tc, kind="stable")])
    x_t = np.where(n_t > 0, w_sorted[np.maximum(n_t - 1, 0)], 0)

    def pvals(lo, hi):
        return _binom_cdf(x_t[lo:hi], n_t[lo:hi], eps)

    fail = _first_failure(pvals, 0, len(grid), dlt)
    base["details"] = {"start_threshold": t0 if np.isfinite(t0) else None, "placing_items": int(n_place),
                       "tested_items": int(m), "min_audit_items": k_min}
    if fail == 0:
        p = float(pvals(0, 1)[0])
        return Certificate(None, **base, p_value=p, reason=_why_not(
            int(n_t[0]), int(x_t[0]), float(grid[0]), p, eps, dlt, k_min, None, None, tested=m))
    j = fail - 1
    # every t in (grid[fail], grid[j]] tests the same items: the lowest such t is certified
    if fail < len(grid):
        thr = float(np.nextafter(grid[fail], np.inf))
    else:
        thr = 0.0  # every item: the whole audit passed
    above = conf >= thr
    return Certificate(thr, **base, n_audit_above=int(above.sum()), n_audit_wrong_above=int((above & wrong).sum()),
                       p_value=float(pvals(j, j + 1)[0]), reason=_why(int(n_t[j]), int(x_t[j]), eps, dlt,
                                                                      fail == len(grid)))


def _why(n_above: int, x_above: int, eps: float, dlt: float, everything: bool) -> str:
    scope = "every item" if everything else "the items at or above the threshold"
    return (f"certified: {x_above} of the {n_above} tested audit items in {scope} were wrong; "
            f"error <= {eps:g} with probability >= {1 - dlt:g}")


def _why_not(n_t: int, x_t: int, t: float, p: float, eps: float, dlt: float, k_min: int,
             big_n: int | None, size: int | None, tested: int | None = None) -> str:
    where = "every item" if not np.isfinite(t) else f"confidence >= {t:.4g}"
    if n_t < k_min:
        have = f"the audit has {tested} tested items" if tested is not None else f"{n_t} audit items reach it"
        return (f"audit too small: certifying error <= {eps:g} with probability {1 - dlt:g} needs at least {k_min} "
                f"audited items among those accepted (all right); {have} ({where})")
    return (f"too many wrong labels: {x_t} of the {n_t} audit items with {where} were wrong "
            f"(p = {p:.3g} > delta = {dlt:g}); a larger audit, a larger epsilon or a better model may certify")


def certify_probs(probs: np.ndarray, audit: Sequence[int] | np.ndarray, audit_labels: Sequence[int] | np.ndarray,
                  frame: Sequence[int] | np.ndarray, epsilon: float = 0.05, delta: float = 0.1) -> Certificate:
    """:func:`certify` for a model's class probabilities ``probs`` (n, K): its confidence is the top
    probability and its label the top class; ``audit`` are the rows people labelled at random (``audit_labels``,
    class indices, aligned), ``frame`` the rows the threshold will be applied to (the audit's included). The one
    place both the served loop (:func:`molal.service.quality.certificate`) and ``molal simulate`` build a
    certificate from probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    audit = np.asarray(audit, dtype=np.int64).reshape(-1)
    frame = np.asarray(frame, dtype=np.int64).reshape(-1)
    labels = np.asarray(audit_labels, dtype=np.int64).reshape(-1)
    if probs.size == 0:
        probs = probs.reshape(0, 1)
    if probs.ndim != 2:
        raise TrustError(f"probs must be a 2-d array (items, classes), got shape {probs.shape}")
    if len(labels) != len(audit):
        raise TrustError(f"{len(labels)} audit labels for {len(audit)} audit items")
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    return certify(conf[audit], pred[audit] == labels, epsilon, delta, pool_confidence=conf[frame])


def certified_threshold(audit_confidence: Sequence[float] | np.ndarray, audit_correct: Sequence[bool] | np.ndarray,
                        epsilon: float = 0.05, delta: float = 0.1, *,
                        pool_confidence: Sequence[float] | np.ndarray | None = None) -> float | None:
    """The smallest confidence threshold t such that, with probability ≥ 1 − ``delta`` over the random audit,
    the error rate among the pool's items with confidence ≥ t is at most ``epsilon``; None when no threshold
    can be certified with this audit. :func:`certify`'s threshold: its docstring states the method
    (Learn-then-Test, fixed-sequence testing, exact binomial / hypergeometric p-values) and the assumption (the
    audit drawn uniformly at random from that pool). Pass ``pool_confidence`` (every pool item's confidence,
    the audit's included) for the exact guarantee on that pool."""
    return certify(audit_confidence, audit_correct, epsilon, delta, pool_confidence=pool_confidence).threshold


__all__ = ["MAX_GRID", "Agreement", "Certificate", "Rate", "TrustError", "agreement", "agreement_by_source", "level",
           "certified_threshold", "certify", "certify_probs", "clopper_pearson", "min_audit_items"]
