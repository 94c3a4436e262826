"""Temperature scaling of an aggregator's class distributions, fitted on out-of-fold predictions.

``fit_temperature(proba, labels)`` finds the T > 0 that minimises the log loss of ``proba ** (1/T)``
(renormalised) against ``labels``; ``apply_temperature(proba, T)`` applies it. The argmax never changes, so
accuracy does not either: only the confidence moves (T > 1 softens an overconfident model, T < 1 sharpens an
underconfident one). MoLAM fits T on its chosen model's out-of-fold predictions on the seeds
(``MoLAM(calibration="temperature")``): labels the model never saw, and nothing beyond the seeds.
"""

from __future__ import annotations

import numpy as np

#: probabilities are floored here before the logarithm (an exact 0 stays the least likely class)
FLOOR = 1e-12
#: the temperatures searched (log-uniform bounds)
T_MIN, T_MAX = 0.05, 20.0


def _log(proba: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), FLOOR, None))


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``proba ** (1/temperature)``, rows renormalised (computed in log space)."""
    if temperature == 1.0:
        return np.asarray(proba, dtype=np.float64)
    z = _log(proba) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_loss(proba: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of ``labels`` under ``proba`` (floored)."""
    p = np.asarray(proba, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, FLOOR, None)).mean())


def fit_temperature(proba: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [T_MIN, T_MAX] minimising the log loss of the tempered ``proba`` against ``labels``
    (1.0 when there is nothing to fit on)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    logp = _log(proba)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        return float(-(z[rows, labels] - np.log(np.exp(z).sum(axis=1))).mean())

    res = minimize_scalar(loss, bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                          options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    return t if loss(np.log(t)) < loss(0.0) else 1.0
