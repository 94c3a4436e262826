"""MoLAM's transductive text model (``text_features``): API, cross-fitting, persistence, old files.

Fast: a deterministic stand-in encoder (hashed bag of words, unit-norm) replaces MiniLM except in one small
real-MiniLM check; the quality figures live in bench/molam_quality.py (``--text-features minilm``)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

import molal.molam as molam_mod
from molal import LLMOutputs
from molal.molam import MoLAM, MoLAMError, load_aggregator

FAST = {"n_repeats": 1, "lr_cs": (0.1, 1.0), "xgb_params": {"learning_rate": 0.1, "max_depth": 3, "n_estimators": 40}}
DIM = 64


def _bow(texts, encoder="minilm", max_length=64, device="cpu"):
    out = np.zeros((len(texts), DIM))
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, zlib.crc32(w.encode()) % DIM] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.fixture
def fake_encoder(monkeypatch):
    calls = []

    def fake(texts, encoder="minilm", max_length=64, device="cpu"):
        calls.append(len(texts))
        return _bow(texts)

    import molal.aggregation.text_model as text_model

    monkeypatch.setattr(text_model, "embed_texts_cached", fake)
    return calls


@pytest.fixture(scope="module")
def pool(trec_outputs, trec_gold):
    rows = np.random.default_rng(7).choice(trec_outputs.n_items, 800, replace=False)
    return trec_outputs.subset(rows), trec_gold[rows]


def _seeds(gold, n=40, draw=0):
    idx = np.random.default_rng(draw).choice(len(gold), n, replace=False)
    return idx, gold[idx]


def test_fit_predict_metadata_and_effect(pool, fake_encoder):
    out, gold = pool
    idx, y = _seeds(gold)
    m = MoLAM(text_features="minilm", **FAST).fit(out, idx, y)
    base = MoLAM(**FAST).fit(out, idx, y)
    p = m.predict_proba(out)
    assert p.shape == (out.n_items, out.n_classes)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert m.choice == base.choice  # the LLM-only model selection is untouched
    np.testing.assert_allclose(m._predict_base(out), base.predict_proba(out), atol=1e-12)
    meta = m.metadata["text"]
    assert meta["encoder"] == "minilm" and 0.0 <= meta["changed_share_non_seed"] <= 1.0
    assert len(m.text_model_.models_) == m.text_folds == 5
    assert m.metadata["params"]["text_features"] == "minilm"
    # defaults: embeddings + 4,096 hashed n-grams, C 3, 3 self-training rounds
    assert (m.text_ngrams, m.text_c, m.text_rounds) == (4096, 3.0, 3)
    assert m.text_model_.models_[0]["coef"].shape == (out.n_classes, DIM + 4096)
    assert fake_encoder  # the texts were embedded
    # the text model does move some labels, and text_weight=0 is exactly the LLM-only MoLAM
    assert (p.argmax(1) != base.predict(out)).any()
    z = MoLAM(text_features="minilm", text_weight=0.0, **FAST).fit(out, idx, y)
    np.testing.assert_allclose(z.predict_proba(out), base.predict_proba(out), atol=1e-9)
    # embeddings only, one round: another text model, same API
    r2 = MoLAM(text_features="minilm", text_rounds=1, text_ngrams=0, **FAST).fit(out, idx, y)
    assert r2.metadata["params"]["text_rounds"] == 1 and r2.text_model_.models_[0]["coef"].shape == (out.n_classes, DIM)
    assert not np.allclose(r2.predict_proba(out), p)


def test_cross_fitting_folds_follow_the_text(pool, fake_encoder):
    out, gold = pool
    idx, y = _seeds(gold)
    m = MoLAM(text_features="minilm", text_folds=4, text_rounds=1, text_ngrams=0, **FAST).fit(out, idx, y)
    f = m.text_model_.fold_of(out.texts)
    assert set(np.unique(f)) <= set(range(4)) and len(np.unique(f)) == 4
    np.testing.assert_array_equal(f, m.text_model_.fold_of(list(out.texts)))  # deterministic
    assert (m.text_model_.fold_of(["What is a dog ?"] * 3) == m.text_model_.fold_of(["What is a dog ?"])[0]).all()  # duplicates share
    # an item's text distribution comes from the fold model that did not train on it: scoring a subset (or
    # the items in another order) gives the same rows as scoring the whole pool
    p = m.predict_proba(out)
    rows = np.array([5, 3, 700, 42])
    np.testing.assert_allclose(m.predict_proba(out.subset(rows)), p[rows], atol=1e-12)
    # cross-fitting: a seed's gold label does not reach its own text prediction (the LLM-only part fixed,
    # refit only the text model with that seed's label flipped: its own fold's model is unchanged)
    i = int(idx[0])
    y2 = y.copy()
    y2[0] = (y[0] + 1) % out.n_classes
    emb = _bow(out.texts)
    from molal.aggregation.signals import normalize_rows

    base = normalize_rows(np.clip(m._predict_base(out), 0, None))
    tm = m.text_model_
    tm.fit(out.texts, base, idx, y, emb=emb)
    t1 = tm.proba(emb, f, out.n_classes)
    tm.fit(out.texts, base, idx, y2, emb=emb)
    t2 = tm.proba(emb, f, out.n_classes)
    np.testing.assert_array_equal(t1[i], t2[i])
    np.testing.assert_array_equal(t1[f == f[i]], t2[f == f[i]])
    assert not np.allclose(t1[f != f[i]], t2[f != f[i]])


def test_save_load_roundtrip_and_old_files(pool, fake_encoder, tmp_path):
    out, gold = pool
    idx, y = _seeds(gold)
    m = MoLAM(text_features="minilm", text_c=2.0, **FAST).fit(out, idx, y)
    path = m.save(tmp_path / "t.json")
    m2 = load_aggregator(path)
    assert isinstance(m2, MoLAM) and m2.text_features == "minilm" and m2.text_c == 2.0
    np.testing.assert_allclose(m2.predict_proba(out), m.predict_proba(out), atol=1e-12)
    # a MoLAM without text features writes the same params as before the option existed, and loads
    plain = MoLAM(**FAST).fit(out, idx, y)
    d = plain.to_dict()
    assert not any(k.startswith("text_") for k in d["params"]) and "text_model" not in d["state"]
    (tmp_path / "plain.json").write_text(json.dumps(d))
    old = load_aggregator(tmp_path / "plain.json")
    assert old.text_model_ is None and old.text_features is None
    np.testing.assert_allclose(old.predict_proba(out), plain.predict_proba(out), atol=1e-12)
    # a file whose text model lost its encoder name is refused
    bad = m.to_dict()
    del bad["params"]["text_features"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(MoLAMError, match="text"):
        load_aggregator(tmp_path / "bad.json")


def test_hashed_ngrams_roundtrip(pool, fake_encoder, tmp_path):
    """text_ngrams: hashed word n-grams next to the embeddings (stateless, so a saved model needs no vocabulary)."""
    out, gold = pool
    idx, y = _seeds(gold)
    m = MoLAM(text_features="minilm", text_ngrams=256, text_rounds=2, **FAST).fit(out, idx, y)
    assert m.text_model_.models_[0]["coef"].shape == (out.n_classes, DIM + 256)
    p = m.predict_proba(out)
    np.testing.assert_allclose(p.sum(1), 1.0)
    m2 = load_aggregator(m.save(tmp_path / "ng.json"))
    assert m2.text_ngrams == 256
    np.testing.assert_allclose(m2.predict_proba(out), p, atol=1e-12)
    rows = np.array([1, 2, 3])
    np.testing.assert_allclose(m2.predict_proba(out.subset(rows)), p[rows], atol=1e-12)


def test_errors(pool, fake_encoder):
    out, gold = pool
    idx, y = _seeds(gold)
    no_text = LLMOutputs(out.probs, out.consistency, out.class_names, out.llm_names)
    with pytest.raises(MoLAMError, match="texts"):
        MoLAM(text_features="minilm", **FAST).fit(no_text, idx, y)
    m = MoLAM(text_features="minilm", **FAST).fit(out, idx, y)
    with pytest.raises(MoLAMError, match="texts"):
        m.predict_proba(no_text)
    for kw in ({"text_features": ""}, {"text_features": 3}, {"text_weight": -1}, {"text_c": 0},
               {"text_folds": 1}, {"text_seed_weight": 0}, {"text_rounds": 0}, {"text_ngrams": -1}, {"text_max_length": 2}):
        with pytest.raises(MoLAMError, match=next(iter(kw))):  # checked by fit (scikit-learn's convention)
            MoLAM(**kw).fit(out, idx, y)


def test_real_minilm_small_pool(trec_outputs, trec_gold):
    """The bundled MiniLM end to end on 300 TREC rows (a few seconds): embeds once, cached for predict."""
    rows = np.random.default_rng(3).choice(trec_outputs.n_items, 300, replace=False)
    out, gold = trec_outputs.subset(rows), trec_gold[rows]
    idx, y = _seeds(gold, n=30)
    m = MoLAM(text_features="minilm", **FAST).fit(out, idx, y)
    p = m.predict_proba(out)
    np.testing.assert_allclose(p.sum(1), 1.0)
    rest = np.setdiff1d(np.arange(len(gold)), idx)
    assert (p.argmax(1)[rest] == gold[rest]).mean() > 0.6
    emb = molam_mod.embed_texts_cached(out.texts[:3])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb.shape == (3, 384)
