"""Background jobs (train / sync / query / annotate) with a job table shared by all processes.

* :class:`JobQueue` — the table in ``MODEL_DIR/jobs.db`` (SQLite) or in the PostgreSQL database of
  ``MOLAL_DATABASE_URL`` (processes on several hosts): enqueue (coalescing), atomic claim, progress,
  heartbeat, finish. At most one job per project runs at a time, across processes and hosts (the claim is one
  exclusive transaction — :meth:`molal.db.Database.transaction` — that skips projects with a running job). A job request while an
  identical one is queued is *coalesced* into it (``coalesced`` counts the merged requests).
* In-process mode (default): :class:`JobWorker` is a daemon thread per server process that claims queued
  jobs and runs them. With ``REDIS_URL`` set, :func:`submit` also pushes the job id to the RQ queue
  ``molal`` and ``molal worker`` (an RQ worker) runs :func:`molal.service.pipeline.run_job_by_id` — the
  same function the worker thread runs. This module only queues and executes; which function runs a kind is
  :data:`molal.service.train.JOBS`.
* A job found ``running`` whose heartbeat is older than ``STALE_S`` (or whose pid is gone, same host) is
  marked failed (:meth:`JobQueue.reap_stale`; the in-process worker and each ``molal worker`` (:func:`start_reaper`)
  check every ``HEARTBEAT_S``). A failed or killed job never touches the serving model:
  publishing is the last step of a training job (see molal.service.store).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from molal.db import Database, describe, open_database
from molal.logging import scrub
from molal.service.store import parse_project_id

log = logging.getLogger("molal.jobs")

#: texts (and characters) one queued annotate job accumulates from /predict requests that ran out of budget
MAX_ANNOTATE_TEXTS = 20_000
MAX_ANNOTATE_CHARS = 32_000_000
#: finished jobs kept per project (older ones are deleted when a job finishes); an annotate job's texts
#: are dropped once it has succeeded
KEEP_FINISHED = 200


def bounded_texts(texts: list[str]) -> list[str]:
    """The first texts within :data:`MAX_ANNOTATE_TEXTS` and :data:`MAX_ANNOTATE_CHARS`."""
    out, n = [], 0
    for t in texts[:MAX_ANNOTATE_TEXTS]:
        n += len(t)
        if n > MAX_ANNOTATE_CHARS:
            break
        out.append(t)
    return out
STALE_S = 60.0
HEARTBEAT_S = 5.0
RQ_QUEUE = "molal"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, project INTEGER NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '', payload TEXT NOT NULL DEFAULT '{}',
    result TEXT, error TEXT, created REAL NOT NULL, started REAL, finished REAL, heartbeat REAL,
    pid INTEGER, host TEXT, coalesced INTEGER NOT NULL DEFAULT 0, source TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
CREATE INDEX IF NOT EXISTS jobs_project ON jobs(project, status);
"""


class JobError(RuntimeError):
    """A job cannot be run (unknown kind, bad payload); the job is marked failed with this message."""


#: what HTTP (``GET /jobs``, ``GET /jobs/<id>``) shows of a job: never its payload (task texts), its error
#: traceback (file paths, upstream responses), nor the process and host that ran it
PUBLIC_FIELDS = ("id", "project", "kind", "status", "progress", "message", "created", "started", "finished",
                 "coalesced", "source")
_PUBLIC_STR = 300


def _public_value(v: Any, depth: int = 0) -> Any:
    """Numbers, booleans, short strings, dicts of those and lists of numbers; anything else is left out."""
    if v is None or isinstance(v, (bool, int, float)):
        return v
    if isinstance(v, str):
        return scrub(v)[:_PUBLIC_STR]
    if isinstance(v, dict) and depth < 2:
        out = {}
        for k, x in v.items():
            y = _public_value(x, depth + 1)
            if y is not _DROP:
                out[str(k)[:100]] = y
        return out
    if isinstance(v, list) and len(v) <= 1000 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      for x in v):
        return v
    return _DROP


_DROP = object()


def public_job(row: dict) -> dict:
    """A job row as the HTTP API shows it (:data:`PUBLIC_FIELDS` + the scalar parts of its result)."""
    d = {k: row.get(k) for k in PUBLIC_FIELDS}
    result = row.get("result")
    d["result"] = _public_value(result) if isinstance(result, dict) else None
    return d


def failure_message(exc: BaseException) -> str:
    """What a failed job's ``message`` says: the text of molal's own errors (written for the person reading
    it); for any other exception only its type, because its text may carry an upstream server's headers or
    body, or file paths. The full text is in the log and the job's ``error`` column (``molal jobs <id>``)."""
    if type(exc).__module__.split(".")[0] == "molal":
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__} (internal error; details in the backend log and `molal jobs <id>`)"


def _row(r: Any) -> dict | None:
    if r is None:
        return None
    d = dict(r)
    d["payload"] = json.loads(d.get("payload") or "{}")
    d["result"] = json.loads(d["result"]) if d.get("result") else None
    return d


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobQueue:
    """The job table. Safe to use from several threads and processes."""

    def __init__(self, target: str | os.PathLike[str] | Database) -> None:
        """``target``: a SQLite file, a ``postgresql://`` URL, or an open :class:`molal.db.Database`."""
        if hasattr(target, "transaction"):
            self.db = target  # type: ignore[assignment]
        else:
            self.db = open_database(target, _SCHEMA, "jobs")
        self.target = describe(self.db.target)

    # -- writing -------------------------------------------------------------------------------------
    def enqueue(self, project: int, kind: str, payload: dict | None = None, source: str = "",
                coalesce: bool = True) -> tuple[dict, bool]:
        """Queue a job; returns ``(job, created)``. With ``coalesce`` an already *queued* job of the same
        project and kind absorbs this request (``created`` is False); a running one does not (the new
        request needs a fresh run that sees the new data)."""
        project = parse_project_id(project)
        if not isinstance(kind, str) or not kind.isidentifier() or len(kind) > 32:
            raise JobError(f"bad job kind {kind!r}")
        payload = payload or {}
        with self.db.transaction() as c:
            if coalesce:
                r = c.execute(
                    "SELECT * FROM jobs WHERE project=? AND kind=? AND status='queued' ORDER BY created LIMIT 1",
                    (project, kind),
                ).fetchone()
                if r is not None:
                    c.execute("UPDATE jobs SET coalesced=coalesced+1 WHERE id=?", (r["id"],))
                    if payload and kind == "annotate":  # merge texts to annotate, up to a bound
                        old = json.loads(r["payload"] or "{}")
                        merged = list(dict.fromkeys(list(old.get("texts", [])) + list(payload.get("texts", []))))
                        old["texts"] = bounded_texts(merged)  # the rest: queued again by a later /predict
                        c.execute("UPDATE jobs SET payload=? WHERE id=?", (json.dumps(old), r["id"]))
                    return _row(c.execute("SELECT * FROM jobs WHERE id=?", (r["id"],)).fetchone()), False
            jid = uuid.uuid4().hex[:16]
            c.execute(
                "INSERT INTO jobs(id, project, kind, status, payload, created, source, message) "
                "VALUES(?, ?, ?, 'queued', ?, ?, ?, 'queued')",
                (jid, project, kind, json.dumps(payload), time.time(), source),
            )
            return _row(c.execute("SELECT * FROM jobs WHERE id=?", (jid,)).fetchone()), True

    def claim(self, job_id: str | None = None) -> dict | None:
        """Atomically take the oldest queued job (or ``job_id``) whose project has no running job."""
        now = time.time()
        with self.db.transaction() as c:
            sql = (
                "SELECT id FROM jobs j WHERE status='queued' AND NOT EXISTS "
                "(SELECT 1 FROM jobs r WHERE r.project=j.project AND r.status='running')"
            )
            params: tuple = ()
            if job_id is not None:
                sql += " AND id=?"
                params = (job_id,)
            r = c.execute(sql + " ORDER BY created LIMIT 1", params).fetchone()
            if r is None:
                return None
            c.execute(
                "UPDATE jobs SET status='running', started=?, heartbeat=?, pid=?, host=?, message='started' "
                "WHERE id=? AND status='queued'",
                (now, now, os.getpid(), socket.gethostname(), r["id"]),
            )
            return _row(c.execute("SELECT * FROM jobs WHERE id=?", (r["id"],)).fetchone())

    def progress(self, job_id: str, fraction: float | None = None, message: str | None = None) -> None:
        sets, params = ["heartbeat=?"], [time.time()]
        if fraction is not None:
            sets.append("progress=?")
            params.append(float(min(max(fraction, 0.0), 1.0)))
        if message is not None:
            sets.append("message=?")
            params.append(scrub(message)[:500])
        self.db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=? AND status='running'", (*params, job_id))

    def finish(self, job_id: str, ok: bool, result: dict | None = None, error: str | None = None,
               message: str | None = None) -> None:
        """Record the end of a job. ``message`` (default: the first line of ``error``) is what people see."""
        status = "succeeded" if ok else "failed"
        msg = "done" if ok else scrub((message or error or "failed").splitlines()[0])[:500]
        with self.db.transaction() as c:
            c.execute(
                "UPDATE jobs SET status=?, finished=?, progress=CASE WHEN ? THEN 1 ELSE progress END, message=?, "
                "result=?, error=?, payload=CASE WHEN ? AND kind='annotate' THEN '{}' ELSE payload END "
                "WHERE id=? AND status='running'",
                (status, time.time(), ok, msg, json.dumps(result) if result is not None else None,
                 scrub(error)[:4000] if error else None, ok, job_id),
            )
            # keep the newest KEEP_FINISHED finished jobs of the project: the table does not grow forever
            c.execute(
                "DELETE FROM jobs WHERE project=(SELECT project FROM jobs WHERE id=?) "
                "AND status IN ('succeeded', 'failed') AND id NOT IN (SELECT id FROM jobs WHERE "
                "project=(SELECT project FROM jobs WHERE id=?) AND status IN ('succeeded', 'failed') "
                "ORDER BY finished DESC LIMIT ?)", (job_id, job_id, KEEP_FINISHED))

    def reap_stale(self, stale_s: float = STALE_S) -> int:
        """Mark running jobs with a dead heartbeat (or a dead pid on this host) as failed."""
        now, host = time.time(), socket.gethostname()
        n = 0
        with self.db.transaction() as c:
            for r in c.execute("SELECT id, heartbeat, pid, host FROM jobs WHERE status='running'").fetchall():
                dead_pid = r["host"] == host and not _pid_alive(r["pid"])
                stale = (r["heartbeat"] or 0) < now - stale_s
                if dead_pid or stale:
                    why = "its process is gone" if dead_pid else f"no heartbeat for {now - (r['heartbeat'] or 0):.0f} s"
                    c.execute(
                        "UPDATE jobs SET status='failed', finished=?, message=?, error=? WHERE id=?",
                        (now, f"worker died ({why}); the previous model keeps serving", why, r["id"]),
                    )
                    n += 1
        if n:
            log.warning("marked %d stale job(s) as failed", n)
        return n

    # -- reading -------------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        return _row(self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def list(self, project: int | None = None, limit: int = 50, status: str | None = None) -> list[dict]:
        sql, params = "SELECT * FROM jobs", []
        cond = []
        if project is not None:
            cond.append("project=?")
            params.append(int(project))
        if status is not None:
            cond.append("status=?")
            params.append(status)
        if cond:
            sql += " WHERE " + " AND ".join(cond)
        sql += " ORDER BY created DESC LIMIT ?"
        params.append(int(limit))
        return [_row(r) for r in self.db.execute(sql, params).fetchall()]

    def counts(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self.db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}


class JobContext:
    """Handed to job functions: progress reporting (also a heartbeat) and cancellation of nothing else."""

    def __init__(self, queue: JobQueue, job: dict) -> None:
        self.queue = queue
        self.job = job
        self.id = job["id"]
        self.log = logging.getLogger(f"molal.jobs.{job['kind']}")

    def progress(self, fraction: float | None = None, message: str | None = None) -> None:
        if message:
            self.log.info("job %s (project %s): %s", self.id, self.job["project"], message)
        self.queue.progress(self.id, fraction, message)


def execute(queue: JobQueue, job: dict, runner: Callable[[JobContext], dict],
            after: Callable[[dict], None] | None = None) -> dict:
    """Run a claimed job with a heartbeat thread; record success or failure; then ``after(final row)`` (best
    effort: its failure is logged). Returns the final row."""
    ctx = JobContext(queue, job)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                queue.progress(job["id"])
            except Exception:  # pragma: no cover - best effort
                pass

    t = threading.Thread(target=beat, name=f"molal-heartbeat-{job['id']}", daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        result = runner(ctx) or {}
        result.setdefault("seconds", round(time.monotonic() - t0, 3))
        queue.finish(job["id"], True, result=result)
        log.info("job %s (%s, project %s) succeeded in %.1f s", job["id"], job["kind"], job["project"],
                 time.monotonic() - t0)
    except BaseException as exc:  # noqa: BLE001 - any failure (even KeyboardInterrupt) fails the job only
        msg = f"{type(exc).__name__}: {exc}"
        queue.finish(job["id"], False, error=msg + "\n" + traceback.format_exc(limit=8),
                     message=failure_message(exc))
        log.error("job %s (%s, project %s) failed: %s", job["id"], job["kind"], job["project"], scrub(msg))
        if not isinstance(exc, Exception):
            raise
    finally:
        stop.set()
    row = queue.get(job["id"]) or job
    if after is not None:
        try:
            after(row)
        except Exception:  # noqa: BLE001 - what follows a job never changes how it ended
            log.exception("after job %s", job["id"])
    return row


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux: priorities are per thread; the threads it
    starts — torch's pool among them — inherit it). Jobs train models on the cores that also serve
    ``/predict`` and, often, Label Studio itself: a person submitting a label must not wait for a job."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # pragma: no cover - not permitted here: run at the priority given
        log.info("could not lower the job thread's priority: %s", exc)


def reap_forever(target: str | Path, every_s: float, parent_pid: int) -> None:
    """:meth:`JobQueue.reap_stale` every ``every_s`` seconds, for as long as process ``parent_pid`` lives (the body
    of :func:`start_reaper`'s process)."""
    queue = JobQueue(target)
    while os.getppid() == parent_pid:
        try:
            queue.reap_stale()
        except Exception:  # noqa: BLE001 - a database hiccup: try again next round
            log.warning("stale-job check failed; trying again in %.0f s", every_s, exc_info=True)
        time.sleep(every_s)


def start_reaper(target: str | Path, every_s: float = HEARTBEAT_S) -> Any:
    """Mark stale jobs of the job table at ``target`` failed every ``every_s`` seconds, in a process of its own.
    ``molal worker`` starts one: with RQ, a job whose worker was killed (a container stopped mid-job) would
    otherwise show ``running`` until the next job of its project came along.

    A process, not a thread: RQ forks a work horse for each job, and a thread of the forking process that is
    inside an import or the database layer at that moment leaves its locks held in the child for good (seen:
    the horse hung in ``import psycopg``). Spawned (a fresh interpreter), daemonic (it ends with the worker), and
    it stops by itself if the worker is killed. ``target`` goes through a pipe, never the command line."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(
        target=reap_forever, args=(target, every_s, os.getpid()), name="molal-job-reaper", daemon=True)
    proc.start()
    return proc


class JobWorker(threading.Thread):
    """In-process worker thread: claims queued jobs (any project) and runs them one at a time."""

    def __init__(self, queue: JobQueue, runner: Callable[[JobContext], dict], poll_s: float = 1.0,
                 after: Callable[[dict], None] | None = None, nice: int = 0) -> None:
        super().__init__(name="molal-job-worker", daemon=True)
        self.queue = queue
        self.runner = runner
        self.after = after
        self.nice = nice
        self.poll_s = poll_s
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.pid = os.getpid()

    def run(self) -> None:
        lower_priority(self.nice)
        log.info("in-process job worker started (pid %d)", os.getpid())
        last_reap = 0.0
        while not self.stop_event.is_set():
            try:
                if time.monotonic() - last_reap > HEARTBEAT_S:
                    self.queue.reap_stale()
                    last_reap = time.monotonic()
                job = self.queue.claim()
                if job is not None:
                    execute(self.queue, job, self.runner, self.after)
                    continue
            except Exception:  # pragma: no cover - keep the worker alive
                log.exception("job worker loop error")
            self.wake.wait(self.poll_s)
            self.wake.clear()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()


def rq_queue(redis_url: str):
    """The RQ queue named ``molal`` on ``redis_url``."""
    from redis import Redis
    from rq import Queue

    return Queue(RQ_QUEUE, connection=Redis.from_url(redis_url))


def submit_rq(redis_url: str, job: dict, model_dir: str) -> None:
    """Hand a queued job to the RQ workers (``molal worker``)."""
    q = rq_queue(redis_url)
    q.enqueue("molal.service.pipeline.run_job_by_id", job["id"], str(model_dir), job_timeout=24 * 3600,
              job_id=f"molal-{job['id']}", description=f"molal {job['kind']} project {job['project']}")
