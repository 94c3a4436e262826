"""Query strategies on small synthetic pools: contract (unique, in range, budget) and falsifiable behaviour."""

from __future__ import annotations

import time

import numpy as np
import pytest

from molal.query import (
    STRATEGIES,
    BEMPSStrategy,
    QueryError,
    QueryPool,
    get_strategy,
    k_center_greedy,
    min_sq_dist,
)


def _dirichlet(n, k, rng, conc=1.0):
    return rng.dirichlet(np.full(k, conc), size=n)


def full_pool(n=200, k=4, d=8, seed=0) -> QueryPool:
    rng = np.random.default_rng(seed)
    probs = _dirichlet(n, k, rng)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    mc = np.stack([0.7 * probs + 0.3 * _dirichlet(n, k, rng) for _ in range(6)])
    pert = np.stack([probs + 1e-3 * rng.normal(size=probs.shape) for _ in range(5)])
    return QueryPool(
        probs=probs, embeddings=emb, labeled_embeddings=rng.normal(size=(10, d)), mc_probs=mc, perturbed_probs=pert
    )


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("budget", [1, 17, 200, 500])
def test_contract(name, budget):
    pool = full_pool()
    idx = get_strategy(name).select(pool, budget, np.random.default_rng(1))
    assert idx.dtype == np.int64
    assert len(idx) == min(budget, pool.n)
    assert len(np.unique(idx)) == len(idx)
    assert idx.min() >= 0 and idx.max() < pool.n
    # same rng seed → same batch
    again = get_strategy(name).select(pool, budget, np.random.default_rng(1))
    np.testing.assert_array_equal(idx, again)


def test_zero_budget_and_bad_input():
    pool = full_pool()
    assert len(get_strategy("random").select(pool, 0, 0)) == 0
    with pytest.raises(QueryError, match="valid: random, entropy"):
        get_strategy("nope")
    with pytest.raises(QueryError, match="budget"):
        get_strategy("random").select(pool, -1, 0)
    with pytest.raises(QueryError, match="needs pool.embeddings"):
        get_strategy("coreset").select(QueryPool(probs=pool.probs), 3, 0)
    with pytest.raises(QueryError, match="probs must be"):
        QueryPool(probs=np.ones(5))
    with pytest.raises(QueryError, match="embeddings"):
        QueryPool(probs=pool.probs, embeddings=np.zeros((3, 2)))
    with pytest.raises(QueryError, match="bad options"):
        get_strategy("entropy", foo=1)
    assert get_strategy("max-entropy").name == "entropy"


def test_uncertainty_strategies_pick_the_right_items():
    probs = np.array(
        [
            [0.98, 0.01, 0.01],  # confident
            [1 / 3, 1 / 3, 1 / 3],  # max entropy, least confidence
            [0.5, 0.5, 0.0],  # zero margin, but lower entropy than [0.6, 0.2, 0.2]
            [0.6, 0.2, 0.2],
            [0.9, 0.05, 0.05],
        ]
    )
    pool = QueryPool(probs=probs)
    assert get_strategy("entropy").select(pool, 3, 0).tolist() == [1, 3, 2]  # H = 1.10, 0.95, 0.69
    assert get_strategy("margin").select(pool, 2, 0).tolist()[0] in (1, 2)  # both have margin 0
    assert set(get_strategy("margin").select(pool, 2, 0).tolist()) == {1, 2}
    assert get_strategy("least_confidence").select(pool, 3, 0).tolist() == [1, 2, 3]
    ent = get_strategy("entropy").select(pool, 5, 0)
    assert ent[-1] == 0  # the most confident item comes last


def _blobs(n_per=200, n_blobs=5, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=50.0, size=(n_blobs, d))
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(n_blobs), n_per)


def test_coreset_covers_clusters():
    x, blob = _blobs()
    probs = np.full((len(x), 3), 1 / 3)
    idx = get_strategy("coreset").select(QueryPool(probs=probs, embeddings=x), 5, 0)
    assert sorted(blob[idx].tolist()) == [0, 1, 2, 3, 4]
    # with blobs 0-3 already labelled, the first pick comes from blob 4
    lab = x[blob < 4][::50]
    idx = get_strategy("coreset").select(QueryPool(probs=probs, embeddings=x, labeled_embeddings=lab), 1, 0)
    assert blob[idx[0]] == 4


def test_badge_covers_clusters_and_prefers_uncertain():
    x, blob = _blobs(n_per=100)
    rng = np.random.default_rng(0)
    probs = _dirichlet(len(x), 3, rng, conc=5.0)
    idx = get_strategy("badge").select(QueryPool(probs=probs, embeddings=x), 5, np.random.default_rng(0))
    assert len(set(blob[idx].tolist())) >= 4
    # confident items have ~zero gradient embedding: BADGE never picks them first
    probs2 = np.tile([0.999, 0.0005, 0.0005], (len(x), 1))
    probs2[7] = [0.4, 0.3, 0.3]
    first = get_strategy("badge").select(QueryPool(probs=probs2, embeddings=x), 1, 0)
    assert first.tolist() == [7]


def test_noise_stability_picks_unstable_and_diverse():
    rng = np.random.default_rng(0)
    n = 300
    probs = _dirichlet(n, 3, rng)
    pert = np.repeat(probs[None], 5, axis=0).copy()
    unstable = [10, 50, 200]
    for i in unstable:  # big but different output changes
        pert[:, i] += rng.normal(scale=0.2, size=(5, 3))
    pool = QueryPool(probs=probs, perturbed_probs=pert)
    idx = get_strategy("noise_stability").select(pool, 3, 0)
    assert sorted(idx.tolist()) == unstable
    assert sorted(get_strategy("noise_stability", normalize=False).select(pool, 3, 0).tolist()) == unstable


def test_noise_stability_divides_by_the_output_norm_as_the_papers_code():
    """Two items with the same absolute output change: the one whose output vector is shorter (less
    confident) changed more relative to it and is picked first."""
    probs = np.array([[1.0, 0.0, 0.0], [0.34, 0.33, 0.33], [0.5, 0.5, 0.0]])
    pert = np.repeat(probs[None], 2, axis=0).copy()
    pert[:, 0] += [0.0, 0.05, -0.05]
    pert[:, 1] += [0.0, 0.05, -0.05]
    pool = QueryPool(probs=probs, perturbed_probs=pert)
    assert get_strategy("noise_stability").select(pool, 1, 0).tolist() == [1]
    assert get_strategy("noise_stability", normalize=False).select(pool, 1, 0).tolist() == [0]  # a tie: first


def test_bemps_scores_and_diversity():
    rng = np.random.default_rng(0)
    n, k = 120, 3
    # items 0-59: all MC samples agree (no disagreement → no expected MSE reduction)
    agree = np.tile(_dirichlet(60, k, rng, conc=10.0)[None], (8, 1, 1))
    # items 60-119: samples disagree strongly
    disagree = np.stack([_dirichlet(60, k, rng, conc=0.3) for _ in range(8)])
    mc = np.concatenate([agree, disagree], axis=1)
    s = BEMPSStrategy(n_estimation=50)
    vec = s.score_vectors(mc, np.arange(0, n, 2))
    assert vec.shape == (n, 60) and (vec >= -1e-9).all()
    # the expected error reduction (without the per-model variance at x', the same for every x)
    red = BEMPSStrategy(variance_term=False).score_vectors(mc, np.arange(0, n, 2))
    assert red[:60].mean() < 0.1 * red[60:].mean() and vec[:60].mean() < vec[60:].mean()
    pool = QueryPool(probs=mc.mean(0), mc_probs=mc)
    idx = s.select(pool, 10, np.random.default_rng(0))
    assert (idx >= 60).all()  # only disagreeing items (top 50%) are candidates


def test_bemps_score_matches_naive_formula():
    rng = np.random.default_rng(3)
    e, n, k = 4, 5, 3
    mc = np.stack([_dirichlet(n, k, rng) for _ in range(e)])
    est = np.array([0, 2, 4])
    vec = BEMPSStrategy().score_vectors(mc, est)
    old = BEMPSStrategy(variance_term=False).score_vectors(mc, est)
    for x in range(n):
        for a, xp in enumerate(est):
            base = mc[:, xp, :].mean(0)
            total = paper = 0.0
            for y in range(k):
                p_y = mc[:, x, y].mean()
                w = mc[:, x, y] / mc[:, x, y].sum()
                new = (w[:, None] * mc[:, xp, :]).sum(0)
                total += p_y * ((base - new) ** 2).sum()
                # the paper's code (MoLLIA bemps_coremse_batch): Σ_e Σ_ŷ (p(ŷ|θ_e,x') − p(ŷ|x',L+(x,y)))²
                paper += p_y * ((mc[:, xp, :] - new[None]) ** 2).sum()
            assert old[x, a] == pytest.approx(total, rel=1e-5, abs=1e-9)
            assert vec[x, a] == pytest.approx(paper, rel=1e-5, abs=1e-9)
    # the variance term is the same for every x: the ranking by mean score does not change
    assert (np.argsort(vec.mean(1)) == np.argsort(old.mean(1))).all()


def test_min_sq_dist_chunked_equals_dense():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    c = rng.normal(size=(70, 5)).astype(np.float32)
    dense = ((x[:, None, :] - c[None]) ** 2).sum(2).min(1)
    np.testing.assert_allclose(min_sq_dist(x, c, chunk=64), dense, rtol=1e-4, atol=1e-4)


def test_k_center_greedy_is_the_greedy_farthest_point():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    idx = k_center_greedy(x, 4, first=0)
    # brute-force greedy
    chosen = [0]
    for _ in range(3):
        d = ((x[:, None] - x[chosen][None]) ** 2).sum(2).min(1)
        chosen.append(int(np.argmax(d)))
    assert idx.tolist() == chosen


def test_coreset_linear_memory_on_20k():
    rng = np.random.default_rng(0)
    n, d = 20000, 64
    pool = QueryPool(
        probs=np.full((n, 2), 0.5),
        embeddings=rng.normal(size=(n, d)).astype(np.float32),
        labeled_embeddings=rng.normal(size=(500, d)).astype(np.float32),
    )
    import tracemalloc

    tracemalloc.start()
    t = time.perf_counter()
    idx = get_strategy("coreset").select(pool, 50, 0)
    elapsed = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(np.unique(idx)) == 50
    assert peak < 100 * 2**20, peak  # an n×n float32 matrix would be 1.6 GB
    assert elapsed < 60  # generous: catches a quadratic blow-up, not a timing benchmark
