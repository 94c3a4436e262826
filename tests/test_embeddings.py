"""molal.embeddings: one way to embed text, computed once (memory, then the store beside the annotation cache).

The store's fault tests follow tests/test_cache.py: SQLite and a real PostgreSQL, a writer SIGKILLed mid-run, a
corrupt row (computed again, never a crash or a wrong vector), a file that is not a database. The last test
counts every BERT forward pass in four processes: the scorers, the student and MoLAM's text model never embed
the same text twice for the same model and max length.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from molal import embeddings as E
from tests.harness import sigkill_when
from tests.test_student import make_tiny_encoder

SHORT = ["Where is Paris ?", "Who wrote Hamlet ?", "How tall is Everest ?", "What is a quark ?"]
LONG = [" ".join(["the committee met on tuesday to discuss the annual budget of the city council"] * 4)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_encoder(tmp_path_factory.mktemp("tiny-bert-emb")))


@pytest.fixture(autouse=True)
def _fresh():
    """Each test starts with an empty process memory, no store and zeroed counters."""
    E.MEMORY.clear()
    E.use_store(None)
    for k in E.STATS:
        E.STATS[k] = 0
    yield
    E.MEMORY.clear()
    E.use_store(None)


def _plain(texts: list[str], model: str, max_length: int) -> np.ndarray:
    """The reference: a plain transformers forward, mean pooling over the attention mask (no sorting)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from molal.resources import resolve_model_path

    path = resolve_model_path(model)
    tok, mdl = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            b = tok([t], truncation=True, max_length=max_length, return_tensors="pt")
            h = mdl(**b).last_hidden_state
            out.append(h.mean(1)[0].numpy())
    return np.stack(out)


def test_embed_matches_a_plain_forward_pass_and_counts_tokens(tiny) -> None:
    texts = SHORT + LONG + SHORT[:1]
    emb, n_tok = E.embed(texts, tiny, max_length=16, normalize=False, batch_size=2)
    np.testing.assert_allclose(emb, _plain(texts, tiny, 16), atol=1e-5)
    want_tokens = sum(min(len(E.encoder(tiny).tokenizer(t)["input_ids"]), 16) for t in dict.fromkeys(texts))
    assert n_tok == want_tokens and E.STATS["encoded"] == len(set(texts))
    unit, again = E.embed(texts, tiny, max_length=16)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit, emb / np.linalg.norm(emb, axis=1, keepdims=True), atol=1e-6)
    assert again == 0 and E.STATS["encoded"] == len(set(texts))  # all from memory
    assert E.embed([], tiny)[0].shape == (0, 32)


def test_whole_texts_serve_every_max_length_they_fit_truncated_ones_only_theirs(tiny) -> None:
    E.embed(SHORT + LONG, tiny, max_length=64)
    assert E.STATS["encoded"] == 5
    emb, _ = E.embed(SHORT + LONG, tiny, max_length=16, normalize=False)
    assert E.STATS["encoded"] == 6  # the short ones (under 16 tokens) were whole texts: only the long one again
    np.testing.assert_allclose(emb, _plain(SHORT + LONG, tiny, 16), atol=1e-5)
    E.embed(LONG, tiny, max_length=64)
    assert E.STATS["encoded"] == 6  # its 64-token cut is still there


def test_deadline_between_slices_keeps_what_was_done(tiny) -> None:
    with pytest.raises(E.EmbeddingDeadline):
        E.embed(SHORT, tiny, deadline=time.monotonic() - 1)
    assert E.STATS["encoded"] == 0


def test_bad_encoder_and_quantization_are_clear_errors(monkeypatch, tmp_path) -> None:
    with pytest.raises(E.EncoderError, match="cannot load the encoder"):
        E.embed(["x"], str(tmp_path / "nothing"))
    monkeypatch.setenv("MOLAL_ENCODER_QUANTIZE", "int4")
    with pytest.raises(E.EncoderError, match="MOLAL_ENCODER_QUANTIZE"):
        E.quantization()


def test_int8_is_another_space_and_another_annotation_identity(tiny, monkeypatch) -> None:
    fp32 = E.encoder(tiny).space
    base = E.model_fingerprint(tiny)
    monkeypatch.setenv("MOLAL_ENCODER_QUANTIZE", "int8")
    q = E.encoder(tiny)
    assert q.space != fp32 and q.quantize == "int8"
    assert E.model_fingerprint(tiny) == {**base, "quantize": "int8"}
    emb, _ = E.embed(SHORT, tiny, max_length=16)
    ref = _plain(SHORT, tiny, 16)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert (emb * ref).sum(1).min() > 0.9  # close to the float model, not equal


# -- the store ------------------------------------------------------------------------------------------------
def test_store_survives_a_restart_and_is_shared(tiny, state_db) -> None:
    target = str(state_db.target("cache"))
    E.use_store(target)
    a, _ = E.embed(SHORT + LONG, tiny, max_length=16)
    assert E.STATS["encoded"] == 5 and E.current_store().count() == 5
    E.MEMORY.clear()  # "a restart": nothing in memory, the same database
    E.use_store(None)
    E.use_store(target)
    b, n_tok = E.embed(SHORT + LONG, tiny, max_length=16)
    np.testing.assert_array_equal(a, b)
    assert n_tok == 0 and E.STATS["encoded"] == 5 and E.STATS["store_hits"] == 5
    E.MEMORY.clear()
    E.embed(SHORT, tiny, max_length=32)  # whole texts serve a longer max length too
    assert E.STATS["encoded"] == 5


def test_store_beside_the_annotation_cache_in_one_sqlite_file(tiny, tmp_path) -> None:
    from molal.cache import AnnotationCache

    path = tmp_path / "cache.db"
    cache = AnnotationCache(path)
    cache.put_many("ident", ["a"], np.array([[0.5, 0.5]]))
    E.use_store(path)
    E.embed(SHORT, tiny, max_length=16)
    assert cache.count() == 1 and E.current_store().count() == 4
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def _corrupt(store: E.EmbeddingStore, sql: str, params=()) -> None:
    db = store.db()
    db.execute(sql, params)


@pytest.mark.parametrize("how", ["flipped byte", "short vector", "bad crc", "nan"])
def test_a_corrupt_row_is_computed_again_never_a_wrong_vector(tiny, state_db, how) -> None:
    target = str(state_db.target("cache"))
    store = E.use_store(target)
    good, _ = E.embed(SHORT, tiny, max_length=16, normalize=False)
    th = E._text_hash(SHORT[0])
    row = store.db().execute("SELECT vec, crc FROM embeddings WHERE text_hash=?", (th,)).fetchone()
    vec, crc = bytearray(bytes(row[0])), int(row[1])
    if how == "flipped byte":
        vec[5] ^= 0x10
        _corrupt(store, "UPDATE embeddings SET vec=? WHERE text_hash=?", (bytes(vec), th))
    elif how == "short vector":
        _corrupt(store, "UPDATE embeddings SET vec=? WHERE text_hash=?", (bytes(vec[:-4]), th))
    elif how == "bad crc":
        _corrupt(store, "UPDATE embeddings SET crc=? WHERE text_hash=?", (crc ^ 1, th))
    else:
        bad = np.frombuffer(bytes(vec), np.float32).copy()
        bad[0] = np.nan
        blob = bad.tobytes()
        _corrupt(store, "UPDATE embeddings SET vec=?, crc=? WHERE text_hash=?",
                 (blob, E._crc(E.encoder(tiny).space, th, 0, int(store.db().execute(
                     "SELECT n_tokens FROM embeddings WHERE text_hash=?", (th,)).fetchone()[0]), blob), th))
    E.MEMORY.clear()
    got, n_tok = E.embed(SHORT, tiny, max_length=16, normalize=False)
    np.testing.assert_allclose(got, good, atol=1e-6)
    assert E.STATS["encoded"] == 5 and n_tok > 0  # only the corrupt one again
    E.MEMORY.clear()
    E.embed(SHORT, tiny, max_length=16)
    assert E.STATS["encoded"] == 5  # and it was overwritten with a good row


def test_a_file_that_is_not_a_database_means_computing_not_crashing(tiny, tmp_path, caplog) -> None:
    bad = tmp_path / "cache.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    E.use_store(bad)
    with caplog.at_level(logging.WARNING, logger="molal.embeddings"):
        emb, _ = E.embed(SHORT, tiny, max_length=16, normalize=False)
        E.MEMORY.clear()
        E.embed(SHORT, tiny, max_length=16, normalize=False)
    np.testing.assert_allclose(emb, _plain(SHORT, tiny, 16), atol=1e-5)
    assert "embedding store" in caplog.text and "computing instead" in caplog.text
    assert caplog.text.count("embedding store") <= 2  # said once per kind of failure, not per text


def test_the_store_is_bounded_least_recently_used_first(tiny, state_db) -> None:
    store = E.use_store(str(state_db.target("cache")), max_mb=20 * (4 * 32 + E._ROW_OVERHEAD) / 2**20)
    assert store.max_rows(32) == 20
    texts = [f"text number {i}" for i in range(30)]
    E.embed(texts[:10], tiny, max_length=16)
    db = store.db()
    db.execute("UPDATE embeddings SET used=used-100000")  # the first ten are old
    E.embed(texts[10:30], tiny, max_length=16)
    n = store.count()
    assert n <= 20, n
    kept = {r[0] for r in db.execute("SELECT text_hash FROM embeddings")}
    assert not kept & {E._text_hash(t) for t in texts[:10]}  # the old ones went first
    E.use_store(str(state_db.target("cache")), max_mb=0)
    assert E.current_store() is None  # 0 = off


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from molal import embeddings as E
    target = sys.stdin.readline().strip()  # not in argv: a database URL's password stays out of `ps`
    E.use_store(target)
    texts = [f"sentence {i} about the weather in a city far away" for i in range(5000)]
    E.embed(texts, sys.argv[1], max_length=16, batch_size=4)
    print("FINISHED")
    """
)


@pytest.mark.slow
def test_a_writer_killed_mid_run_keeps_what_it_committed_and_the_rest_is_computed(tiny, state_db, tmp_path) -> None:
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    target = str(state_db.target("cache"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, str(script), tiny], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    proc.stdin.write(f"{target}\n")
    proc.stdin.flush()
    sigkill_when(proc, E.EmbeddingStore(target).count, 64, 180)
    E.use_store(target)
    kept = E.current_store().count()
    assert 64 <= kept < 5000 and kept % 32 == 0, kept  # whole slices (8 batches of 4), never half of one
    texts = [f"sentence {i} about the weather in a city far away" for i in range(5000)]
    emb, _ = E.embed(texts[:300], tiny, max_length=16, normalize=False, batch_size=64)
    np.testing.assert_allclose(emb[:3], _plain(texts[:3], tiny, 16), atol=1e-5)
    E.embed(texts, tiny, max_length=16, batch_size=64)
    assert E.STATS["store_hits"] == kept and E.STATS["encoded"] == 5000 - kept


# -- never the same text twice, across processes -------------------------------------------------------------
COUNT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import transformers.models.bert.modeling_bert as mb

    seen = []  # every row any BERT in this process encodes: its unpadded token ids
    _forward = mb.BertModel.forward

    def forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            seen.append([t for t, m in zip(row, mask) if m])
        return _forward(self, input_ids, attention_mask, *args, **kwargs)

    mb.BertModel.forward = forward
    import torch
    torch.set_num_threads(1)
    from molal import embeddings as E

    mode, data = sys.argv[1], json.loads(open(sys.argv[2]).read())
    target = sys.stdin.readline().strip()
    E.use_store(target)
    texts, classes = data["texts"], data["classes"]
    if mode == "scorers":
        from molal.annotators import Mixture
        from molal.annotators.embedding import EmbeddingAnnotator
        from molal.cache import AnnotationCache
        mix = Mixture([EmbeddingAnnotator("e1"), EmbeddingAnnotator("e2", templates=["{label}"])])
        res = mix.annotate(texts, classes, cache=AnnotationCache(target))
        assert len(res.done_idx) == len(texts)
    elif mode == "student":
        from molal.student import Student
        st = Student(classes, max_length=128, freeze_encoder=True, epochs=2, device="cpu")
        st.fit(texts, data["labels"], progress=False)
        st.predict_proba(texts)
        st.embed(texts)  # what coreset / badge read
    elif mode == "text_model":
        from molal.aggregation.text_model import TextModel
        TextModel(max_length=64).inputs(texts)
    print(json.dumps({"rows": seen, "stats": E.stats()}))
    """
)


@pytest.mark.slow
def test_scorers_student_and_text_model_never_embed_a_text_twice_across_processes(tmp_path, shared_data) -> None:
    rows = [json.loads(x) for x in (shared_data / "trec" / "train.jsonl").read_text().splitlines()[:40]]
    news = [json.loads(x)["text"] for x in (shared_data / "ag_news" / "train.jsonl").read_text().splitlines()[:200]]
    long = [t for t in news if len(E.encoder("minilm").tokenizer(t)["input_ids"]) > 70][:5]
    assert len(long) == 5
    texts = [r["text"] for r in rows] + long
    classes = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    labels = [i % len(classes) for i in range(len(texts))]
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"texts": texts, "classes": classes, "labels": labels}))
    script = tmp_path / "count.py"
    script.write_text(COUNT_SCRIPT)
    db = tmp_path / "cache.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "MOLAL_ENCODER_QUANTIZE": "none"}

    def run(mode: str) -> dict:
        r = subprocess.run([sys.executable, str(script), mode, str(data)], input=f"{db}\n", capture_output=True,
                           text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    tok = E.encoder("minilm").tokenizer
    prompts = 2 * len(classes)  # e1's "This text is about {label}." and e2's "{label}"
    scorers = run("scorers")
    assert len(scorers["rows"]) == len(texts) + prompts and scorers["stats"]["encoded"] == len(texts) + prompts
    student = run("student")
    assert student["rows"] == [] and student["stats"]["store_hits"] == len(texts)  # max length 128, as the scorers
    text_model = run("text_model")  # max length 64: every text under 64 tokens was stored whole
    assert len(text_model["rows"]) == len(long) == text_model["stats"]["encoded"]
    assert all(len(r) == 64 for r in text_model["rows"])
    again = [run("text_model"), run("student"), run("scorers")]
    assert all(r["rows"] == [] for r in again)
    every = [tuple(r) for p in (scorers, student, text_model, *again) for r in p["rows"]]
    assert len(every) == len(set(every)), "a text was embedded twice for the same model and max length"
    assert {tuple(tok(t, truncation=True, max_length=128)["input_ids"]) for t in texts} <= set(every)
