"""The whole cycle on a big Label Studio project: each step's time and memory at 2k, 20k, 100k tasks.

    .venv/bin/python bench/scale.py --sizes 2000,20000 [--out bench/out/scale.json]

One real Label Studio and one molal backend (``molal serve``, the offline default mixture: 4 MiniLM scorers,
the frozen-encoder student as the demo trains it) serve every size. Per size, a new project:

* ``import``: tasks imported through the API (1,000 per request, as ``molal demo``);
* ``connect``: the backend connected (Label Studio calls ``/health`` and ``/setup``);
* ``seeds``: 50 annotations through the API (Label Studio sends a webhook for each);
* ``train``: Start Training (the START_TRAINING webhook) until the job has finished, split into the job's own
  stages by its progress messages (pull tasks, annotate, MoLAM, student, publish, predictions import,
  priorities): the seconds from the webhook to each message;
* ``predict``: ``POST /predict`` with 100 unlabeled tasks, as Label Studio sends it (served from the cache);
* ``page``: the first page (100 tasks) of the project's task list, as the data manager loads it;
* ``open head`` / ``open other``: a person opens a task (``GET /api/tasks/<id>``, what the labeling screen
  does) at the head of the queue (its prediction was imported) and one without a prediction (beyond
  ``predictions_top``: Label Studio asks ``/predict`` for it then);
* ``relabel``: ``--more`` (50) further annotations, on the head of the "molal queue" tab as a reviewer would;
* ``retrain``: a second Start Training (the cache holds every answer; the superseded version's predictions
  are deleted);
* ``queue`` / ``requeue``: after each training job, until the background job has written every other
  unlabeled task's rank and review line (molal.service.queue: one PATCH per task that changed).

CPU: the seconds of CPU each server's process group used during the step (``*_cpu_s``).

Memory: the peak resident set of each server's whole process group (sampled every 0.25 s) during the step.
Texts: AG News (shared data, 4 classes) or ``--dataset trec`` (6 classes, short questions); beyond the data
set's train texts they repeat with a suffix (`` [n]``) so that every task is a distinct text (annotation and
the cache see 100k different texts).
Prints JSON lines as it goes, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAGE = os.sysconf("SC_PAGE_SIZE")


TICK = os.sysconf("SC_CLK_TCK")


def _session_procs(sid: int):
    """``(pid, stat fields after the command name)`` of every live process of session ``sid`` (the servers
    start their own sessions)."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of stat (session), counted after the command name
                yield d, fields
        except (OSError, ValueError, IndexError):
            continue


def session_cpu(sid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of session ``sid``."""
    return sum(int(f[11]) + int(f[12]) for _, f in _session_procs(sid)) / TICK  # utime, stime (14, 15)


def session_rss(sid: int) -> int:
    """Resident bytes of every process in session ``sid``."""
    total = 0
    for d, _ in _session_procs(sid):
        try:
            with open(f"/proc/{d}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


class Peak:
    """Peak resident memory of some process sessions while a step runs."""

    def __init__(self, sessions: dict[str, int]) -> None:
        self.sessions = sessions
        self.peak = {k: 0 for k in sessions}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, sid in self.sessions.items():
                self.peak[k] = max(self.peak[k], session_rss(sid))
            self._stop.wait(0.25)

    def __enter__(self) -> Peak:
        self.cpu0 = {k: session_cpu(sid) for k, sid in self.sessions.items()}
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.cpu = {k: session_cpu(sid) - self.cpu0[k] for k, sid in self.sessions.items()}

    def mb(self) -> dict[str, float]:
        return {**{f"{k}_peak_mb": round(v / 2**20) for k, v in self.peak.items()},
                **{f"{k}_cpu_s": round(v, 1) for k, v in self.cpu.items()}}


def rows_for(n: int, dataset: str = "ag_news") -> tuple[list[dict], list[str]]:
    src = REPO.parent / "shared" / "data" / dataset / "train.jsonl"
    base = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    classes = sorted({r["label"] for r in base})
    rows = []
    for i in range(n):
        r = base[i % len(base)]
        rep = i // len(base)
        rows.append({"text": r["text"] if rep == 0 else f"{r['text']} [{rep}]", "label": r["label"]})
    return rows, classes


def watch_queue(url: str, pid: int, limit: float | None, timeout: float) -> dict:
    """The background queue writer after a training job: with ``limit`` None, wait until every unlabeled task's
    line is written (:func:`molal.demo.wait_queue`); else watch it for at most ``limit`` seconds and return how
    far it got (``upto`` of ``total``, the tasks written per second meanwhile, ``finished``)."""
    from molal.demo import backend_get, wait_queue

    t0 = time.monotonic()
    seen: list[tuple[float, int]] = []

    def first(q: dict) -> None:
        if not seen and q.get("upto") is not None:
            seen.append((time.monotonic(), int(q["upto"])))

    try:
        q, finished = wait_queue(url, pid, timeout=timeout if limit is None else limit, on_progress=first), True
    except TimeoutError:
        if limit is None:
            raise
        q, finished = backend_get(url, f"/projects/{pid}").get("queue") or {}, False
    out = {**q, "finished": finished, "watched_s": round(time.monotonic() - t0, 1)}
    if seen and time.monotonic() > seen[0][0]:
        out["tasks_per_s"] = round((q.get("upto", 0) - seen[0][1]) / (time.monotonic() - seen[0][0]), 2)
    return out


def job_ok(res: dict) -> bool:
    return res.get("train_status") == "succeeded"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,20000,100000")
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--dataset", default="ag_news", help="shared data set whose train texts make the tasks "
                    "(trec: short questions, ≈ 4x cheaper to embed than ag_news's news snippets)")
    ap.add_argument("--no-per-llm", action="store_true", help="MOLAL_PER_LLM_PREDICTIONS=false: only the served "
                    "model's prediction per task (the per-LLM ones are 4 more per task with the default mixture)")
    ap.add_argument("--predictions-top", type=int, default=None, help="MOLAL_PREDICTIONS_TOP (default: the "
                    "backend's, 20,000; 0 = a prediction for every task)")
    ap.add_argument("--more", type=int, default=50, help="annotations before the second training job (0: none)")
    ap.add_argument("--ls-postgres", action="store_true", help="Label Studio on PostgreSQL (a throw-away "
                    "cluster from Debian's binaries, as the tests start it; fsync off) instead of its SQLite")
    ap.add_argument("--queue-for", type=float, default=None, help="watch the background queue writer for at most "
                    "this many seconds after each training job, record how far it got and its rate, and go on while "
                    "it keeps writing (default: wait until the whole queue is written)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--train-timeout", type=float, default=4 * 3600)
    args = ap.parse_args()

    import httpx

    from molal.demo import (
        connect_backend,
        create_project,
        label_seeds,
        pick_seeds,
        start_training,
    )
    from molal.lsprocess import BackendProcess, LabelStudioProcess

    # a terminated bench stops its servers too (they run in sessions of their own): SIGTERM runs the finally
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="molal-bench-scale-"))
    pg = None
    ls_env: dict[str, str] = {}
    if args.ls_postgres:
        from urllib.parse import urlparse

        from tests.pg import PostgresServer

        pg = PostgresServer()
        u = urlparse(pg.new_database())
        ls_env = {"DJANGO_DB": "default", "POSTGRE_NAME": u.path.lstrip("/"), "POSTGRE_USER": str(u.username),
                  "POSTGRE_PASSWORD": str(u.password), "POSTGRE_HOST": str(u.hostname), "POSTGRE_PORT": str(u.port)}
    ls = LabelStudioProcess(tmp / "ls", extra_env=ls_env)
    t = time.monotonic()
    ls.start()
    ls_up = time.monotonic() - t
    # MOLAL_TRAIN_EVERY=0: the retrain is the measured step, not one started by the relabel step's webhooks
    env = {"MOLAL_STUDENT_EPOCHS": "30", "MOLAL_STUDENT_FREEZE_ENCODER": "true", "MOLAL_STUDENT_MAX_LENGTH": "64",
           "MOLAL_TRAIN_EVERY": "0"}
    if args.no_per_llm:
        env["MOLAL_PER_LLM_PREDICTIONS"] = "false"
    if args.predictions_top is not None:
        env["MOLAL_PREDICTIONS_TOP"] = str(args.predictions_top)
    be = BackendProcess(tmp / "backend", label_studio_url=ls.url, api_key=ls.token, workers=1, threads=4,
                        extra_env=env)
    be.start(timeout=180)
    sessions = {"label_studio": os.getsid(ls.proc.pid), "backend": os.getsid(be.proc.pid)}
    print(json.dumps({"label_studio_start_s": round(ls_up, 1), "dir": str(tmp)}), file=sys.stderr, flush=True)
    results = []
    headers = {"Authorization": f"Token {ls.token}"}
    try:
        sdk = ls.client()
        for n in [int(x) for x in args.sizes.split(",") if x]:
            rows, classes = rows_for(n, args.dataset)
            res: dict = {"tasks": n}
            steps: dict[str, dict] = {}

            def step(name: str, fn, n=n, steps=steps):
                with Peak(sessions) as p:
                    t0 = time.monotonic()
                    out = fn()
                    seconds = round(time.monotonic() - t0, 1)
                steps[name] = {"seconds": seconds, **p.mb()}  # after the step: its CPU is counted on exit
                print(json.dumps({"tasks": n, "step": name, **steps[name]}), file=sys.stderr, flush=True)
                return out

            pid, ids = step("import", lambda rows=rows, classes=classes, n=n: create_project(
                sdk, f"scale {n}", classes, rows))
            gold = {t: r["label"] for t, r in zip(ids, rows, strict=True)}
            ml_id = step("connect", lambda pid=pid: connect_backend(sdk, pid, be.url))
            seeds = pick_seeds(gold, args.seeds, 0)
            step("seeds", lambda seeds=seeds, gold=gold: label_seeds(sdk, seeds, gold))

            def train(stages, pid=pid, ml_id=ml_id, n=n):
                t0 = time.monotonic()
                job_id = start_training(sdk, ml_id, be.url, pid)
                last = None
                deadline = t0 + args.train_timeout
                while True:
                    job = httpx.get(f"{be.url}/jobs/{job_id}", timeout=30).json()
                    if job.get("message") != last:
                        last = job.get("message")
                        stages.append((round(time.monotonic() - t0, 1), str(last)[:120]))
                    if job["status"] in ("succeeded", "failed"):
                        return job
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"training at {n} tasks still running after {args.train_timeout:.0f} s")
                    time.sleep(1.0)

            def record(name: str, job: dict, stages: list, res=res) -> None:
                res[f"{name}_status"] = job["status"]
                res[f"{name}_result"] = {k: v for k, v in (job.get("result") or {}).items() if not isinstance(v, dict)}
                res[f"{name}_stages"] = stages
                if job["status"] != "succeeded":
                    res[f"{name}_message"] = job.get("message")

            stages: list[tuple[float, str]] = []
            record("train", step("train", lambda stages=stages: train(stages)), stages)
            if job_ok(res):  # the rest of the queue: every other task's rank and review line, in the background
                res["queue"] = step("queue", lambda pid=pid: watch_queue(be.url, pid, args.queue_for, args.train_timeout))
                qjobs = [j for j in httpx.get(f"{be.url}/jobs", params={"project": pid}, timeout=30).json()["jobs"]
                         if j["kind"] == "queue"]
                res["queue_jobs"] = [{k: j["result"].get(k) for k in ("written", "upto", "total", "seconds",
                                                                      "tasks_per_s", "stopped")}
                                     for j in qjobs if j.get("result")]
            unl = [t for t in ids if t not in set(seeds)][:100]
            tasks = [{"id": t, "data": {"text": rows[ids.index(t)]["text"]}} for t in unl]
            body = {"project": f"{pid}.0", "tasks": tasks, "label_config": sdk.projects.get(id=pid).label_config}

            def predict(body=body):
                r = httpx.post(f"{be.url}/predict", json=body, timeout=300)
                r.raise_for_status()
                return r.json()

            out = step("predict", predict)
            res["predict_results"] = len(out.get("results", []))
            step("page", lambda pid=pid: sdk.tasks.list(project=pid, page_size=100).items[:100])
            def open_task(tid: int, pid=pid) -> list[str]:
                r = httpx.get(f"{ls.url}/api/tasks/{tid}", params={"project": pid}, headers=headers, timeout=300)
                r.raise_for_status()
                return sorted({p.model_version for p in sdk.predictions.list(task=tid)})

            from molal.demo import find_view

            view = find_view(sdk, pid)
            queue: list[int] = []
            if view is not None:  # the tab's head, as a reviewer meets it
                first = sdk.tasks.list(project=pid, view=view, fields="all", page_size=max(args.more, 1) + args.seeds)
                queue = [t.id for t in first.items if not t.annotations][: max(args.more, 1)]
            if queue:
                res["open_head_versions"] = step("open head", lambda t=queue[0]: open_task(t))
            # a task holding no prediction (beyond predictions_top), from the end of the project
            seeded = set(seeds)
            other = next((t for t in reversed(ids[-20:]) if t not in seeded and not sdk.predictions.list(task=t)), None)
            if other is not None:
                res["open_other_versions"] = step("open other", lambda t=other: open_task(t))
            if args.more and queue and job_ok(res):
                step("relabel", lambda q=queue, gold=gold: label_seeds(sdk, q, gold))
                stages2: list[tuple[float, str]] = []
                record("retrain", step("retrain", lambda stages2=stages2: train(stages2)), stages2)
                if res.get("retrain_status") == "succeeded":
                    res["requeue"] = step("requeue", lambda pid=pid: watch_queue(be.url, pid, args.queue_for,
                                                                                 args.train_timeout))
            res["steps"] = steps
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    finally:
        be.stop()
        ls.stop()
        if pg is not None:
            pg.stop()
    report = {"command": " ".join(["bench/scale.py", *sys.argv[1:]]), "cores": os.cpu_count(), "dataset": args.dataset,
              "per_llm_predictions": not args.no_per_llm, "predictions_top": args.predictions_top,
              "label_studio_db": "postgresql" if args.ls_postgres else "sqlite",
              "load_avg_1m": os.getloadavg()[0], "label_studio_start_s": round(ls_up, 1), "results": results}
    print(json.dumps(report, indent=1))
    names = ["import", "connect", "seeds", "train", "queue", "predict", "page", "open head", "open other", "relabel",
             "retrain"]
    print("\n| tasks | " + " | ".join(f"{s} s" for s in names) + " | backend peak MB | Label Studio peak MB |")
    print("|---:|" + "---:|" * (len(names) + 2))
    for r in results:
        st = r["steps"]
        print(f"| {r['tasks']:,} | " + " | ".join(str(st.get(s, {}).get("seconds", "–")) for s in names)
              + f" | {max(v.get('backend_peak_mb', 0) for v in st.values())}"
              + f" | {max(v.get('label_studio_peak_mb', 0) for v in st.values())} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
