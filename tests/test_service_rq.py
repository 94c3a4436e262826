"""Jobs through a real Redis + RQ: the server only queues, ``molal worker`` runs the same job function.

Needs the ``redis-server`` binary (``apt-get install -y redis-server``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from molal.config import get_settings
from tests.conftest import TREC_CLASSES, TREC_CONFIG

REPO = Path(__file__).resolve().parent.parent
TREC = TREC_CLASSES
CONFIG = TREC_CONFIG



def test_jobs_go_to_rq_and_molal_worker_runs_them(tmp_path, redis_url, state_db):
    """The web process only queues; two ``molal worker`` processes run the jobs. With PostgreSQL
    (``MOLAL_DATABASE_URL``) they share nothing but the database, Redis and the model volume: no SQLite file
    is created anywhere under MODEL_DIR, so the processes could run on different hosts."""
    from redis import Redis
    from rq import Queue

    from backend.app import create_app
    from molal.resources import asset_path

    model_dir = tmp_path / "state"
    settings = get_settings(model_dir=model_dir, redis_url=redis_url, database_url=state_db.url)
    app = create_app(settings)  # with REDIS_URL no worker thread starts
    svc = app.config["MOLAL_SERVICE"]
    assert svc.worker is None
    with open(asset_path("trec.jsonl")) as fh:
        rows = [json.loads(line) for _, line in zip(range(6), fh, strict=False)]
    tasks = [{"id": i, "data": {"text": r["text"]}} for i, r in enumerate(rows)]
    out = svc.predict({"project": "5.1", "tasks": tasks, "label_config": CONFIG}, budget_s=0.0)
    assert out["pending"] == 6
    job_id = out["background_job"]
    q = Queue("molal", connection=Redis.from_url(redis_url))
    assert q.count == 1
    # START_TRAINING is queued too (it will fail in the worker: no Label Studio here — a clear message)
    r = app.test_client().post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
    assert r.status_code == 201
    train_id = r.json["job"]
    assert q.count == 2
    env = dict(os.environ, MODEL_DIR=str(model_dir), REDIS_URL=redis_url, LABEL_STUDIO_URL="",
               LABEL_STUDIO_API_KEY="", MOLAL_DATABASE_URL=state_db.url or "")
    workers = [subprocess.Popen([sys.executable, "-m", "molal.cli.main", "worker", "--burst"], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in workers:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        if state_db.url:
            assert state_db.url.split("@")[0].split(":")[-1] not in err  # the password is never printed
    done = svc.jobs.get(job_id)
    assert done["status"] == "succeeded", done
    assert done["result"]["done"] == 6 and done["pid"] != os.getpid()
    failed = svc.jobs.get(train_id)
    assert failed["status"] == "failed" and "LABEL_STUDIO_URL" in failed["message"]
    again = svc.predict({"project": "5.1", "tasks": tasks, "label_config": CONFIG}, budget_s=0.0)
    assert again["pending"] == 0 and all(again["results"])
    dbs = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*.db"))
    assert dbs == ([] if state_db.url else ["cache.db", "jobs.db", "projects/5/state.db"])


def test_worker_without_redis_url_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.run([sys.executable, "-m", "molal.cli.main", "worker", "--model-dir", str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "REDIS_URL is not set" in proc.stderr
