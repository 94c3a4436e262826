"""AnnotationCache: hit/miss, permissions, concurrent writers, crash (SIGKILL) and resume."""

from __future__ import annotations

import multiprocessing as mp
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from molal.cache import AnnotationCache, CacheError, identity_key, text_key
from tests.harness import sigkill_when

IDENT = {"type": "test", "model": "m", "template": "t"}


def test_put_get_roundtrip_and_miss(state_db) -> None:
    c = AnnotationCache(state_db.target("c"))
    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    cons = np.array([[0.1, 0.9], [1.0, 0.0]])
    assert c.put_many(IDENT, ["a", "b"], p, cons) == 2
    got = c.get_many(IDENT, ["b", "zzz", "a", "b"])
    assert got[1] is None
    np.testing.assert_array_equal(got[0][0], p[1])
    np.testing.assert_array_equal(got[0][1], cons[1])
    np.testing.assert_array_equal(got[2][0], p[0])
    np.testing.assert_array_equal(got[3][0], p[1])
    # another identity (even one field different) misses
    assert c.get_many({**IDENT, "template": "u"}, ["a"]) == [None]
    # probabilities without consistency
    c.put(IDENT | {"x": 1}, "q", np.array([0.5, 0.5]))
    probs, cons2 = c.get(IDENT | {"x": 1}, "q")
    assert cons2 is None and probs.tolist() == [0.5, 0.5]
    # wrong number of classes is a miss, not a wrong answer
    assert c.get_many(IDENT, ["a"], n_classes=3) == [None]
    assert c.count() == 3 and c.count(IDENT) == 2
    assert IDENT in c.identities()
    c.close()


def test_keys_are_sha256() -> None:
    assert len(identity_key(IDENT)) == 64 and identity_key(IDENT) == identity_key(dict(reversed(list(IDENT.items()))))
    assert text_key("a b") != text_key("a  b")  # the exact text keys the cache


def test_refuses_failed_rows(state_db) -> None:
    c = AnnotationCache(state_db.target("c"))
    with pytest.raises(ValueError, match="non-finite"):
        c.put_many(IDENT, ["a"], np.array([[np.nan, np.nan]]))
    assert c.count() == 0


def test_owner_only_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.sqlite"
    c = AnnotationCache(path)
    c.put(IDENT, "a", np.array([1.0, 0.0]))
    for p in [path, Path(str(path) + "-wal"), Path(str(path) + "-shm")]:
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    c.close()


def test_not_a_cache_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CacheError, match="bad.sqlite"):
        AnnotationCache(bad).get_many(IDENT, ["a"])


def _writer(path: str, worker: int, n: int) -> None:
    c = AnnotationCache(path, timeout=30)
    for i in range(n):
        texts = [f"text {worker}-{i}", f"shared {i}"]
        p = np.array([[worker, i + 1.0], [1.0, float(i)]])
        c.put_many(IDENT, texts, p / p.sum(axis=1, keepdims=True))
    c.close()


def test_concurrent_writers_processes(state_db) -> None:
    path = str(state_db.target("c"))
    AnnotationCache(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    c = AnnotationCache(path)
    assert c.count(IDENT) == 4 * 40 + 40
    got = c.get_many(IDENT, [f"text {w}-{i}" for w in range(4) for i in range(40)])
    for (w, i), g in zip([(w, i) for w in range(4) for i in range(40)], got, strict=True):
        want = np.array([w, i + 1.0])
        np.testing.assert_allclose(g[0], want / want.sum())


def test_concurrent_writers_threads(state_db) -> None:
    import threading

    c = AnnotationCache(state_db.target("c"))
    errors = []

    def work(w: int) -> None:
        try:
            for i in range(30):
                c.put_many(IDENT, [f"t{w}-{i}"], np.array([[0.5, 0.5]]))
                assert c.get(IDENT, f"t{w}-{i}") is not None
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and c.count() == 180


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    from molal.annotators import Mixture
    from molal.annotators.embedding import EmbeddingAnnotator
    from molal.cache import AnnotationCache
    import torch
    torch.set_num_threads(1)
    texts = [l.rstrip("\\n") for l in open(sys.argv[1])]
    target = sys.stdin.readline().strip()  # not in argv: a database URL's password stays out of `ps`
    mix = Mixture([EmbeddingAnnotator("e1", batch_size=2), EmbeddingAnnotator("e2", templates=["{label}"], batch_size=2)])
    mix.annotate(texts, ["location", "human", "numeric"], cache=AnnotationCache(target))
    print("FINISHED")
    """
)


@pytest.mark.slow
def test_crash_mid_run_keeps_work_and_resumes(tmp_path: Path, state_db) -> None:
    import torch

    from molal.annotators import Mixture
    from molal.annotators.embedding import EmbeddingAnnotator

    torch.set_num_threads(1)
    texts = [f"Where is city number {i} located ?" for i in range(300)]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    script = tmp_path / "run.py"
    script.write_text(CRASH_SCRIPT)
    db = state_db.target("c")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "texts.txt")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    proc.stdin.write(f"{db}\n")
    proc.stdin.flush()
    sigkill_when(proc, lambda: AnnotationCache(db).count() if state_db.url is not None or Path(db).exists() else 0,
                 10, 120)
    cache = AnnotationCache(db)
    kept = cache.count()
    assert 10 <= kept < 2 * len(texts), kept
    mix = Mixture([EmbeddingAnnotator("e1", batch_size=2), EmbeddingAnnotator("e2", templates=["{label}"], batch_size=2)])
    res = mix.annotate(texts, ["location", "human", "numeric"], cache=cache)
    assert res.stats["cache_hits"] == kept
    assert res.stats["annotated"] == 2 * len(texts) - kept  # only the rest went to the model
    assert len(res.done_idx) == len(texts) and not res.failed
    assert cache.count() == 2 * len(texts)
