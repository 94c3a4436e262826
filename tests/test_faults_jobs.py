"""Job faults for real: concurrent training requests on 2 gunicorn workers with a real Redis + RQ worker that
is SIGKILLed mid-job and restarted; a training process SIGKILLed mid-way; atomic artifact writes under
SIGKILL. Expected: exactly one job per project runs at a time, no "database is locked" surfaces, the
previous model keeps serving, no half-written file is ever loaded, the next job starts cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from molal.config import get_settings
from tests.conftest import TREC_CLASSES, TREC_CONFIG
from tests.harness import JSONServer, kill_group, start_gunicorn, stop_gunicorn

REPO = Path(__file__).resolve().parent.parent
TREC = TREC_CLASSES
CONFIG = TREC_CONFIG
KEY = "jobs-fault-key-0123456789"



class SlowLS(JSONServer):
    """A fake Label Studio whose project read takes ``delay`` seconds (a job stays 'running' meanwhile);
    its tasks have no text, so a training job fails soon after — what matters here is how jobs run."""

    def __init__(self, delay: float) -> None:
        self.hits: list[tuple[float, str]] = []
        self.delay = delay
        super().__init__()

    def respond(self, method, u, raw):
        if method != "GET":
            return 404, {"detail": f"not in the fake: {method} {u.path}"}
        self.hits.append((time.monotonic(), u.path))
        if re.fullmatch(r"/api/projects/\d+/?", u.path):
            time.sleep(self.delay)
            return 200, {"id": int(u.path.strip("/").split("/")[-1]), "label_config": CONFIG}
        return 200, {"tasks": [], "total": 0}


def test_concurrent_training_requests_two_gunicorn_workers_rq_worker_killed_and_restarted(tmp_path, redis_url):
    import httpx

    from molal.service.jobs import JobQueue

    ls = SlowLS(delay=4.0)
    model_dir = tmp_path / "state"
    env = {"REDIS_URL": redis_url, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": KEY}
    glog = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115
    proc, url = start_gunicorn(model_dir, env, log=glog)
    jobs = JobQueue(model_dir / "jobs.db")
    overlap: list = []
    stop = threading.Event()
    sampler_errors: list[str] = []

    def sample():  # one job per project at any time, read the table as fast as it can
        while not stop.is_set():
            try:
                rows = jobs.db.execute("SELECT project, COUNT(*) AS n FROM jobs WHERE status='running' "
                                       "GROUP BY project").fetchall()
                overlap.extend((r["project"], r["n"]) for r in rows if r["n"] > 1)
            except Exception as exc:  # noqa: BLE001 - "database is locked" would land here
                sampler_errors.append(repr(exc))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    worker = None
    wlog = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    wenv = {**os.environ, "MODEL_DIR": str(model_dir), "PYTHONPATH": str(REPO), **env}
    try:
        sampler.start()
        for p in (7, 8):  # Label Studio registers a project (/setup, on Connect Model) before it can be trained
            r = httpx.post(url + "/setup", json={"project": p, "schema": TREC_CONFIG}, timeout=30)
            assert r.status_code == 200, r.text
        # 1. 2 projects x 12 simultaneous START_TRAINING (LS's button, retries, two tabs) over 2 workers
        answers: list[tuple[int, int, str]] = []
        barrier = threading.Barrier(24)

        def fire(pid: int):
            with httpx.Client(timeout=30) as c:
                barrier.wait()
                r = c.post(url + "/webhook", json={"action": "START_TRAINING", "project": {"id": pid}})
                answers.append((pid, r.status_code, r.json().get("job", r.text)))

        threads = [threading.Thread(target=fire, args=(p,)) for p in (7, 8) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 24 and all(s in (200, 201) for _, s, _ in answers), answers
        for p in (7, 8):
            mine = [a for a in answers if a[0] == p]
            assert sum(s == 201 for _, s, _ in mine) == 1, mine  # exactly one job created ...
            assert len({j for _, _, j in mine}) == 1, mine  # ... and every request points at it
        first = {p: next(j for q, _, j in answers if q == p) for p in (7, 8)}
        assert sorted(r["status"] for r in jobs.list()) == ["queued", "queued"]
        from redis import Redis
        from rq import Queue

        assert Queue("molal", connection=Redis.from_url(redis_url)).count == 2

        # 2. an RQ worker takes a job; SIGKILL it (and its work horse) while the job runs
        worker = subprocess.Popen([sys.executable, "-m", "molal.cli.main", "worker"], cwd=REPO, env=wenv,
                                  stdout=wlog, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic()
        # the job is inside its Label Studio calls (each takes 4 s); the web process's own call (it shows the
        # queued job in Label Studio) is not the job's
        while not ls.hits or not [r for r in jobs.list() if r["status"] == "running"]:
            assert time.monotonic() - t0 < 90, "no job reached Label Studio"
            time.sleep(0.05)
        running = [r for r in jobs.list() if r["status"] == "running"]
        assert len(running) == 1
        killed = running[0]
        kill_group(worker)  # the RQ worker ...
        worker = None
        assert killed["pid"] and killed["pid"] != os.getpid()
        os.kill(killed["pid"], signal.SIGKILL)  # ... and its work horse (RQ puts it in its own process group)
        time.sleep(0.2)
        t_kill = time.monotonic()
        assert jobs.get(killed["id"])["status"] == "running"  # nobody has noticed yet

        # 3. more requests while no worker runs: the killed project gets a fresh job, the other coalesces
        with httpx.Client(timeout=30) as c:
            r1 = c.post(url + "/webhook", json={"action": "START_TRAINING", "project": {"id": killed["project"]}})
            other = 15 - killed["project"]
            r2 = c.post(url + "/webhook", json={"action": "START_TRAINING", "project": {"id": other}})
        assert r1.status_code == 201 and r1.json()["job"] != killed["id"]
        assert r2.status_code == 200 and r2.json()["job"] == first[other]

        # 4. the worker restarts (burst): it reaps the dead job, then runs every queued job, one per project
        done = subprocess.run([sys.executable, "-m", "molal.cli.main", "worker", "--burst"], cwd=REPO, env=wenv,
                              stdout=wlog, stderr=subprocess.STDOUT, timeout=180)
        assert done.returncode == 0
        rows = {r["id"]: r for r in jobs.list()}
        assert len(rows) == 3, rows
        dead = rows[killed["id"]]
        assert dead["status"] == "failed" and "worker died" in dead["message"], dead
        for jid in (r1.json()["job"], first[other]):
            row = rows[jid]
            assert row["status"] in ("succeeded", "failed"), row
            assert row["started"] is not None and row["pid"] != killed["pid"]
            assert "locked" not in (row["error"] or ""), row["error"]
        # the restarted jobs really ran (each read its project from Label Studio after the kill)
        after = {p for t, p in ls.hits if t > t_kill and re.fullmatch(r"/api/projects/\d+/?", p)}
        assert after == {"/api/projects/7/", "/api/projects/8/"}, ls.hits
    finally:
        stop.set()
        sampler.join(5)
        if worker is not None:
            kill_group(worker)
        stop_gunicorn(proc)
        glog.close()
        wlog.close()
        ls.close()
    assert overlap == [], f"two jobs of one project ran at once: {overlap[:5]}"
    assert sampler_errors == []
    logs = (tmp_path / "gunicorn.log").read_text(errors="replace") + (tmp_path / "worker.log").read_text(
        errors="replace")
    assert "database is locked" not in logs
    assert KEY not in logs


# -- a training job SIGKILLed mid-way ------------------------------------------------------------------------------
_TRAIN = r"""
import json, sys
import numpy as np
from molal.config import get_settings
from molal.service.pipeline import Service
from molal.service.jobs import execute
from molal.service.labelconfig import parse_label_config
from molal.service.train import Pool, fit_round

model_dir, config, rows_path, student = sys.argv[1:5]
rows = [json.loads(l) for l in open(rows_path)]
spec = parse_label_config(config)
svc = Service(get_settings(model_dir=model_dir, student_epochs=2, student_max_length=32, device="cpu"))
state = svc.store.project(7)
state.set_setting("student", student == "1")
state.set_setting("molam_candidates", "lr_1,best_single")  # keep the test fast (CV over 2 candidates)
rng = np.random.default_rng(int(sys.argv[5]))
lab = rng.choice(len(rows), 40, replace=False)
pool = Pool(task_ids=list(range(len(rows))), texts=[r["text"] for r in rows], data=[{"text": r["text"]} for r in rows],
            human={int(i): spec.classes.index(rows[i]["label"]) for i in lab}, prediction_versions=[[] for _ in rows])
job = svc.jobs.claim()
execute(svc.jobs, job, lambda ctx: {"version": fit_round(svc, state, spec, pool, ctx, job_id=ctx.id).version})
print("DONE", flush=True)
"""


def _train(model_dir: Path, rows_path: Path, student: bool, seed: int, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _TRAIN, str(model_dir), CONFIG, str(rows_path), "1" if student
                             else "0", str(seed)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, **kw)


def test_training_job_sigkilled_midway_previous_model_keeps_serving(tmp_path):
    from backend.app import create_app
    from molal.resources import asset_path
    from molal.service.jobs import JobQueue

    with open(asset_path("trec.jsonl")) as fh:
        rows = [json.loads(line) for _, line in zip(range(120), fh, strict=False)]
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = tmp_path / "state"
    jobs = JobQueue(model_dir / "jobs.db")

    # round 1 (MoLAM only, fast) publishes the model that serves
    j1, _ = jobs.enqueue(7, "train")
    p = _train(model_dir, rows_path, False, 0, stdout=subprocess.PIPE, text=True)
    assert p.communicate(timeout=300)[0].strip().endswith("DONE")
    assert jobs.get(j1["id"])["status"] == "succeeded", jobs.get(j1["id"])["error"]
    settings = get_settings(model_dir=model_dir)
    app = create_app(settings, start_worker=False)
    c = app.test_client()
    tasks = [{"id": i, "data": {"text": rows[i]["text"]}} for i in range(5)]
    before = c.post("/predict", json={"project": 7, "label_config": CONFIG, "tasks": tasks}).json
    v1 = before["model_version"]
    assert v1.startswith("molam-1-"), before
    state = app.config["MOLAL_SERVICE"].store.project(7)
    ptr1 = state.current()

    # round 2 trains the student too (slow): SIGKILL it while it trains
    j2, _ = jobs.enqueue(7, "train")
    p = _train(model_dir, rows_path, True, 1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while "student" not in (jobs.get(j2["id"])["message"] or ""):
        assert p.poll() is None and time.monotonic() - t0 < 120, jobs.get(j2["id"])
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)

    # the previous model keeps serving; the half-trained one is nowhere near the pointer
    assert state.current() == ptr1
    again = c.post("/predict", json={"project": 7, "label_config": CONFIG, "tasks": tasks}).json
    assert again["model_version"] == v1 and again["results"] == before["results"]
    fresh = create_app(settings, start_worker=False).test_client()  # a new process loads it from disk
    assert fresh.post("/predict", json={"project": 7, "label_config": CONFIG, "tasks": tasks}).json["model_version"] == v1
    assert [d.name for d in state.models_dir.iterdir() if re.match(r"^\d+-[0-9a-f]{8}$", d.name)] == [ptr1["dir"]]
    # the next job starts cleanly: the dead one is reaped, the new one claims the project
    assert jobs.reap_stale() == 1 and jobs.get(j2["id"])["status"] == "failed"
    j3, created = jobs.enqueue(7, "train")
    assert created
    p = _train(model_dir, rows_path, False, 2, stdout=subprocess.PIPE, text=True)
    assert p.communicate(timeout=300)[0].strip().endswith("DONE")
    assert jobs.get(j3["id"])["status"] == "succeeded"
    assert state.current()["dir"] != ptr1["dir"] and state.current()["n"] == 2
    assert not list(state.models_dir.glob(".staging-*" + j3["id"]))


# -- atomic writes under SIGKILL -----------------------------------------------------------------------------------
_WRITER = r"""
import hashlib, os, sys
from molal.io import write_artifact
target = sys.argv[1]
i = 0
print("go", flush=True)
while True:
    i += 1
    data = hashlib.sha256(str(i).encode()).digest() * (4096 * (1 + i % 8))  # 128 KB .. 1 MB, content varies
    write_artifact(target, data)
"""


def test_artifact_writes_killed_at_random_points_never_leave_a_half_written_file(tmp_path):
    import random

    from molal.io import ArtifactError, verify_artifact

    target = tmp_path / "model.bin"
    rng = random.Random(0)
    refused = 0
    for _ in range(12):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.stdout.readline().strip() == "go"
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        # the file is always a complete write (its length is a whole number of 128 KB blocks) ...
        data = target.read_bytes()
        assert len(data) % (32 * 4096) == 0 and len(data) > 0
        assert data == data[:32] * (len(data) // 32)
        # ... and the checksum either matches or the reader refuses it (killed between data and sidecar)
        try:
            assert verify_artifact(target) == data
        except ArtifactError:
            refused += 1
        assert oct(target.stat().st_mode & 0o777) == "0o600"
    leftovers = [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    assert len(leftovers) <= 12  # a kill can orphan a temp file; it is never the target
