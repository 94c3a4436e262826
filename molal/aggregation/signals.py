"""What the LLM outputs say about each item: vote shares, the features aggregators learn from, the
Dawid–Skene model of the LLMs' confusions, and the labels derived from aggregated probabilities (negative
labels, the least confident rows)."""

from __future__ import annotations

import numpy as np

from molal.aggregation.base import EPS, MoLAMError, normalize_rows
from molal.data import LLMOutputs


def votes(outputs: LLMOutputs) -> np.ndarray:
    """Per-LLM answer distribution (n, L, K): the sampled-answer consistency where recorded, else the
    one-hot argmax of the probabilities. A row with no valid answer (all zeros) stays all zeros."""
    if outputs.consistency is not None:
        return outputs.consistency
    p = outputs.probs
    out = np.zeros_like(p)
    np.put_along_axis(out, p.argmax(axis=2)[..., None], 1.0, axis=2)
    out[p.sum(axis=2) <= EPS] = 0.0
    return out


def vote_shares(outputs: LLMOutputs) -> np.ndarray:
    """Pooled votes of all LLMs (n, K), the mean probabilities as a tiny tie-breaker (the majority vote)."""
    v = votes(outputs).sum(axis=1)
    return v + 1e-6 * normalize_rows(outputs.normalized_probs().mean(axis=1))


# -- single sources (one LLM's probabilities or its sampled votes) ---------------------------------------------
def single_sources(outputs: LLMOutputs) -> list[tuple[str, int, np.ndarray]]:
    """Every single source: (``"probs"`` | ``"votes"``, LLM index, (n, K) scores)."""
    p = outputs.normalized_probs()
    out = [("probs", m, p[:, m]) for m in range(outputs.n_llms)]
    if outputs.consistency is not None:
        # votes, with the probabilities as tie-breaker / fallback when no answer was valid
        out += [("votes", m, outputs.consistency[:, m] + 1e-3 * p[:, m]) for m in range(outputs.n_llms)]
    return out


def source_probs(outputs: LLMOutputs, source: tuple[str, int]) -> np.ndarray:
    """The (n, K) scores of one source."""
    name, m = source
    for n2, m2, p in single_sources(outputs):
        if (n2, m2) == (name, m):
            return p
    raise MoLAMError(f"source {name} of LLM {m} not available in these outputs")


def best_single_source(outputs: LLMOutputs, idx: np.ndarray, labels: np.ndarray
                       ) -> tuple[tuple[str, int], float, dict[str, float]]:
    """The source most accurate on the seeds, ties broken by agreement with the majority vote on the pool
    (no gold used): (source, its seed accuracy, seed accuracy of every source by ``llm:kind``)."""
    mv = vote_shares(outputs).argmax(axis=1)
    best, best_key = None, None
    scores = {}
    for name, m, p in single_sources(outputs):
        acc = float((p[idx].argmax(axis=1) == labels).mean())
        agree = float((p.argmax(axis=1) == mv).mean())
        scores[f"{outputs.llm_names[m]}:{name}"] = round(acc, 4)
        key = (acc, agree)
        if best_key is None or key > best_key:
            best, best_key = (name, m), key
    return best, best_key[0], scores


def general_features(outputs: LLMOutputs, floor: float = 1e-3) -> np.ndarray:
    """General per-item features: per LLM, log of the renormalised probabilities (floored) and the vote
    shares; plus the mean probability vector and the pooled vote shares across LLMs."""
    n = outputs.n_items
    p = outputs.normalized_probs()
    v = votes(outputs)
    parts = [np.log(np.maximum(p, floor)).reshape(n, -1)]
    if outputs.consistency is not None:
        parts.append(v.reshape(n, -1))
    parts.append(np.log(np.maximum(p.mean(axis=1), floor)))
    parts.append(normalize_rows(v.sum(axis=1)))
    return np.concatenate(parts, axis=1)


def paper_features(outputs: LLMOutputs) -> np.ndarray:
    """The paper's 2·N·K features: raw class probabilities and consistency per LLM, concatenated."""
    n = outputs.n_items
    return np.concatenate([outputs.probs.reshape(n, -1), votes(outputs).reshape(n, -1)], axis=1)


def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (a constant column gets 1)."""
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    return mu, np.where(sd > 1e-9, sd, 1.0)


# -- Dawid–Skene ---------------------------------------------------------------------------------------------
def ds_observations(outputs: LLMOutputs) -> np.ndarray:
    """Soft observations for Dawid–Skene: per LLM its vote shares and its renormalised probabilities
    (two "annotators" per LLM when consistency is recorded)."""
    p = outputs.normalized_probs()
    if outputs.consistency is None:
        return p
    return np.concatenate([outputs.consistency, p], axis=1)


def ds_em(
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
    post = normalize_rows(obs.mean(axis=1))
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
        new = ds_posterior(obs, prior, logpi)
        if seed_idx is not None and len(seed_idx):
            new[seed_idx] = eye[seed_labels]
        delta = float(np.abs(new - post).max())
        post = new
        if delta < tol:
            break
    return post, prior, logpi


def ds_posterior(obs: np.ndarray, prior: np.ndarray, logpi: np.ndarray) -> np.ndarray:
    """The Dawid–Skene posterior (n, K) of soft observations under a fitted prior and log confusion."""
    logt = np.log(prior)[None, :] + np.einsum("naj,akj->nk", obs, logpi)
    logt -= logt.max(axis=1, keepdims=True)
    t = np.exp(logt)
    return t / t.sum(axis=1, keepdims=True)


# -- labels from aggregated probabilities ---------------------------------------------------------------------
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
