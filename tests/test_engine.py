"""The distributed annotation engine (Ray Data, molal.annotators.engine), run for real: a local Ray cluster
started by ``molal annotate --engine ray`` in its own process, the offline embedding scorers, the annotation
cache in SQLite and in a real PostgreSQL.

A machine without Ray skips these, unless ``MOLAL_REQUIRE_RAY=1`` (CI sets it, so there they fail instead).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from molal.data import LLMOutputs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
CLASSES = "location,human,numeric"


@pytest.fixture(autouse=True)
def _need_ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        if os.environ.get("MOLAL_REQUIRE_RAY") == "1":
            pytest.fail("Ray Data is not installed: pip install 'molal[ray]' (MOLAL_REQUIRE_RAY=1)")
        pytest.skip("Ray Data is not installed: pip install 'molal[ray]'")


def _pool(path: Path, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"Where is city number {i} located ?"}) + "\n")
    return path


def _env(db_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    env.pop("MOLAL_DATABASE_URL", None)
    if db_url:
        env["MOLAL_DATABASE_URL"] = db_url  # the default cache: not in argv, so the password stays out of `ps`
    return env


def _annotate(tmp_path: Path, pool: Path, out: str, *extra: str, db_url: str | None = None,
              timeout: float = 400) -> dict:
    cmd = [sys.executable, "-m", "molal.cli.main", "annotate", "--data", str(pool), "--out", str(tmp_path / out),
           "--labels", CLASSES, "--no-progress", *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(db_url), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if db_url:
        assert db_url.split("@")[0].rsplit(":", 1)[-1] not in proc.stderr + proc.stdout
    return json.loads((tmp_path / (out + ".stats.json")).read_text())


def test_the_engine_gives_what_the_process_gives_and_reuses_the_cache(tmp_path, state_db):
    pool = _pool(tmp_path / "pool.jsonl", 600)
    cache = [] if state_db.url else ["--cache", str(tmp_path / "cache.db")]
    ray = _annotate(tmp_path, pool, "ray.npz", "--engine", "ray", "--workers", "2", "--shard-size", "100", *cache,
                    db_url=state_db.url)
    assert ray["engine"] == "ray" and ray["shards"] >= 6 and ray["done"] == 600 and ray["failed"] == {}
    assert ray["cache_hits"] == 0 and ray["annotated"] == ray["cache_misses"] == 600 * 4
    assert 1 <= len(ray["worker_pids"]) <= 2
    # per annotator: the driver's misses, the shards' own work (summed over the workers)
    assert len(ray["per_annotator"]) == 4
    for per in ray["per_annotator"].values():
        assert per["cache_misses"] == per["annotated"] == 600 and per["cache_hits"] == 0 and per["seconds"] > 0
    local = _annotate(tmp_path, pool, "local.npz", "--no-cache")
    a, b = LLMOutputs.load(tmp_path / "ray.npz"), LLMOutputs.load(tmp_path / "local.npz")
    assert a.texts == b.texts and a.llm_names == b.llm_names
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    assert local["annotated"] == 600 * 4
    # everything is cached now: the second run sends nothing anywhere and starts no cluster
    again = _annotate(tmp_path, pool, "again.npz", "--engine", "ray", *cache, db_url=state_db.url)
    assert again["cache_hits"] == 600 * 4 and again["annotated"] == 0 and again["shards"] == 0
    assert all(p["cache_hits"] == 600 and p["annotated"] == 0 for p in again["per_annotator"].values())
    np.testing.assert_array_equal(LLMOutputs.load(tmp_path / "again.npz").probs, a.probs)


def _count(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_a_killed_run_resumes_and_annotates_nothing_twice(tmp_path):
    n = 3000
    pool = _pool(tmp_path / "pool.jsonl", n)
    db = tmp_path / "cache.db"
    cmd = [sys.executable, "-m", "molal.cli.main", "annotate", "--data", str(pool), "--out", str(tmp_path / "x.npz"),
           "--labels", CLASSES, "--no-progress", "--engine", "ray", "--workers", "2", "--shard-size", "20",
           "--cache", str(db)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while _count(db) < 80:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no annotation reached the cache in 300 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies; Ray's reaper takes its cluster down with it
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the actors may finish the shard they hold before they go: wait until the cache stops growing
    kept, t0 = _count(db), time.monotonic()
    while time.monotonic() - t0 < 60:
        time.sleep(3)
        now = _count(db)
        if now == kept:
            break
        kept = now
    assert 80 <= kept < n * 4, kept
    st = _annotate(tmp_path, pool, "resumed.npz", "--engine", "ray", "--workers", "2", "--shard-size", "200",
                   "--cache", str(db))
    assert st["cache_hits"] == kept  # what the killed run committed is used ...
    assert st["annotated"] == n * 4 - kept  # ... and only the rest went to the models
    assert st["done"] == n and st["failed"] == {} and _count(db) == n * 4


def test_bad_engine_options_are_clear_errors(tmp_path):
    pool = _pool(tmp_path / "pool.jsonl", 3)
    base = [sys.executable, "-m", "molal.cli.main", "annotate", "--data", str(pool), "--out", str(tmp_path / "x.npz"),
            "--labels", CLASSES]
    for extra, words in [(["--engine", "spark"], "--engine must be 'local' or 'ray'"),
                         (["--engine", "ray", "--no-cache"], "writes through the annotation cache")]:
        proc = subprocess.run(base + extra, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-1000:]


_JOB_SCRIPT = r"""
import json, sys
from molal.config import get_settings
from molal.service.jobs import execute
from molal.service.pipeline import Service

model_dir, n = sys.argv[1], int(sys.argv[2])
svc = Service(get_settings(model_dir=model_dir, engine="ray", engine_min_texts=100, ray_workers=1))
svc.store.project(5)
texts = [f"Where is city number {i} located ?" for i in range(n)]
svc.jobs.enqueue(5, "annotate", {"texts": texts, "classes": ["location", "human", "numeric"]})
row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
print(json.dumps({"status": row["status"], "result": row["result"], "message": row["message"],
                  "cached": svc.cache.count()}))
"""


def test_the_annotate_job_runs_on_the_engine_when_configured(tmp_path):
    """MOLAL_ENGINE=ray: the backend's annotate job (and the training job's annotation) goes through Ray for
    pools of at least MOLAL_ENGINE_MIN_TEXTS texts, into the service's own cache."""
    out = {}
    for n in (50, 300):  # below the threshold: in the job's process; above: on Ray
        proc = subprocess.run([sys.executable, "-c", _JOB_SCRIPT, str(tmp_path / "state"), str(n)], cwd=tmp_path,
                              env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out[n]["status"] == "succeeded", out[n]
        assert out[n]["result"]["done"] == n and out[n]["cached"] == n * 4
    assert out[50]["result"]["engine"] == "local" and out[300]["result"]["engine"] == "ray"
    # the second job found the first one's 50 texts in the cache and sent only the other 250 to the actors
    assert out[300]["result"]["cache_hits"] == 50 * 4 and out[300]["result"]["annotated"] == 250 * 4
