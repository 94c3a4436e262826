"""The certified threshold simulated over recorded LLM outputs (``molal molam certify``, bench/certify.py).

Protocol, per random draw ``d``: ``n_seeds`` random seed labels (``numpy.random.default_rng(d)``, as
bench/molam_quality.py) fit MoLAM; for each audit size an audit is drawn uniformly at random from the other
items (the *pool*) and labelled — in simulation by the gold labels, standing for the people's;
:func:`molal.trust.certify` sets the threshold from the audit and the pool's confidences; the pool's items
outside the audit (the *remaining pool*) are accepted at or above it, and the gold labels give the realised
error among them. Gold is read for the seeds, the audit and that realised error only: nothing is fitted or
tuned on it.

Three rules side by side: ``ltt-pool`` (the certificate with the pool's confidences), ``ltt-audit`` (the
certificate from the audit alone) and ``naive`` (accept where confidence ≥ 1 − ε, no audit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from molal.data import LLMOutputs

RULES = ("ltt-pool", "ltt-audit", "naive")


def seed_rows(n_items: int, n_seeds: int, draw: int) -> np.ndarray:
    """The seed rows of draw ``draw`` (the same as bench/molam_quality.py's)."""
    if not 0 < n_seeds < n_items:
        raise ValueError(f"need 0 < n_seeds < {n_items} items, got {n_seeds}")
    return np.random.default_rng(draw).choice(n_items, n_seeds, replace=False)


def fit_draw(outputs: LLMOutputs, gold: np.ndarray, draw: int, n_seeds: int = 50,
             molam_params: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Fit MoLAM on draw ``draw``'s seeds. Returns (seed rows, {"served": predict_proba, and "uncalibrated"
    too when the model has a ``calibration``}, information about the fit: chosen candidate, temperature, the
    seeds' out-of-fold calibration)."""
    from molal.molam import MoLAM

    seeds = seed_rows(outputs.n_items, n_seeds, draw)
    model = MoLAM(**(molam_params or {})).fit(outputs, seeds, gold[seeds])
    probas = {"served": model.predict_proba(outputs)}
    temperature = float(getattr(model, "temperature_", 1.0))
    if model.calibration is not None:  # the same fit without its temperature, side by side
        model.temperature_ = 1.0
        probas["uncalibrated"] = model.predict_proba(outputs)
        model.temperature_ = temperature
    info = {"draw": draw, "choice": model.metadata.get("choice"), "temperature": temperature,
            "calibration": model.metadata.get("calibration")}
    return seeds, probas, info


def certify_draw(proba: np.ndarray, gold: np.ndarray, seeds: np.ndarray, draw: int, *,
                 epsilons: Sequence[float] = (0.02, 0.05, 0.10), delta: float = 0.1,
                 audit_sizes: Sequence[int] = (50, 100, 200), audits: int = 1) -> list[dict[str, Any]]:
    """Every rule at every audit size and ε on one fitted draw, for ``audits`` independent random audits of
    each size (the fit is the costly part; more audits per fit measure the failure rate more precisely): one
    record each with the threshold, the coverage and realised error over the remaining pool, and the error
    over the whole pool (the audit's items included, with the model's labels)."""
    from molal.trust import certified_threshold, certify

    n = len(gold)
    conf, correct = proba.max(axis=1), proba.argmax(axis=1) == gold
    rest = np.setdiff1d(np.arange(n), seeds)
    rng = np.random.default_rng([int(draw), 1])  # the audits: a stream apart from the seeds'
    records = []
    for size in audit_sizes:
        if not 0 < size < len(rest):
            raise ValueError(f"audit size {size} must be between 1 and the pool's {len(rest) - 1} items")
    for r, size in ((r, size) for r in range(int(audits)) for size in audit_sizes):
        audit = rng.choice(rest, int(size), replace=False)
        remaining = np.setdiff1d(rest, audit)
        for eps in epsilons:
            rules = {"ltt-pool": certify(conf[audit], correct[audit], eps, delta, pool_confidence=conf[rest]).threshold,
                     "ltt-audit": certified_threshold(conf[audit], correct[audit], eps, delta),
                     "naive": 1.0 - eps}
            for rule, t in rules.items():
                rec: dict[str, Any] = {"draw": int(draw), "audit_draw": r, "rule": rule, "audit": int(size),
                                       "epsilon": float(eps),
                                       "threshold": t, "coverage": 0.0, "error": None, "pool_error": None}
                if t is not None:
                    acc = conf[remaining] >= t
                    rec["coverage"] = float(acc.mean())
                    rec["error"] = float((~correct[remaining][acc]).mean()) if acc.any() else 0.0
                    on_pool = conf[rest] >= t
                    rec["pool_error"] = float((~correct[rest][on_pool]).mean()) if on_pool.any() else 0.0
                records.append(rec)
    return records


def summarize(records: Sequence[dict[str, Any]], delta: float) -> list[dict[str, Any]]:
    """Per (rule, audit size, ε): draws (fits × audits), share of draws with a certificate, the median
    threshold over those, mean coverage (0 when nothing is
    certified), mean realised error over draws with a certificate, and the share of draws whose realised error
    over the remaining pool (``fail``) or over the whole pool (``fail_pool``) exceeds ε, with a one-sided
    exact (Clopper–Pearson) 95% upper bound on that share's probability."""
    from molal.trust import clopper_pearson

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["rule"], r["audit"], r["epsilon"]), []).append(r)
    out = []
    for (rule, size, eps), rs in sorted(groups.items(), key=lambda kv: (RULES.index(kv[0][0]), kv[0][1], kv[0][2])):
        cert = [r for r in rs if r["threshold"] is not None]
        fails = sum(r["error"] > eps for r in cert)
        fails_pool = sum(r["pool_error"] > eps for r in cert)
        out.append({
            "rule": rule, "audit": size, "epsilon": eps, "draws": len(rs),
            "certified": len(cert) / len(rs),
            "threshold": float(np.median([r["threshold"] for r in cert])) if cert else None,
            "coverage": float(np.mean([r["coverage"] for r in rs])),
            "error": float(np.mean([r["error"] for r in cert])) if cert else None,
            "fail": fails / len(rs), "fail_pool": fails_pool / len(rs),
            "fail_upper95": clopper_pearson(fails, len(rs), 0.90)[1],
            "holds": fails / len(rs) <= delta,
        })
    return out


def simulate_certification(outputs: LLMOutputs, gold: np.ndarray, *, draws: int = 100, first_draw: int = 0,
                           n_seeds: int = 50, epsilons: Sequence[float] = (0.02, 0.05, 0.10), delta: float = 0.1,
                           audit_sizes: Sequence[int] = (50, 100, 200), audits: int = 1,
                           molam_params: dict[str, Any] | None = None,
                           progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The protocol of the module docstring over draws ``first_draw .. first_draw + draws - 1``. Returns
    ``{"records": [...], "summary": summarize(...), "fits": [fit_draw's information per draw]}``; records
    carry ``confidence`` = ``"served"`` (and ``"uncalibrated"`` for a calibrated MoLAM)."""
    gold = np.asarray(gold, dtype=np.int64)
    if gold.shape != (outputs.n_items,) or gold.min() < 0 or gold.max() >= outputs.n_classes:
        raise ValueError(f"gold must be {outputs.n_items} class indices in 0..{outputs.n_classes - 1}")
    records, fits = [], []
    for i, d in enumerate(range(first_draw, first_draw + draws)):
        seeds, probas, info = fit_draw(outputs, gold, d, n_seeds, molam_params)
        fits.append(info)
        for name, proba in probas.items():
            for r in certify_draw(proba, gold, seeds, d, epsilons=epsilons, delta=delta, audit_sizes=audit_sizes,
                                  audits=audits):
                records.append({**r, "confidence": name})
        if progress is not None:
            progress(i + 1, draws)
    summary = {name: summarize([r for r in records if r["confidence"] == name], delta)
               for name in dict.fromkeys(r["confidence"] for r in records)}
    return {"records": records, "summary": summary, "fits": fits}
