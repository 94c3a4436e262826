"""/predict within its budget on the largest request the limits allow (issue 25 D): what the steps after the
model work cost (they set ``molal.service.predict.FINISH_*``), and a real gunicorn's answer time and worker
memory on ``--n`` different texts of ``--chars`` characters.

    .venv/bin/python bench/predict_budget.py --n 1000 --chars 32000 --budget 20

Steps timed in this process, on the same texts: the cache-only lookup of the default mixture (4 scorers),
queueing the background job with every text (a new job, then one merged into it), and the entries and the
JSON of ``--tasks`` answered tasks with one entry per member (5). Then the real server: a warm-up request,
then ``--repeat`` requests of new texts; each one's answer time less the budget and less the time the same
body takes to be refused at once (the body's transfer and framing, not in the budget), the worker's RSS
before and after. Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def steps(n: int, chars: int, tasks: int) -> dict:
    from molal.config import get_settings
    from molal.service.pipeline import Service
    from molal.service.predict import FINISH_BASE_S, FINISH_S_PER_MB, FINISH_S_PER_TASK, entry, llm_entries
    from tests.conftest import TREC_CLASSES, TREC_CONFIG
    from tests.harness import long_texts

    svc = Service(get_settings(model_dir=Path(tempfile.mkdtemp())))
    state = svc.project(7)
    texts = long_texts(n, chars, seed=11)
    spec = svc.parse_config(TREC_CONFIG)
    mixture = svc.mixture_for(state, spec.classes, texts)
    mb = sum(map(len, texts)) / 1e6
    t0 = time.perf_counter()
    res = mixture.annotate(texts, list(TREC_CLASSES), cache=svc.cache, deadline=time.monotonic())
    t_cache = time.perf_counter() - t0
    assert len(res.pending_idx) == n
    t0 = time.perf_counter()
    job, _ = svc.submit(7, "annotate", {"texts": texts, "classes": list(spec.classes)})
    t_queue = time.perf_counter() - t0
    t0 = time.perf_counter()
    again, created = svc.submit(7, "annotate", {"texts": long_texts(n, chars, seed=12), "classes": list(spec.classes)})
    t_merge = time.perf_counter() - t0
    assert not created and again["id"] == job["id"]
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(len(spec.classes)), size=tasks)
    L = rng.dirichlet(np.ones(len(spec.classes)), size=(tasks, 5))
    versions = [f"llm:m{j}" for j in range(5)]
    t0 = time.perf_counter()
    results = [[entry(spec, P[i], "molam-1-abcd"), *llm_entries(spec, versions, L[i])] for i in range(tasks)]
    body = json.dumps({"results": results, "model_version": "molam-1-abcd", "pending": 0})
    t_entries = time.perf_counter() - t0
    measured_s_per_mb = t_cache / mb  # queueing the job runs beside the request (predict.queue_pending)
    return {
        "what": "steps", "n": n, "chars": chars, "mb": round(mb, 1), "tasks": tasks,
        "cache_lookup_s": round(t_cache, 3), "queue_s": round(t_queue, 3), "queue_merge_s": round(t_merge, 3),
        "entries_json_s": round(t_entries, 3), "answer_mb": round(len(body) / 1e6, 1),
        "s_per_mb": round(measured_s_per_mb, 4), "s_per_task": round(t_entries / tasks, 6),
        "finish_s_per_mb": FINISH_S_PER_MB, "finish_s_per_task": FINISH_S_PER_TASK, "finish_base_s": FINISH_BASE_S,
        "margin_per_mb": round(FINISH_S_PER_MB / measured_s_per_mb, 1),
        "margin_per_task": round(FINISH_S_PER_TASK / (t_entries / tasks), 1),
    }


def served(n: int, chars: int, budget: float, repeat: int, env: dict[str, str] | None = None) -> list[dict]:
    import httpx

    from tests.conftest import TREC_CONFIG
    from tests.harness import long_texts, start_gunicorn, stop_gunicorn, worker_pids
    d = Path(tempfile.mkdtemp())
    proc, url = start_gunicorn(d / "state", {"MOLAL_PREDICT_BUDGET_S": str(budget), **(env or {})}, workers=1)
    out = []

    def body(seed: int, k: int, project: str = "7.1") -> bytes:
        tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(long_texts(k, chars, seed=seed))]
        return json.dumps({"project": project, "label_config": TREC_CONFIG, "tasks": tasks}).encode()

    def post(c, data: bytes):
        t0 = time.monotonic()
        r = c.post(url + "/predict", content=data, headers={"Content-Type": "application/json"})
        return r, time.monotonic() - t0

    try:
        (pid,) = worker_pids(proc.pid)
        with httpx.Client(timeout=600) as c:
            post(c, body(100, 1))
            for seed in range(1, repeat + 1):
                data = body(seed, n)
                _, before = post(c, data.replace(b'"project": "7.1"', b'"project": "x7.1"', 1))
                rss0 = rss_mb(pid)
                r, took = post(c, data)
                j = r.json()
                out.append({"what": "served", "n": n, "chars": chars, "budget_s": budget, "status": r.status_code,
                            "answered_s": round(took, 2), "body_s": round(before, 2),
                            "past_budget_s": round(took - before - budget, 2), "pending": j.get("pending"),
                            "worker_rss_mb_before": round(rss0), "worker_rss_mb_after": round(rss_mb(pid))})
    finally:
        stop_gunicorn(proc, grace_s=5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--chars", type=int, default=32_000)
    ap.add_argument("--tasks", type=int, default=10_000, help="answered tasks for the entries and JSON step")
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--no-steps", action="store_true", help="only the server (e.g. to run it on an older molal)")
    ap.add_argument("--env", action="append", default=[], help="K=V for the server's environment (repeatable)")
    args = ap.parse_args()
    rows = [] if args.no_steps else [steps(args.n, args.chars, args.tasks)]
    if rows:
        print(json.dumps(rows[0]), flush=True)
    if not args.no_server:
        env = dict(kv.split("=", 1) for kv in args.env)
        for r in served(args.n, args.chars, args.budget, args.repeat, env):
            print(json.dumps(r), flush=True)
            rows.append(r)
    s = rows[0] if rows and rows[0]["what"] == "steps" else None
    if s is not None:
        print(f"\nsteps after the model work, {s['n']} texts x {s['chars']} chars ({s['mb']} MB), {s['tasks']} tasks:")
        print(f"  cache lookup {s['cache_lookup_s']} s · queue {s['queue_s']} s (merged {s['queue_merge_s']} s) · "
              f"entries+JSON {s['entries_json_s']} s ({s['answer_mb']} MB)")
        print(f"  {s['s_per_mb']} s/MB (FINISH_S_PER_MB {s['finish_s_per_mb']}: x{s['margin_per_mb']}) · "
              f"{s['s_per_task'] * 1000:.3f} ms/task (FINISH_S_PER_TASK {s['finish_s_per_task']}: "
              f"x{s['margin_per_task']})")
    served_rows = [r for r in rows if r["what"] == "served"]
    if served_rows:
        print("\n| budget s | answered s | body s | past budget s | pending | worker RSS MB |")
        print("|---:|---:|---:|---:|---:|---|")
        for r in served_rows:
            print(f"| {r['budget_s']} | {r['answered_s']} | {r['body_s']} | {r['past_budget_s']} | {r['pending']} | "
                  f"{r['worker_rss_mb_before']} → {r['worker_rss_mb_after']} |")


if __name__ == "__main__":
    main()
