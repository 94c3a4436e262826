"""Jobs through a real Redis + RQ: the server only queues, ``molal worker`` runs the same job function.

Needs the ``redis-server`` binary (``apt-get install -y redis-server``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molal.config import get_settings

REPO = Path(__file__).resolve().parent.parent
TREC = ["abbreviation", "entity", "description", "human", "location", "numeric"]
CONFIG = (
    '<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single">'
    + "".join(f'<Choice value="{c}"/>' for c in TREC)
    + "</Choices></View>"
)


@pytest.fixture()
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from redis import Redis

    url = f"redis://127.0.0.1:{port}/0"
    t0 = time.monotonic()
    while True:
        try:
            if Redis.from_url(url).ping():
                break
        except Exception:
            if time.monotonic() - t0 > 10:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


def test_jobs_go_to_rq_and_molal_worker_runs_them(tmp_path, redis_url):
    from redis import Redis
    from rq import Queue

    from backend.app import create_app
    from molal.resources import asset_path

    model_dir = tmp_path / "state"
    settings = get_settings(model_dir=model_dir, redis_url=redis_url)
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
               LABEL_STUDIO_API_KEY="")
    proc = subprocess.run([sys.executable, "-m", "molal.cli.main", "worker", "--burst"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = svc.jobs.get(job_id)
    assert done["status"] == "succeeded", done
    assert done["result"]["done"] == 6 and done["pid"] != os.getpid()
    failed = svc.jobs.get(train_id)
    assert failed["status"] == "failed" and "LABEL_STUDIO_URL" in failed["message"]
    again = svc.predict({"project": "5.1", "tasks": tasks, "label_config": CONFIG}, budget_s=0.0)
    assert again["pending"] == 0 and all(again["results"])


def test_worker_without_redis_url_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.run([sys.executable, "-m", "molal.cli.main", "worker", "--model-dir", str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "REDIS_URL is not set" in proc.stderr
