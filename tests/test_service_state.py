"""molal.service: project ids, per-project state, model publication, the job table and its workers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from molal.io import ArtifactError
from molal.service.jobs import JobError, JobQueue, execute, start_reaper
from molal.service.labelconfig import LabelConfigError, parse_label_config
from molal.service.store import ProjectIdError, ServiceStore, coerce_setting, parse_project_id


# -- project ids ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, want", [("3.1700000000", 3), ("12", 12), (5, 5), ({"id": 9}, 9), (" 4.1.2 ", 4)])
def test_parse_project_id_ok(value, want):
    assert parse_project_id(value) == want


@pytest.mark.parametrize("value", ["", "abc", "../1", "1/2", "-1", "0", "0.5", 0, -2, True, None, 1.5, "1e3", "3.x",
                                   {"id": "../x"}, "9" * 13])
def test_parse_project_id_rejects(value):
    with pytest.raises(ProjectIdError):
        parse_project_id(value)


# -- label config --------------------------------------------------------------------------------------------
def test_label_config_picks_first_choices_with_text_target_or_named():
    cfg = ('<View><Image name="img" value="$image"/><Text name="body" value="$body"/>'
           '<Choices name="img_cls" toName="img"><Choice value="X"/><Choice value="Y"/></Choices>'
           '<Choices name="topic" toName="body"><Choice value="a"/><Choice value="b"/><Choice value="c"/></Choices>'
           '<Choices name="tone" toName="body"><Choice value="pos"/><Choice value="neg"/></Choices></View>')
    spec = parse_label_config(cfg)
    assert (spec.from_name, spec.to_name, spec.value_key, spec.classes) == ("topic", "body", "body", ("a", "b", "c"))
    assert parse_label_config(cfg, from_name="tone").classes == ("pos", "neg")
    with pytest.raises(LabelConfigError, match="no <Choices name='nope'>"):
        parse_label_config(cfg, from_name="nope")
    with pytest.raises(LabelConfigError, match="not a <Text> tag"):
        parse_label_config(cfg, from_name="img_cls")


# -- settings ------------------------------------------------------------------------------------------------
def test_project_settings_validate_and_fall_back_to_env(tmp_path, state_db):
    from molal.config import get_settings

    env = get_settings(model_dir=tmp_path, strategy="margin", train_every=5)
    st = ServiceStore(tmp_path, database_url=state_db.url).project(3)
    assert st.settings(env).strategy == "margin" and st.settings(env).train_every == 5
    st.set_setting("loop_mode", "human_free")
    st.set_setting("train_every", "10")
    st.set_setting("per_llm_predictions", "off")
    ps = st.settings(env)
    assert ps.loop_mode == "human_free" and ps.train_every == 10 and ps.per_llm_predictions is False
    st.unset_setting("train_every")
    assert st.settings(env).train_every == 5
    for key, value, words in [("loop_mode", "auto", "one of"), ("train_every", "-1", ">= 0"),
                              ("query_batch", "0", ">= 1"), ("priority_field", "a.b", "identifier"),
                              ("nope", "1", "unknown project setting"), ("per_llm_predictions", "maybe", "true/false")]:
        with pytest.raises(ValueError, match=words):
            coerce_setting(key, value)


# -- model publication ---------------------------------------------------------------------------------------
def _stage(st, job, content):
    d = st.staging_dir(job)
    (d / "molam").write_bytes(content)
    return d


def test_publish_swaps_pointer_and_verifies_checksums(tmp_path, state_db):
    st = ServiceStore(tmp_path, database_url=state_db.url).project(2)
    assert st.current() is None
    p1 = st.publish(_stage(st, "job1", b"model one"), st.next_version_number(), {"classes": ["a", "b"]}, "job1")
    assert p1["dir"].startswith("1-") and p1["student"] is None
    assert p1["molam"] == f"molam-1-{p1['dir'][2:6]}"  # short enough for Label Studio to show whole
    assert st.current() == p1
    assert st.read_manifest(p1["dir"])["files"]["molam"]
    # a job killed after staging (before publish) leaves the pointer alone
    _stage(st, "job2", b"half written")
    assert st.current() == p1
    p2 = st.publish(_stage(st, "job3", b"model two"), st.next_version_number(), {}, "job3", has_student=True)
    assert p2["dir"].startswith("2-") and p2["student"] == f"student-2-{p2['dir'][2:6]}"
    assert ServiceStore(tmp_path, database_url=state_db.url).project(2).current()["dir"] == p2["dir"]  # another process sees it
    # corruption is refused
    (st.model_dir(p2["dir"]) / "molam").write_bytes(b"corrupted")
    with pytest.raises(ArtifactError, match="checksum"):
        st.read_manifest(p2["dir"])
    assert [v["version"] for v in st.versions()] == [p1["dir"], p2["dir"]]
    with pytest.raises(ArtifactError):
        st.model_dir("../../x")


# -- jobs ----------------------------------------------------------------------------------------------------
def test_enqueue_coalesces_only_queued_jobs(state_db):
    q = JobQueue(state_db.target("jobs"))
    a, created = q.enqueue(1, "train")
    assert created
    b, created = q.enqueue(1, "train")
    assert not created and b["id"] == a["id"] and b["coalesced"] == 1
    c, created = q.enqueue(2, "train")
    assert created and c["id"] != a["id"]
    claimed = q.claim()
    assert claimed["id"] == a["id"] and claimed["status"] == "running"
    # while it runs, a new request queues a follow-up (it must see the new data) ...
    d, created = q.enqueue(1, "train")
    assert created
    # ... which cannot start while project 1 has a running job; project 2's job can
    nxt = q.claim()
    assert nxt["id"] == c["id"]
    assert q.claim() is None
    q.finish(a["id"], True, {"ok": 1})
    assert q.claim()["id"] == d["id"]
    with pytest.raises(JobError):
        q.enqueue(1, "dance; drop table jobs")


def test_the_service_queues_only_the_job_kinds_it_can_run(tmp_path):
    from molal.config import get_settings
    from molal.service.errors import BadRequest
    from molal.service.pipeline import Service
    from molal.service.train import JOBS

    svc = Service(get_settings(model_dir=tmp_path / "state"))
    assert svc.kinds == tuple(JOBS) == ("train", "sync", "query", "annotate", "queue", "certify")
    with pytest.raises(BadRequest, match="unknown job kind 'dance'"):
        svc.submit(1, "dance")


def _claimer(path, out, n):
    q = JobQueue(path)
    got = []
    deadline = time.time() + 20
    while time.time() < deadline:
        j = q.claim()
        if j is None:
            if not q.list(status="queued") and not q.list(status="running"):
                break
            time.sleep(0.002)
            continue
        running = q.list(project=j["project"], status="running")
        assert len(running) == 1, running
        got.append(j["id"])
        q.finish(j["id"], True)
    out.put(got)


def test_claim_is_atomic_across_processes(state_db):
    """Three worker processes race for 20 jobs of 4 projects: each job runs once, never two of one project at
    a time (on PostgreSQL this is what workers on several hosts do)."""
    path = state_db.target("jobs")
    q = JobQueue(path)
    ids = set()
    for p in range(1, 5):
        for _ in range(5):
            j, _ = q.enqueue(p, "sync", coalesce=False)
            ids.add(j["id"])
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(path, out, 20)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    flat = [i for g in got for i in g]
    assert sorted(flat) == sorted(ids)  # every job ran exactly once
    assert q.counts() == {"succeeded": 20}


def _open_fresh(path, barrier, out) -> None:
    barrier.wait()  # every process opens the new database at the same moment
    try:
        JobQueue(path).counts()
        out.put("ok")
    except Exception as exc:  # reported to the parent, which asserts
        out.put(repr(exc))


def test_processes_opening_a_fresh_database_together(tmp_path, state_db, request):
    """Two gunicorn workers on a new MODEL_DIR open jobs.db at once; switching it to WAL used to fail in
    one of them with "database is locked" (no busy handler for that lock), and the worker failed to boot:
    before the fix, 18 of the 400 opens in 100 such rounds of 4 processes failed. On PostgreSQL, processes
    creating the tables together must not fail on CREATE TABLE IF NOT EXISTS either."""
    ctx = mp.get_context("fork")
    errors = []
    trials = 25 if state_db.dialect == "sqlite" else 5
    for trial in range(trials):
        target = tmp_path / f"db{trial}" / "jobs.db" if state_db.dialect == "sqlite" else \
            request.getfixturevalue("postgres_server").new_database()
        barrier, out = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_fresh, args=(target, barrier, out)) for _ in range(4)]
        for p in procs:
            p.start()
        errors += [r for r in (out.get(timeout=60) for _ in procs) if r != "ok"]
        for p in procs:
            p.join(10)
    assert errors == []


def test_failed_job_records_error_without_secrets(state_db, monkeypatch):
    from molal.logging import register_secret

    register_secret("sk-very-secret-1234")
    q = JobQueue(state_db.target("jobs"))
    j, _ = q.enqueue(1, "train")

    def boom(ctx):
        ctx.progress(0.3, "working")
        raise RuntimeError("cannot reach http://ls with token sk-very-secret-1234")

    row = execute(q, q.claim(), boom)
    assert row["status"] == "failed" and row["progress"] == pytest.approx(0.3)
    assert "RuntimeError" in row["message"] and "sk-very-secret-1234" not in row["message"]
    assert "sk-very-secret-1234" not in (row["error"] or "")
    assert "\n" not in row["message"]


_KILLED_JOB = r"""
import sys, time
from molal.service.jobs import JobQueue, execute
q = JobQueue(sys.stdin.readline().strip())
job = q.claim()
def slow(ctx):
    ctx.progress(0.1, "started")
    print("running", flush=True)
    time.sleep(60)
execute(q, job, slow)
"""


def test_killed_job_is_marked_failed_and_previous_model_keeps_serving(tmp_path, state_db):
    store = ServiceStore(tmp_path, database_url=state_db.url)
    st = store.project(4)
    before = st.publish(_stage(st, "old", b"old model"), 1, {}, "old")
    q = JobQueue(store.jobs_target)
    j, _ = q.enqueue(4, "train")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_JOB], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    proc.stdin.write(str(store.jobs_target) + "\n")  # not in argv: a URL's password stays out of `ps`
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "running"
    assert q.get(j["id"])["status"] == "running"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert q.reap_stale() == 1
    row = q.get(j["id"])
    assert row["status"] == "failed" and "worker died" in row["message"]
    assert st.current() == before
    # the project is free again
    j2, created = q.enqueue(4, "train")
    assert created and q.claim()["id"] == j2["id"]


def test_stale_heartbeat_is_reaped(state_db):
    """A worker on another host stopped beating (its pid cannot be checked from here): reaped by heartbeat."""
    q = JobQueue(state_db.target("jobs"))
    j, _ = q.enqueue(1, "sync")
    q.claim()
    q.db.execute("UPDATE jobs SET heartbeat=?, host='elsewhere' WHERE id=?", (time.time() - 3600, j["id"]))
    assert q.reap_stale(stale_s=60) == 1
    assert json.loads(json.dumps(q.get(j["id"])))["status"] == "failed"


def test_reaper_process_marks_a_dead_job_failed_without_another_job(state_db):
    """What `molal worker` runs beside RQ: a job whose worker stopped beating is failed within a round, with no
    new job needed to notice it (a killed worker container otherwise left it `running`)."""
    q = JobQueue(state_db.target("jobs"))
    j, _ = q.enqueue(2, "train")
    q.claim()
    q.db.execute("UPDATE jobs SET heartbeat=?, host='elsewhere' WHERE id=?", (time.time() - 3600, j["id"]))
    proc = start_reaper(state_db.target("jobs"), every_s=0.2)
    try:
        deadline = time.monotonic() + 60  # a spawned interpreter: its imports take a few seconds here
        while q.get(j["id"])["status"] == "running":
            assert time.monotonic() < deadline and proc.is_alive(), "not reaped"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.join(10)
    row = q.get(j["id"])
    assert row["status"] == "failed" and "worker died" in row["message"]


_LEGACY_SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE connection (id INTEGER PRIMARY KEY CHECK (id = 1), hostname TEXT, access_token TEXT, updated REAL);
CREATE TABLE versions (version TEXT PRIMARY KEY, n INTEGER NOT NULL, created REAL NOT NULL, job_id TEXT,
    info TEXT NOT NULL);
CREATE TABLE auto_labels (task_id INTEGER PRIMARY KEY, label INTEGER NOT NULL, weight REAL NOT NULL,
    negatives TEXT NOT NULL, round INTEGER NOT NULL, created REAL NOT NULL);
INSERT INTO settings VALUES ('strategy', '"margin"');
INSERT INTO kv VALUES ('new_annotations', '7');
INSERT INTO connection VALUES (1, 'http://ls:8080', 'tok', 1.0);
INSERT INTO versions VALUES ('1-0123abcd', 1, 2.0, 'job1', '{"classes": ["a"]}');
INSERT INTO auto_labels VALUES (42, 1, 0.5, '[0, 2]', 3, 3.0);
"""


def test_a_state_db_of_the_earlier_layout_is_migrated_once(tmp_path):
    """state.db files written before the project column (one project per file) keep everything they held."""
    import sqlite3

    from molal.config import get_settings

    d = tmp_path / "projects" / "9"
    d.mkdir(parents=True)
    with sqlite3.connect(d / "state.db") as conn:
        conn.executescript(_LEGACY_SCHEMA)
    store = ServiceStore(tmp_path)
    assert store.exists(9) and store.project_ids() == [9]
    st = store.project(9)
    assert st.settings(get_settings(model_dir=tmp_path)).strategy == "margin"
    assert st.get("new_annotations") == 7 and st.incr("new_annotations") == 8
    assert st.connection() == ("http://ls:8080", "tok")
    assert [(v["version"], v["job_id"], v["info"]) for v in st.versions()] == [("1-0123abcd", "job1", {"classes": ["a"]})]
    assert st.next_version_number() == 2
    assert st.auto_labels() == {42: {"label": 1, "weight": 0.5, "negatives": [0, 2], "round": 3}}
    st.close()
    tables = {r[0] for r in sqlite3.connect(d / "state.db").execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert not tables & {"settings", "kv", "connection", "versions", "auto_labels"}
    # opened again: nothing is copied twice
    again = ServiceStore(tmp_path).project(9)
    assert again.get("new_annotations") == 8 and len(again.versions()) == 1


def test_two_projects_share_one_postgresql_database_without_mixing(tmp_path, postgres_server):
    """With MOLAL_DATABASE_URL every project's rows are in the same tables, told apart by project id."""
    from molal.config import get_settings

    url = postgres_server.new_database()
    store = ServiceStore(tmp_path, database_url=url)
    a, b = store.project(1), store.project(2)
    a.set_setting("strategy", "margin")
    a.put("k", [1, 2])
    b.put("k", "other")
    a.save_connection("http://ls:8080", "tok-a")
    a.add_auto_labels([(5, 1, 0.5, [0], 1)])
    env = get_settings(model_dir=tmp_path)
    assert b.settings(env).strategy == env.strategy and b.get("k") == "other" and a.get("k") == [1, 2]
    assert b.connection() == (None, None) and b.auto_labels() == {}
    other = ServiceStore(tmp_path / "elsewhere", database_url=url)  # another host: same database, its own disk
    assert other.project_ids() == [1, 2] and other.exists(2) and not other.exists(3)
    assert other.existing(3) is None and other.project_ids() == [1, 2]  # a read creates nothing
    assert other.project(1).connection() == ("http://ls:8080", "tok-a")
    assert not list(tmp_path.rglob("*.db"))
    with pytest.raises(ValueError, match="postgresql://"):
        ServiceStore(tmp_path, database_url="mysql://u:secret@h/db")
