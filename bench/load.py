"""Load benchmark of the ML backend (loopback only): N concurrent clients send ``/predict`` (10 cached tasks
each) and webhooks for D seconds against gunicorn with 2 workers, while a real training job runs.

    .venv/bin/python bench/load.py [--duration 60] [--clients 50] [--tasks 10] [--workers 2] [--no-train]
                                   [--write-results]

    .venv/bin/python bench/load.py --scenario slow [--slow-clients 8] [--duration 30] [--write-results]

The ``slow`` scenario: N clients each open a connection, send a /predict request's headers (Content-Length
100 kB) and then one byte a second (reconnecting when the server drops them), while one client polls
``/health`` and one sends ``/predict`` (10 cached tasks) back to back. It runs twice in one go, against
gunicorn's plain ``gthread`` worker and against molal's ``backend.worker.BufferingThreadWorker`` (same
config otherwise), and reports p50/p99/max latency and failures of /health and /predict for each.

    .venv/bin/python bench/load.py --scenario slow-read [--readers 16,64] [--duration 60] [--write-results]

The ``slow-read`` scenario: N clients (each with a 4 KB receive buffer) post a /predict of --read-tasks
(10,000) tasks with one cached text and never read the answer, while /health and /predict are probed as
above; gunicorn's gthread and molal's worker side by side, for each N.

Setup: a fresh MODEL_DIR; the default mixture (replay of the 5 recorded TREC LLMs) and the annotation cache
are warmed with every text the clients send, so /predict is served from the cache. A fake Label Studio (a
real HTTP server on 127.0.0.1, in this process) holds --pool (300) TREC tasks, --labeled (60) annotated; a
START_TRAINING webhook makes one gunicorn worker's job thread run the real training job (pull → MoLAM →
student → publish → push predictions → write priorities), and a new one is requested whenever the previous
one has finished, so a training job runs during the whole measurement. Clients: 4 /predict for every
webhook (ANNOTATION_CREATED, with a START_TRAINING every 20th). Reported: requests/s, p50/p99 latency per
endpoint, errors (any non-2xx or transport error), peak RSS of the gunicorn master and workers, and the
training jobs seen. Client threads and the server share the machine's cores: the numbers are a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import TREC_CONFIG as CONFIG  # noqa: E402
from tests.harness import JSONServer, start_gunicorn, stop_gunicorn, worker_pids  # noqa: E402


class FakeLS(JSONServer):
    """The Label Studio API calls a training job makes, on 127.0.0.1."""

    def __init__(self, rows: list[dict], n_labeled: int) -> None:
        self.tasks = []
        for i, r in enumerate(rows):
            anns = []
            if i < n_labeled:
                anns = [{"id": i + 1, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00",
                         "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                                     "value": {"choices": [r["label"]]}}]}]
            self.tasks.append({"id": i + 1, "data": {"text": r["text"]}, "annotations": anns, "predictions": []})
        self.calls: dict[str, int] = {}
        super().__init__()

    def respond(self, method, u, raw):
        key = f"{method} {re.sub(r'/[0-9]+', '/N', u.path)}"
        self.calls[key] = self.calls.get(key, 0) + 1
        if re.fullmatch(r"/api/projects/\d+/?", u.path):
            return 200, {"id": 7, "title": "bench", "label_config": CONFIG}
        if method == "GET" and re.fullmatch(r"/api/tasks/?", u.path):
            q = parse_qs(u.query)
            page, size = int(q.get("page", ["1"])[0]), int(q.get("page_size", ["100"])[0])
            return 200, {"tasks": self.tasks[(page - 1) * size : page * size], "total": len(self.tasks)}
        if method == "GET" and u.path.startswith("/api/dm/views"):
            return 200, []
        if u.path.startswith("/api/dm/views"):
            return 201, {"id": 1, "project": 7, "data": {}}
        if u.path.endswith("/import/predictions"):
            return 201, {"created": 0}
        if re.fullmatch(r"/api/tasks/\d+/?", u.path):
            return 200, {"id": int(u.path.strip("/").split("/")[-1]), "data": {}}
        return 404, {"detail": "not in the fake"}


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def warm(url: str, texts: list[str]) -> None:
    """Label config, default mixture decided on TREC texts, every text annotated into the cache."""
    import httpx

    with httpx.Client(timeout=120) as c:
        assert c.post(url + "/setup", json={"project": "7.1", "schema": CONFIG}).status_code == 200
        for s in range(0, len(texts), 100):
            tasks = [{"id": s + i + 1, "data": {"text": t}} for i, t in enumerate(texts[s : s + 100])]
            r = c.post(url + "/predict", json={"project": "7.1", "label_config": CONFIG, "tasks": tasks})
            assert r.status_code == 200 and all(r.json()["results"]), r.text[:300]


def slow_body_client(port: int, stop: threading.Event, counts: dict) -> None:
    """Holds one connection that sends a request's headers, then a byte a second; reconnects when dropped."""
    import socket

    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{")
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(head)
                counts["connections"] += 1
                while not stop.wait(1.0):
                    s.sendall(b" ")
        except OSError:
            counts["dropped"] += 1
            stop.wait(0.2)


def slow_reader(port: int, body: bytes, held: list) -> None:
    """One connection with a 4 KB receive buffer that posts ``body`` to /predict and never reads the answer."""
    import socket

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    held.append(s)


def probe(ep: str, url: str, texts: list[str], n_tasks: int, stop: threading.Event, lat: list, fails: list) -> None:
    """Request ``ep`` (health | predict) over and over on fresh connections until ``stop``."""
    import httpx

    i = 0
    while not stop.is_set():
        i += 1
        t = time.perf_counter()
        try:
            with httpx.Client(timeout=10) as c:
                if ep == "health":
                    r = c.get(url + "/health")
                else:
                    s0 = (i * n_tasks) % (len(texts) - n_tasks)
                    tasks = [{"id": s0 + j + 1, "data": {"text": texts[s0 + j]}} for j in range(n_tasks)]
                    r = c.post(url + "/predict", json={"project": "7.1", "label_config": CONFIG, "tasks": tasks})
            if r.status_code == 200:
                lat.append(time.perf_counter() - t)
            else:
                fails.append(f"HTTP {r.status_code}")
        except httpx.HTTPError as exc:
            fails.append(type(exc).__name__)
        stop.wait(0.1 if ep == "health" else 0.0)


def slow_run(args, texts: list[str], extra: list[str], readers: int = 0) -> dict:
    """One server (gunicorn args ``extra``) under ``args.slow_clients`` slow-body clients, or (``readers`` > 0)
    under that many clients that post a big /predict and never read its answer."""
    env = {"LOG_LEVEL": "warning", "REDIS_URL": None, "MOLAL_REQUEST_TIMEOUT_S": str(args.request_timeout)}
    tmp = Path(tempfile.mkdtemp(prefix="molal-slow-"))
    log = open(tmp / "gunicorn.log", "wb")  # noqa: SIM115
    proc = None
    try:
        proc, url = start_gunicorn(tmp / "state", env, workers=args.workers, threads=args.threads, log=log,
                                   extra_args=extra)
        warm(url, texts)
        port = int(url.rsplit(":", 1)[1])
        stop = threading.Event()
        counts = {"connections": 0, "dropped": 0}
        held: list = []
        out: dict = {}
        if readers:
            import httpx

            body = json.dumps({"project": "7.1", "label_config": CONFIG, "tasks": [
                {"id": i + 1, "data": {"text": texts[0]}} for i in range(args.read_tasks)]}).encode()
            t0 = time.perf_counter()
            r = httpx.post(url + "/predict", content=body, headers={"Content-Type": "application/json"},
                           timeout=120)
            out["one_big_predict"] = {"status": r.status_code, "request_bytes": len(body),
                                      "answer_bytes": len(r.content), "seconds": round(time.perf_counter() - t0, 2)}
            slow = [threading.Thread(target=slow_reader, args=(port, body, held), daemon=True)
                    for _ in range(readers)]
        else:
            slow = [threading.Thread(target=slow_body_client, args=(port, stop, counts), daemon=True)
                    for _ in range(args.slow_clients)]
        for t in slow:
            t.start()
        time.sleep(0.5 if readers else 2.0)  # let them take hold
        peak = {"rss_mb": 0.0}

        def sample_memory() -> None:
            while not stop.wait(0.5):
                peak["rss_mb"] = max(peak["rss_mb"], sum(rss_mb(p) for p in worker_pids(proc.pid)))

        mem = threading.Thread(target=sample_memory, daemon=True)
        mem.start()
        lat: dict[str, list[float]] = {"health": [], "predict": []}
        fails: dict[str, list[str]] = {"health": [], "predict": []}
        probes = [threading.Thread(target=probe, args=(ep, url, texts, args.tasks, stop, lat[ep], fails[ep]),
                                   daemon=True) for ep in ("health", "predict")]
        for t in probes:
            t.start()
        time.sleep(args.duration)
        stop.set()
        for t in probes + slow:
            t.join(15)
        for c in held:
            c.close()
        out.update({ep: {"ok": len(lat[ep]), "failed": len(fails[ep]),
                    "p50_ms": round(1000 * pct(lat[ep], 0.5), 1), "p99_ms": round(1000 * pct(lat[ep], 0.99), 1),
                    "max_ms": round(1000 * max(lat[ep]), 1) if lat[ep] else None,
                    "failure_samples": sorted(set(fails[ep]))[:3]}
               for ep in ("health", "predict")})
        out["workers_peak_rss_mb"] = round(peak["rss_mb"], 1)
        if not readers:
            out["slow_connections_opened"] = counts["connections"]
        return out
    finally:
        if proc is not None:
            stop_gunicorn(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def slow_scenario(args, rows: list[dict]) -> dict:
    """/health and /predict latency with ``args.slow_clients`` slow-body clients, per worker class."""
    texts = [r["text"] for r in rows]
    out: dict = {"slow_clients": args.slow_clients, "duration_s": args.duration, "workers": args.workers,
                 "request_timeout_s": args.request_timeout,
                 "threads": args.threads, "tasks_per_predict": args.tasks, "runs": {}}
    for name, extra in (("gunicorn gthread", ["-k", "gthread"]), ("molal BufferingThreadWorker", [])):
        out["runs"][name] = slow_run(args, texts, extra)
        print(name, json.dumps(out["runs"][name]), flush=True)
    return out


def slow_read_scenario(args, rows: list[dict]) -> dict:
    """/health and /predict latency while clients leave big /predict answers unread, per worker class."""
    texts = [r["text"] for r in rows]
    out: dict = {"readers": args.readers, "duration_s": args.duration, "workers": args.workers,
                 "threads": args.threads, "read_tasks": args.read_tasks, "tasks_per_predict": args.tasks, "runs": {}}
    for n in [int(x) for x in args.readers.split(",")]:
        for name, extra in (("gunicorn gthread", ["-k", "gthread"]), ("molal BufferingThreadWorker", [])):
            key = f"{name}, {n} readers"
            out["runs"][key] = slow_run(args, texts, extra, readers=n)
            print(key, json.dumps(out["runs"][key]), flush=True)
    return out


def write_slow_read_results(res: dict) -> None:
    import platform

    big = next(iter(res["runs"].values()))["one_big_predict"]
    heading = "## slow readers (bench/load.py --scenario slow-read)"
    lines = [
        heading, "",
        f"Command: `.venv/bin/python bench/load.py --scenario slow-read --readers {res['readers']} --duration "
        f"{res['duration_s']:.0f} --write-results` (python {platform.python_version()}, {os.cpu_count()} CPU cores "
        f"shared by the clients and the server; loopback). gunicorn {res['workers']} workers x {res['threads']} "
        f"threads. Each reader opens a connection with a 4 KB receive buffer, posts a /predict of "
        f"{res['read_tasks']:,} tasks with one cached text ({big['request_bytes'] / 1e3:.0f} kB; the answer is "
        f"{big['answer_bytes'] / 1e6:.1f} MB, built in {big['seconds']:.1f} s when asked alone) and never reads it. "
        "Meanwhile one client polls /health every 0.1 s and one sends /predict "
        f"({res['tasks_per_predict']} cached tasks) back to back, each on a new connection with a 10 s timeout. "
        "Both worker classes in the same run, same config otherwise.", "",
        "| worker class, readers | /health ok / failed | /health p50 / p99 / max | /predict ok / failed "
        "| /predict p50 / p99 / max | workers' peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["runs"].items():
        h, p = r["health"], r["predict"]
        lines.append(f"| {name} | {h['ok']} / {h['failed']} | {h['p50_ms']} / {h['p99_ms']} / {h['max_ms']} ms | "
                     f"{p['ok']} / {p['failed']} | {p['p50_ms']} / {p['p99_ms']} / {p['max_ms']} ms | "
                     f"{r['workers_peak_rss_mb']:.0f} MB |")
    lines += ["", "gunicorn's gthread writes a response from the request thread with a blocking send: each reader "
              "holds a thread until it reads, so a few of them hold them all. molal's worker has the thread write "
              "the answer into memory and the event loop send it as the client reads; /health is answered in the "
              "loop and /predict has its own threads (backend/worker.py; docs/architecture.md). An unread answer "
              "is dropped after MOLAL_RESPONSE_TIMEOUT_S (60 s), or sooner when unread answers hold more than "
              "max(4 x MOLAL_MAX_BODY_BYTES, 256 MB) in a worker.", ""]
    replace_section(heading, lines)


def write_slow_results(res: dict) -> None:
    import platform

    lines = [
        "## slow clients (bench/load.py --scenario slow)", "",
        f"Command: `.venv/bin/python bench/load.py --scenario slow --slow-clients {res['slow_clients']} --duration "
        f"{res['duration_s']:.0f} --write-results` (python {platform.python_version()}, {os.cpu_count()} CPU cores "
        f"shared by the clients and the server; loopback). gunicorn {res['workers']} workers x {res['threads']} "
        f"threads; {res['slow_clients']} clients each send a /predict request's headers (Content-Length 100 kB) and "
        "then one byte a second, reconnecting when dropped; meanwhile one client polls /health every 0.1 s and "
        f"one sends /predict ({res['tasks_per_predict']} cached tasks) back to back, each on a new connection with "
        "a 10 s timeout. Both worker classes in the same run, same config otherwise.", "",
        "| worker class | /health ok / failed | /health p50 / p99 / max | /predict ok / failed | /predict p50 / p99 / max |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in res["runs"].items():
        h, p = r["health"], r["predict"]
        lines.append(f"| {name} | {h['ok']} / {h['failed']} | {h['p50_ms']} / {h['p99_ms']} / {h['max_ms']} ms | "
                     f"{p['ok']} / {p['failed']} | {p['p50_ms']} / {p['p99_ms']} / {p['max_ms']} ms |")
    plain, ours = res["runs"]["gunicorn gthread"], res["runs"]["molal BufferingThreadWorker"]
    lines += ["", f"With gunicorn's gthread the slow clients held the threads: in {res['duration_s']:.0f} s /health "
              f"answered {plain['health']['ok']} of {plain['health']['ok'] + plain['health']['failed']} calls and "
              f"/predict {plain['predict']['ok']} of {plain['predict']['ok'] + plain['predict']['failed']} (failures: "
              f"{', '.join(sorted(set(plain['health']['failure_samples'] + plain['predict']['failure_samples']))) or 'none'}"
              "; each client waits up to 10 s). "
              "molal's worker reads each request whole before a thread sees it; the slow clients were cut off "
              f"with 408 after MOLAL_REQUEST_TIMEOUT_S ({res['request_timeout_s']:g} s) and reconnected "
              f"({ours['slow_connections_opened']} connections in all), and /health kept p99 "
              f"{ours['health']['p99_ms']} ms.", ""]
    replace_section("## slow clients (bench/load.py --scenario slow)", lines)


def replace_section(heading: str, lines: list[str]) -> None:
    """Put ``lines`` (starting with ``heading``) in bench/RESULTS.md in place of that section (or at the end)."""
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else ""
    section = "\n".join(lines)
    m = re.search(r"^" + re.escape(heading) + r".*?(?=^## |\Z)", text, flags=re.S | re.M)
    text = text[: m.start()] + section + "\n" + text[m.end():] if m else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=("load", "slow", "slow-read"), default="load")
    ap.add_argument("--readers", default="16,64",
                    help="slow-read scenario: comma list of reader counts (clients that never read their answer)")
    ap.add_argument("--read-tasks", type=int, default=10_000, help="slow-read scenario: tasks in each reader's /predict")
    ap.add_argument("--slow-clients", type=int, default=8, help="slow scenario: clients trickling a request body")
    ap.add_argument("--request-timeout", type=float, default=30.0,
                    help="slow scenario: MOLAL_REQUEST_TIMEOUT_S of the server")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    ap.add_argument("--pool", type=int, default=300, help="tasks in the fake Label Studio project")
    ap.add_argument("--labeled", type=int, default=60, help="annotated tasks among them")
    ap.add_argument("--student-epochs", type=int, default=1)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--wait-train", type=float, default=240.0,
                    help="after the load, wait up to this long for the running training job to finish")
    ap.add_argument("--write-results", action="store_true", help="update the load section of bench/RESULTS.md")
    args = ap.parse_args()
    import httpx

    rows = [json.loads(line) for line in (REPO / "molal" / "assets" / "trec.jsonl").read_text().splitlines()[: args.pool]]
    if args.scenario == "slow-read":
        res = slow_read_scenario(args, rows)
        print(json.dumps(res, indent=1))
        if args.write_results:
            write_slow_read_results(res)
        return
    if args.scenario == "slow":
        res = slow_scenario(args, rows)
        print(json.dumps(res, indent=1))
        if args.write_results:
            write_slow_results(res)
        return
    ls = FakeLS(rows, n_labeled=args.labeled)
    tmp = Path(tempfile.mkdtemp(prefix="molal-load-"))
    env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": "bench-key-0123456789", "LOG_LEVEL": "warning",
           "MOLAL_STUDENT_EPOCHS": str(args.student_epochs), "MOLAL_STUDENT_MAX_LENGTH": "32", "MOLAL_DEVICE": "cpu",
           "REDIS_URL": None}
    log = open(tmp / "gunicorn.log", "wb")  # noqa: SIM115
    proc = None
    try:
        t0 = time.monotonic()
        try:
            proc, url = start_gunicorn(tmp / "state", env, workers=args.workers, threads=args.threads, log=log)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        texts = [r["text"] for r in rows]
        warm(url, texts)
        print(f"warm: {len(texts)} texts cached in {time.monotonic() - t0:.1f} s", flush=True)

        stop = threading.Event()
        lat: dict[str, list[float]] = {"predict": [], "webhook": []}
        errors: list[str] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            import random

            rng = random.Random(k)
            i = 0
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    i += 1
                    if i % 5:
                        s = rng.randrange(0, len(texts) - args.tasks)
                        tasks = [{"id": s + j + 1, "data": {"text": texts[s + j]}} for j in range(args.tasks)]
                        ep, body = "predict", {"project": "7.1", "label_config": CONFIG, "tasks": tasks}
                    elif i % 100 == 0 and not args.no_train:
                        ep, body = "webhook", {"action": "START_TRAINING", "project": {"id": 7}}
                    else:
                        ep, body = "webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 7},
                                               "annotation": {"id": i, "project": 7, "was_cancelled": False}}
                    t = time.perf_counter()
                    try:
                        r = c.post(f"{url}/{ep}", json=body)
                        ok = 200 <= r.status_code < 300 and (ep != "predict" or len(r.json()["results"]) == args.tasks)
                        why = f"{ep} HTTP {r.status_code}: {r.text[:120]}"
                    except httpx.HTTPError as exc:
                        ok, why = False, f"{ep} {type(exc).__name__}: {exc}"
                    dt = time.perf_counter() - t
                    with lock:
                        if ok:
                            lat[ep].append(dt)
                        else:
                            errors.append(why)

        jobs_seen: dict[str, dict] = {}
        mem: dict[int, float] = {}

        mem_stop = threading.Event()

        def sample_memory() -> None:  # until the end, the wait for the training job included
            while not mem_stop.is_set():
                for p in [proc.pid, *worker_pids(proc.pid)]:
                    mem[p] = max(mem.get(p, 0.0), rss_mb(p))
                mem_stop.wait(0.5)

        threading.Thread(target=sample_memory, daemon=True).start()

        def monitor() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    if not args.no_train:
                        try:
                            js = c.get(url + "/jobs?project=7").json()["jobs"]
                            for j in js:
                                jobs_seen[j["id"]] = j
                            if not any(j["status"] in ("queued", "running") and j["kind"] == "train" for j in js):
                                c.post(url + "/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
                        except httpx.HTTPError:
                            pass
                    stop.wait(1.0)

        mon = threading.Thread(target=monitor, daemon=True)
        mon.start()
        if not args.no_train:  # let the first training job start before measuring
            t1 = time.monotonic()
            while not any(j["status"] == "running" for j in jobs_seen.values()) and time.monotonic() - t1 < 30:
                time.sleep(0.2)
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(args.duration)
        stop.set()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - t_start
        mon.join(5)
        with httpx.Client(timeout=30) as c:
            metrics = c.get(url + "/metrics").json()
            # after the load: let the training job that was running finish (how long it took under load)
            t_end = time.monotonic()
            first_running = [j["id"] for j in jobs_seen.values() if j["kind"] == "train" and j["started"]]
            while not args.no_train and time.monotonic() - t_end < args.wait_train:
                js = {j["id"]: j for j in c.get(url + "/jobs?project=7").json()["jobs"]}
                if all(js.get(i, {}).get("status") not in ("queued", "running") for i in first_running):
                    break
                time.sleep(1.0)
            final = c.get(url + "/jobs?project=7").json()["jobs"]
            mem_stop.set()
        for j in final:
            jobs_seen[j["id"]] = j
    finally:
        if proc is not None:
            stop_gunicorn(proc)
        log.close()
    glog = (tmp / "gunicorn.log").read_text(errors="replace")
    n_ok = sum(len(v) for v in lat.values())
    train_jobs = [j for j in jobs_seen.values() if j["kind"] == "train"]
    res = {
        "duration_s": round(elapsed, 1), "requested_s": args.duration, "clients": args.clients,
        "pool": args.pool, "labeled": args.labeled, "student_epochs": args.student_epochs, "tasks_per_predict": args.tasks,
        "workers": args.workers, "threads": args.threads, "requests_ok": n_ok, "errors": len(errors),
        "requests_per_s": round((n_ok + len(errors)) / elapsed, 1),
        "predict": {"n": len(lat["predict"]), "per_s": round(len(lat["predict"]) / elapsed, 1),
                    "p50_ms": round(1000 * pct(lat["predict"], 0.5), 1),
                    "p99_ms": round(1000 * pct(lat["predict"], 0.99), 1)},
        "webhook": {"n": len(lat["webhook"]), "per_s": round(len(lat["webhook"]) / elapsed, 1),
                    "p50_ms": round(1000 * pct(lat["webhook"], 0.5), 1),
                    "p99_ms": round(1000 * pct(lat["webhook"], 0.99), 1)},
        "peak_rss_mb": {("master" if p == proc.pid else f"worker {p}"): round(v, 1) for p, v in mem.items() if v},
        "train_jobs": [{"status": j["status"], "seconds": round((j["finished"] or time.time()) - (j["started"] or 0), 1)
                        if j["started"] else None, "message": j["message"][:100]} for j in
                       sorted(train_jobs, key=lambda j: j["created"])],
        "ls_calls": ls.calls, "database_locked_in_log": "database is locked" in glog,
        "worker_timeouts_in_log": glog.count("WORKER TIMEOUT"), "error_samples": errors[:5],
        "server_predict_mean_ms": metrics.get("predict_mean_ms"),
    }
    print(json.dumps(res, indent=1))
    if args.write_results:
        write_results(res)
    shutil.rmtree(tmp, ignore_errors=True)


def write_results(res: dict) -> None:
    import platform

    import torch

    rss = res["peak_rss_mb"]
    jobs = res["train_jobs"]
    lines = [
        "## load (bench/load.py)", "",
        f"Command: `.venv/bin/python bench/load.py --duration {res['requested_s']:.0f} --clients {res['clients']} "
        f"--write-results` (python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPU "
        "cores shared by the clients, gunicorn and the training job; loopback only). gunicorn: "
        f"{res['workers']} workers x {res['threads']} threads; /predict carries {res['tasks_per_predict']} tasks "
        "served from the annotation cache (default mixture: replay of the 5 TREC LLMs, per-LLM predictions on); "
        "4 /predict per webhook (ANNOTATION_CREATED, START_TRAINING every 20th webhook). A fake Label Studio on "
        f"127.0.0.1 ({res['pool']} TREC tasks, {res['labeled']} annotated) feeds real training jobs (pull, MoLAM, "
        f"student {res['student_epochs']} epoch(s) at max_length 32, publish, push predictions, priorities) that "
        "run in a gunicorn worker's job thread from before the load starts; after the load the script waits for "
        "that job to finish.",
        "",
        "| measure | value |", "|---|---:|",
        f"| duration | {res['duration_s']} s |",
        f"| requests/s (all) | {res['requests_per_s']} |",
        f"| /predict requests/s (tasks/s) | {res['predict']['per_s']} ({res['predict']['per_s'] * res['tasks_per_predict']:.0f}) |",
        f"| /predict p50 / p99 | {res['predict']['p50_ms']} / {res['predict']['p99_ms']} ms |",
        f"| /webhook requests/s | {res['webhook']['per_s']} |",
        f"| /webhook p50 / p99 | {res['webhook']['p50_ms']} / {res['webhook']['p99_ms']} ms |",
        f"| errors (non-2xx or transport) | **{res['errors']}** |",
        f"| peak RSS master | {rss.get('master', 0)} MB |",
        "| peak RSS workers (incl. the one training MoLAM + the student) | "
        + ", ".join(f"{v} MB" for k, v in rss.items() if k != "master") + " |",
        f"| training jobs (started during the run, then waited for) | {len(jobs)}: " + ", ".join(
            f"{j['status']} ({j['seconds']} s" + (f", '{j['message']}'" if j['status'] != 'succeeded' else "") + ")"
            for j in jobs) + " |",
        f"| 'database is locked' / WORKER TIMEOUT in the log | {res['database_locked_in_log']} / "
        f"{res['worker_timeouts_in_log']} |",
        "",
    ]
    replace_section("## load (bench/load.py)", lines)


if __name__ == "__main__":
    main()
