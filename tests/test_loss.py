"""The paper's noise-robust loss, checked against hand-computed values and gradient directions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from molal.loss import discrepancy_weights, lambda_t, noise_robust_loss


def test_lambda_schedule():
    assert lambda_t(0) == pytest.approx(0.4)
    assert lambda_t(1) == pytest.approx(0.46)
    assert lambda_t(10) == pytest.approx(1.0)
    assert lambda_t(2, base=0.1, step=0.5) == pytest.approx(1.1)
    with pytest.raises(ValueError):
        lambda_t(-1)


def test_discrepancy_weights():
    prev = np.array([0, 1, 2, 2, -1])
    lab = np.array([0, 2, 2, 1, 1])
    human = np.array([False, False, False, True, False])
    w = discrepancy_weights(prev, lab, human, alpha=0.5)
    # agree -> 1; disagree -> 0.5; human always 1; no previous prediction (-1) -> 1
    assert w.tolist() == [1.0, 0.5, 1.0, 1.0, 1.0]
    assert discrepancy_weights(None, lab).tolist() == [1.0] * 5
    with pytest.raises(ValueError):
        discrepancy_weights(prev[:3], lab)
    with pytest.raises(ValueError):
        discrepancy_weights(prev, lab, alpha=2.0)


def _hand_loss(logits, targets, weights, negatives, lam):
    """The formula, written out with plain Python floats."""
    n = len(logits)
    ce_sum = 0.0
    neg_terms = []
    for i in range(n):
        z = logits[i]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        p = [math.exp(v - lse) for v in z]
        ce_sum += weights[i] * (lse - z[targets[i]])
        ks = [k for k in range(len(z)) if negatives[i][k] and k != targets[i]]
        if ks:
            neg_terms.append(-sum(math.log(1 - p[k] + 1e-6) for k in ks) / len(ks))
    out = ce_sum / n
    if neg_terms:
        out += lam * sum(neg_terms) / len(neg_terms)
    return out


def test_loss_matches_hand_computed_value():
    logits = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, 1.0, 1.0]]
    targets = [0, 2, 1, 0]
    weights = [1.0, 0.5, 1.0, 0.5]
    negatives = [[False, True, True], [False, False, False], [True, False, False], [False, False, True]]
    lam = lambda_t(3)
    got = noise_robust_loss(
        torch.tensor(logits, dtype=torch.float64),
        torch.tensor(targets),
        torch.tensor(weights, dtype=torch.float64),
        torch.tensor(negatives),
        lam,
    )
    assert got.item() == pytest.approx(_hand_loss(logits, targets, weights, negatives, lam), rel=1e-12)


def test_loss_known_numbers():
    # uniform logits over 2 classes: CE = log 2; p = 0.5 so negative term = -log(0.5 + 1e-6)
    logits = torch.zeros(2, 2, dtype=torch.float64)
    targets = torch.tensor([0, 1])
    neg = torch.tensor([[False, True], [False, False]])
    got = noise_robust_loss(logits, targets, None, neg, lam=0.4).item()
    assert got == pytest.approx(math.log(2) + 0.4 * -math.log(0.5 + 1e-6), rel=1e-12)
    # weights scale CE, mean over all items (not normalised by the weights)
    got_w = noise_robust_loss(logits, targets, torch.tensor([0.5, 0.5], dtype=torch.float64)).item()
    assert got_w == pytest.approx(0.5 * math.log(2), rel=1e-12)


def test_negative_on_target_is_ignored_and_no_negatives_is_plain_ce():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 0])
    ce = torch.nn.functional.cross_entropy(logits, targets)
    only_target = torch.zeros(5, 4, dtype=torch.bool)
    only_target[torch.arange(5), targets] = True
    assert noise_robust_loss(logits, targets, None, only_target, lam=1.0).item() == pytest.approx(ce.item())
    assert noise_robust_loss(logits, targets, None, None, lam=1.0).item() == pytest.approx(ce.item())


def test_gradient_pushes_negatives_down():
    logits = torch.tensor([[0.3, 0.2, 0.1, 0.0]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0])
    neg = torch.tensor([[False, False, True, False]])
    # negative term alone: d/dz_k of -log(1-p_k) must be > 0 on the negative class (descent lowers it)
    base = noise_robust_loss(logits, targets, torch.zeros(1, dtype=torch.float64), neg, lam=1.0)
    base.backward()
    g = logits.grad[0]
    assert g[2] > 0 and g[0] < 0 and g[1] < 0 and g[3] < 0
    # full loss: a gradient step lowers p(negative) more than plain CE does
    def p_neg_after_step(lam):
        z = logits.detach().clone().requires_grad_(True)
        noise_robust_loss(z, targets, None, neg, lam=lam).backward()
        with torch.no_grad():
            return torch.softmax(z - 0.5 * z.grad, 1)[0, 2].item()

    assert p_neg_after_step(1.0) < p_neg_after_step(0.0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="targets"):
        noise_robust_loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="negatives"):
        noise_robust_loss(torch.zeros(2, 3), torch.tensor([0, 1]), None, torch.zeros(2, 2, dtype=torch.bool), 0.4)
    with pytest.raises(ValueError, match="logits"):
        noise_robust_loss(torch.zeros(3), torch.tensor([0, 1, 2]))
