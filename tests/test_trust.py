"""molal.trust: the certified threshold's guarantee by simulation, its edge cases, and the agreement measures.

The guarantee is checked over synthetic confidences with known error curves, 1,000 random audits per shape:
the share of audits whose certificate is wrong must stay within δ plus binomial sampling noise, a one-sided
bound: with D draws, more than ``binom.ppf(1 - 1e-3, D, δ)`` failures would happen with probability < 0.1%
if the true failure probability were δ. A naive rule is run through the same check to show it can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from molal.trust import (
    TrustError,
    agreement,
    agreement_by_source,
    certified_threshold,
    certify,
    certify_probs,
    clopper_pearson,
    min_audit_items,
)

DRAWS = 1000
EPS, DELTA = 0.1, 0.1
LIMIT = int(binom.ppf(1 - 1e-3, DRAWS, DELTA))  # ≈ 130 of 1,000


def _u(lo=0.0, hi=1.0):
    return lambda rng, size: rng.uniform(lo, hi, size)


#: name -> (draw confidences, P(wrong | confidence)); the error curves are known exactly
SHAPES = {
    # calibrated: wrong with probability 1 - confidence; error among items >= t is (1 - t) / 2 for t >= 0.3
    "calibrated": (_u(0.3, 1.0), lambda c: 1.0 - c),
    # a clean top 40% (1% wrong), then 35% wrong: certifiable down to about coverage 0.5 at ε = 0.1
    "clean_top": (_u(), lambda c: np.where(c > 0.6, 0.01, 0.35)),
    # miscalibrated and overconfident: confidence near 1, yet at least 15% wrong everywhere: nothing certifiable
    "overconfident": (lambda rng, size: rng.beta(8.0, 1.0, size), lambda c: 0.15 + 0.2 * (1.0 - c)),
    # every threshold just fails: 10.5% wrong everywhere (the hardest case: any certificate is wrong)
    "boundary": (_u(), lambda c: np.full(np.shape(c), EPS + 0.005)),
    # miscalibrated at the top: the most confident 3% are the worst (50% wrong), then 2%, then 40%
    "bad_top": (_u(), lambda c: np.where(c > 0.97, 0.5, np.where(c > 0.5, 0.02, 0.4))),
    # ties: six confidence values only
    "ties": (lambda rng, size: rng.choice([0.55, 0.7, 0.8, 0.9, 0.95, 1.0], size, p=[.2, .2, .2, .15, .15, .1]),
             lambda c: np.interp(c, [0.55, 0.7, 0.8, 0.9, 0.95, 1.0], [0.4, 0.25, 0.12, 0.05, 0.03, 0.01])),
}


def _population(shape: str, size: int, seed: int):
    draw, p_wrong = SHAPES[shape]
    rng = np.random.default_rng(seed)
    c = np.round(draw(rng, size), 6)
    return c, p_wrong(c), rng


def _error_above(conf_sorted_desc, wrong_cum, t):
    """Error rate among the items with confidence >= t (items sorted by descending confidence; wrong_cum =
    cumulative wrongness, expected or realised)."""
    k = int(np.searchsorted(-conf_sorted_desc, -t, side="right"))
    return wrong_cum[k - 1] / k if k else 0.0


@pytest.mark.parametrize("shape", list(SHAPES))
def test_pool_guarantee_by_simulation(shape):
    """ltt-hypergeometric: one fixed pool of 2,000 items per shape, 1,000 random audits of 150; the realised
    error among the pool's items outside the audit at or above the certified threshold exceeds ε in at most
    δ of the audits."""
    conf, p_wrong, rng = _population(shape, 2000, seed=1)
    wrong = rng.uniform(size=len(conf)) < p_wrong
    failures, covered = 0, []
    for _ in range(DRAWS):
        a = rng.choice(len(conf), 150, replace=False)
        cert = certify(conf[a], ~wrong[a], EPS, DELTA, pool_confidence=conf)
        if cert.threshold is None:
            covered.append(0.0)
            continue
        accepted = conf >= cert.threshold
        assert cert.pool_certified == int(accepted.sum())
        covered.append(cert.coverage)
        accepted[a] = False
        failures += wrong[accepted].mean() > EPS if accepted.any() else 0
    assert failures <= LIMIT, f"{shape}: {failures} of {DRAWS} certificates wrong (bound {LIMIT})"
    if shape in ("clean_top", "ties"):  # not vacuous: a good part of the certifiable part is found
        assert np.mean(covered) > 0.15, np.mean(covered)
    if shape in ("overconfident", "boundary"):
        assert np.mean(covered) < 0.05


def test_pool_guarantee_with_a_large_audit():
    """The guarantee is on the items outside the audit, whatever share of the pool the audit takes (here a
    quarter: their error can be far from the pool's)."""
    conf, p_wrong, rng = _population("clean_top", 2000, seed=6)
    wrong = rng.uniform(size=len(conf)) < p_wrong
    failures = 0
    for _ in range(300):
        a = rng.choice(len(conf), 500, replace=False)
        t = certified_threshold(conf[a], ~wrong[a], EPS, DELTA, pool_confidence=conf)
        if t is not None:
            accepted = conf >= t
            accepted[a] = False
            failures += wrong[accepted].mean() > EPS
    assert failures <= int(binom.ppf(1 - 1e-3, 300, DELTA))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_audit_only_guarantee_by_simulation(shape):
    """ltt-binomial-split: audits of 150 drawn independently from the distribution; the conditional error rate
    P(wrong | confidence >= t) at the certified threshold (from the known curve, over 400,000 items) exceeds
    ε in at most δ of the 1,000 audits."""
    conf, p_wrong, rng = _population(shape, 400_000, seed=2)
    order = np.argsort(-conf, kind="stable")
    cs, cum = conf[order], np.cumsum(p_wrong[order])
    failures, certified = 0, 0
    for _ in range(DRAWS):
        a = rng.integers(0, len(conf), 150)
        ok = rng.uniform(size=150) >= p_wrong[a]
        t = certified_threshold(conf[a], ok, EPS, DELTA)
        if t is None:
            continue
        certified += 1
        failures += _error_above(cs, cum, t) > EPS
    assert failures <= LIMIT, f"{shape}: {failures} of {DRAWS} certificates wrong (bound {LIMIT})"
    if shape == "clean_top":
        assert certified > DRAWS // 4  # not vacuous


def test_a_naive_rule_fails_the_same_check():
    """The check has teeth: accepting down to the lowest threshold whose audit error is <= ε (no test) is
    wrong in far more than δ of the audits on the boundary shape, and so is "confidence >= 1 - ε" on the
    overconfident one."""
    conf, p_wrong, rng = _population("boundary", 2000, seed=3)
    wrong = rng.uniform(size=len(conf)) < p_wrong
    order = np.argsort(-conf, kind="stable")
    cs, cum = conf[order], np.cumsum(wrong[order])
    failures = 0
    for _ in range(200):
        a = rng.choice(len(conf), 150, replace=False)
        ac, aw = conf[a], wrong[a]
        o = np.argsort(-ac)
        rate = np.cumsum(aw[o]) / np.arange(1, len(a) + 1)
        good = np.flatnonzero(rate[20:] <= EPS)  # at least 20 audit items
        if len(good):
            failures += _error_above(cs, cum, ac[o][20 + good[-1]]) > EPS
    assert failures > 0.5 * 200
    conf, p_wrong, rng = _population("overconfident", 2000, seed=4)
    wrong = rng.uniform(size=len(conf)) < p_wrong
    assert wrong[conf >= 1 - EPS].mean() > EPS


def test_min_audit_items():
    assert min_audit_items(0.1, 0.1) == 22  # 0.9^22 = 0.098
    assert min_audit_items(0.05, 0.1) == 45
    assert min_audit_items(0.02, 0.1) == 114
    assert 0.9 ** min_audit_items(0.1, 0.1) <= 0.1 < 0.9 ** (min_audit_items(0.1, 0.1) - 1)


def test_empty_audit():
    for pool in (None, [0.5, 0.9]):
        cert = certify([], [], pool_confidence=pool)
        assert cert.threshold is None and "empty audit" in cert.reason
    assert certified_threshold([], []) is None


def test_all_correct_and_all_wrong():
    rng = np.random.default_rng(0)
    pool = rng.uniform(0.5, 1.0, 1000)
    a = rng.choice(1000, 300, replace=False)
    cert = certify(pool[a], np.ones(300, bool), 0.05, 0.1, pool_confidence=pool)
    # every test passes: the whole pool is certified (its lowest confidence)
    assert cert.threshold == pool.min() and cert.pool_certified == 1000 and cert.coverage == 1.0
    assert cert.n_audit_wrong == 0 and "certified" in cert.reason
    assert certify(pool[a], np.ones(300, bool), 0.05, 0.1).threshold == 0.0  # audit only: everything
    for p in (pool, None):
        wrong = certify(pool[a], np.zeros(300, bool), 0.05, 0.1, pool_confidence=p)
        assert wrong.threshold is None and "too many wrong" in wrong.reason and wrong.n_audit_wrong == 300


def test_too_small_an_audit_says_so():
    pool = np.linspace(0.5, 1.0, 500)
    cert = certify(pool[:30], np.ones(30, bool), 0.05, 0.1, pool_confidence=pool)  # 45 needed at ε = 0.05
    assert cert.threshold is None and "audit too small" in cert.reason and "45" in cert.reason
    assert certify(pool[:30], np.ones(30, bool), 0.05, 0.1).threshold is None


def test_ties_in_confidence():
    """Equal confidences are accepted or refused together; a single confidence value is one test."""
    pool = np.full(400, 0.8)
    a = np.arange(0, 400, 4)
    cert = certify(pool[a], np.ones(100, bool), 0.1, 0.1, pool_confidence=pool)
    assert cert.threshold == 0.8 and cert.pool_certified == 400
    pool = np.repeat([0.6, 0.9, 1.0], [200, 100, 100])
    audit = np.arange(0, 400, 2)  # 100 at 0.6, 50 at 0.9, 50 at 1.0
    ok = pool[audit] > 0.7  # everything at 0.6 wrong
    cert = certify(pool[audit], ok, 0.1, 0.1, pool_confidence=pool)
    assert cert.threshold == 0.9 and cert.pool_certified == 200 and cert.n_audit_above == 100
    t = certified_threshold(pool[audit], ok, 0.1, 0.1)
    assert t is not None and 0.6 < t <= 0.9  # audit only: above 0.6, whatever the split


def test_threshold_semantics_audit_only():
    """Without a pool the certified set is {confidence >= t} with t just above the first confidence that
    failed: the audit items accepted are exactly those above it."""
    rng = np.random.default_rng(5)
    conf = rng.uniform(size=400)
    ok = conf > 0.3
    cert = certify(conf, ok, 0.1, 0.1, seed=1)
    assert cert.threshold is not None and 0.3 >= conf[conf < cert.threshold].max()
    assert cert.n_audit_above == int((conf >= cert.threshold).sum()) and cert.method == "ltt-binomial-split"
    assert certify(conf, ok, 0.1, 0.1, seed=1) == cert  # deterministic for a seed


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"audit_confidence": [0.5, 0.6], "audit_correct": [True]}, "as long as"),
    ({"audit_confidence": [0.5, 1.5], "audit_correct": [True, True]}, "not a confidence in"),
    ({"audit_confidence": [0.5, float("nan")], "audit_correct": [True, True]}, "not a confidence in"),
    ({"audit_confidence": [[0.5]], "audit_correct": [True]}, "1-D"),
    ({"audit_confidence": ["a"], "audit_correct": [True]}, "numbers"),
    ({"audit_confidence": [0.5], "audit_correct": [2]}, "booleans"),
    ({"audit_confidence": [0.5], "audit_correct": [True], "epsilon": 0.0}, "epsilon must be in"),
    ({"audit_confidence": [0.5], "audit_correct": [True], "epsilon": 1.0}, "epsilon must be in"),
    ({"audit_confidence": [0.5], "audit_correct": [True], "delta": "x"}, "delta must be"),
    ({"audit_confidence": [0.5, 0.6], "audit_correct": [1, 0], "pool_confidence": [0.5]}, "drawn from the pool"),
    ({"audit_confidence": [0.99] * 50, "audit_correct": [True] * 50, "pool_confidence": [0.5] * 100},
     "drawn from the pool"),
])
def test_inputs_are_validated(kwargs, message):
    with pytest.raises(TrustError, match=message):
        certify(**kwargs)


def test_certificate_to_dict():
    pool = np.linspace(0.5, 1.0, 1000)
    d = certify(pool[::5], pool[::5] > 0.6, 0.1, 0.1, pool_confidence=pool).to_dict()
    assert d["method"] == "ltt-hypergeometric" and d["pool_size"] == 1000 and 0 < d["coverage"] < 1
    assert d["details"]["min_audit_items"] == 22 and d["n_audit_wrong_above"] <= 0.1 * d["n_audit_above"]


# -- agreement -----------------------------------------------------------------------------------------------
def test_clopper_pearson_known_values():
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(0.30849, abs=1e-4))
    low, high = clopper_pearson(10, 10)
    assert low == pytest.approx(0.69151, abs=1e-4) and high == 1.0
    low, high = clopper_pearson(50, 100)
    assert low == pytest.approx(0.39832, abs=1e-4) and high == pytest.approx(0.60168, abs=1e-4)
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    with pytest.raises(TrustError):
        clopper_pearson(3, 2)


def test_agreement_counts_intervals_and_confusion():
    names = ["a", "b", "c"]
    human = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    pred = [0, 0, 1, 1, -1, 2, 2, 0, 2, 0]
    r = agreement(pred, human, names)
    assert (r.overall.k, r.overall.n) == (7, 9) and r.no_prediction == 1
    assert r.overall.low < 7 / 9 < r.overall.high
    assert (r.per_class["a"].k, r.per_class["a"].n) == (3, 4)
    assert (r.per_class["b"].k, r.per_class["b"].n) == (1, 1)
    assert (r.per_class["c"].k, r.per_class["c"].n) == (3, 4)
    assert r.confusion.tolist() == [[3, 1, 0], [0, 1, 0], [1, 0, 3]]
    d = r.to_dict()
    assert d["overall"]["rate"] == pytest.approx(7 / 9) and d["confusion"]["counts"][2] == [1, 0, 3]
    empty = agreement([], [], names)
    assert empty.overall.n == 0 and empty.overall.rate is None and empty.overall.high == 1.0


def test_agreement_by_source_and_errors():
    names = ["x", "y"]
    both = agreement_by_source({"molam": [0, 1, 1], "llm-a": [0, 0, 0]}, [0, 1, 0], names)
    assert list(both) == ["molam", "llm-a"]
    assert both["molam"].overall.k == 2 and both["llm-a"].overall.k == 2
    with pytest.raises(TrustError, match="not a class index"):
        agreement([0, 2], [0, 1], names)
    with pytest.raises(TrustError, match="not a class index"):
        agreement([0, 1], [0, -1], names)
    with pytest.raises(TrustError, match="predicted labels but"):
        agreement([0, 1, 1], [0, 1], names)
    with pytest.raises(TrustError, match="distinct"):
        agreement([0], [0], ["x", "x"])
    with pytest.raises(TrustError, match="integers"):
        agreement([0.5], [0], names)


def test_certify_probs_is_certify_on_top_probability_and_top_class():
    """The one builder of a certificate from probabilities (served and simulated loops): confidence = the top
    probability, correct = the top class is the audit's label, the frame's confidences as the pool."""
    rng = np.random.default_rng(3)
    n, k = 600, 4
    gold = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), gold] += rng.uniform(0, 6, n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    audit = np.sort(rng.choice(n, 120, replace=False))
    frame = np.arange(50, n)  # the first 50 rows: seeds, outside the frame
    audit = audit[audit >= 50]
    got = certify_probs(probs, audit, gold[audit], frame, 0.1, 0.1)
    conf = probs.max(1)
    want = certify(conf[audit], probs.argmax(1)[audit] == gold[audit], 0.1, 0.1, pool_confidence=conf[frame])
    assert got == want and got.threshold is not None
    # a wrong label in the audit can only make the threshold stricter, never looser
    flipped = gold[audit].copy()
    flipped[np.argmax(conf[audit])] = (probs.argmax(1)[audit][np.argmax(conf[audit])] + 1) % k
    worse = certify_probs(probs, audit, flipped, frame, 0.1, 0.1)
    assert worse.threshold is None or worse.threshold >= got.threshold
    with pytest.raises(TrustError, match="audit labels"):
        certify_probs(probs, audit, gold[audit][:-1], frame)
    empty = certify_probs(np.zeros(0), [], [], [], 0.1, 0.1)
    assert empty.threshold is None and empty.reason
