"""The query strategies fed by a real (tiny) Student through ``build_pool``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from molal.query import STRATEGIES, build_pool, get_strategy
from molal.student import Student
from tests.test_student import CLASSES, make_tiny_encoder, toy_data

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    enc = str(make_tiny_encoder(tmp_path_factory.mktemp("tiny-bert-q")))
    texts, y = toy_data(30, seed=11)
    st = Student(CLASSES, encoder=enc, max_length=32, epochs=3, batch_size=8, lr=3e-3, device="cpu", seed=0)
    return st.fit(texts, y, progress=False), texts


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_build_pool_and_select(fitted, name):
    st, labeled = fitted
    pool_texts, _ = toy_data(40, seed=12)
    strategy = get_strategy(name, n_samples=4) if name == "bemps" else get_strategy(name)
    pool = build_pool(strategy, st, pool_texts, labeled_texts=labeled)
    assert pool.probs.shape == (40, 3) and pool.embeddings.shape == (40, 32)
    if name == "coreset":
        assert pool.labeled_embeddings.shape == (30, 32)
    if name == "bemps":
        assert pool.mc_probs.shape == (4, 40, 3)
    if name == "noise_stability":
        assert pool.perturbed_probs.shape == (5, 40, 3)
    idx = strategy.select(pool, 7, np.random.default_rng(0))
    assert len(idx) == 7 and len(set(idx.tolist())) == 7


def test_hook_fills_missing_arrays(fitted):
    """Without precomputed arrays, strategies call the model hook (pool.model / pool.texts)."""
    from molal.query import QueryPool

    st, _ = fitted
    texts, _ = toy_data(20, seed=13)
    pool = QueryPool(probs=st.predict_proba(texts), model=st, texts=texts)
    idx = get_strategy("noise_stability").select(pool, 5, 0)
    assert pool.perturbed_probs is not None and len(idx) == 5
    idx = get_strategy("bemps", n_samples=3).select(pool, 5, 0)
    assert pool.mc_probs.shape == (3, 20, 3) and len(idx) == 5
