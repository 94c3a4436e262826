"""The noise-robust training loss of the paper (MoLLIA, AAAI 2026), and its two schedules.

For a batch of n items with (possibly noisy) labels ŷ_i, per-item weights w_i and per-item negative label
sets N_i (classes the LLMs all but excluded)::

    L = mean_i  w_i · CE(f(x_i), ŷ_i)
        + λ_t · mean_{i : N_i ≠ ∅} [ −(1/|N_i|) Σ_{k ∈ N_i} log(1 − p_k(x_i) + 1e-6) ]

* ``λ_t = 0.4 + 0.06·t`` in active-learning round ``t`` (:func:`lambda_t`) — the negative-label term gets
  more weight as the labelled set grows;
* ``w_i = α = 0.5`` where the previous round's student disagrees with the MoLAM label, else 1; seed and
  human-labelled items always 1 (:func:`discrepancy_weights`);
* ``N_i = molal.molam.negative_labels(...)`` for MoLAM-labelled items, empty for human-labelled ones.

The first mean is over *all* n items (not normalised by Σw), exactly as in the paper. The second mean is
over the items that have at least one negative; with none it is 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily (importing molal must stay cheap)
    import torch

#: the 1e-6 inside log(1 − p + eps) of the paper
NEG_EPS = 1e-6


def lambda_t(t: int, base: float = 0.4, step: float = 0.06) -> float:
    """Weight of the negative-label term in AL round ``t`` (t = 0 is the cold-start round)."""
    if t < 0:
        raise ValueError(f"round t must be >= 0, got {t}")
    return float(base + step * t)


def discrepancy_weights(
    prev_pred: np.ndarray | None,
    molam_labels: np.ndarray,
    is_human: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Per-item CE weights: ``alpha`` where the previous round's student prediction (``prev_pred``, class
    indices; -1 = no prediction) disagrees with the label, 1 elsewhere; human-labelled items (``is_human``)
    always 1. ``prev_pred=None`` (the first round, no previous student) gives all ones."""
    labels = np.asarray(molam_labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w = np.ones(len(labels), dtype=np.float32)
    if prev_pred is not None:
        prev = np.asarray(prev_pred, dtype=np.int64)
        if prev.shape != labels.shape:
            raise ValueError(f"prev_pred shape {prev.shape} != labels shape {labels.shape}")
        w[(prev >= 0) & (prev != labels)] = alpha
    if is_human is not None:
        human = np.asarray(is_human, dtype=bool)
        if human.shape != labels.shape:
            raise ValueError(f"is_human shape {human.shape} != labels shape {labels.shape}")
        w[human] = 1.0
    return w


def noise_robust_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
    lam: float = 0.0,
    eps: float = NEG_EPS,
) -> torch.Tensor:
    """The paper's loss for one batch (see the module docstring); returns a scalar tensor.

    Args:
        logits: (n, K) raw scores.
        targets: (n,) int64 class indices (the MoLAM or human labels).
        weights: (n,) per-item CE weights w_i (None = all 1).
        negatives: (n, K) bool, True where class k is a negative label of item i (None = no negatives).
            A target class marked negative is ignored (never penalised).
        lam: λ_t, the weight of the negative-label term.
    """
    import torch
    import torch.nn.functional as F

    if logits.ndim != 2:
        raise ValueError(f"logits must be (n, K), got shape {tuple(logits.shape)}")
    n, k = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"targets must be ({n},), got {tuple(targets.shape)}")
    if n == 0:
        raise ValueError("empty batch")
    if int(targets.min()) < 0 or int(targets.max()) >= k:
        raise ValueError(f"targets must be class indices in [0, {k})")
    ce = F.cross_entropy(logits, targets, reduction="none")
    if weights is not None:
        if weights.shape != (n,):
            raise ValueError(f"weights must be ({n},), got {tuple(weights.shape)}")
        ce = ce * weights.to(ce.dtype)
    loss = ce.mean()
    if negatives is None or lam == 0.0:
        return loss
    if negatives.shape != (n, k):
        raise ValueError(f"negatives must be ({n}, {k}), got {tuple(negatives.shape)}")
    neg = negatives.to(torch.bool).clone()
    neg[torch.arange(n, device=neg.device), targets] = False  # never push down the target class
    count = neg.sum(dim=1)
    has = count > 0
    if not bool(has.any()):
        return loss
    p = torch.softmax(logits, dim=1)
    term = -torch.log(1.0 - p + eps) * neg.to(p.dtype)
    per_item = term.sum(dim=1)[has] / count[has].to(p.dtype)
    return loss + lam * per_item.mean()
