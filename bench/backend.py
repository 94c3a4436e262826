"""Benchmark of the Label Studio ML backend under gunicorn (real HTTP, real mixture, real SQLite cache).

Measures:
* cold start: ``molal serve`` launch → first ``/health`` 200; first ``/setup`` + ``/predict`` of a fresh
  worker (mixture load); with ``--trained``, the first ``/predict`` after a MoLAM model is published
  (model load) compared with the following ones;
* ``/predict`` latency p50/p99 for 1, 10 and 100 cached tasks (sequential requests);
* throughput with 16 concurrent clients (10 cached tasks per request).

Usage: ``.venv/bin/python bench/backend.py [--workers 2] [--threads 4] [--requests 200] [--trained]``.
Prints a JSON summary (and writes it to ``--out`` if given). The mixture is the offline default (replay of
the 5 recorded TREC LLMs), so "cached" means every (LLM, text) pair is in MODEL_DIR/cache.db.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import TREC_CLASSES as TREC  # noqa: E402
from tests.conftest import TREC_CONFIG as CONFIG  # noqa: E402
from tests.harness import start_gunicorn, stop_gunicorn  # noqa: E402

PROJECT = "1.1700000000"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def load_rows(n: int) -> list[dict]:
    from molal.resources import asset_path

    with open(asset_path("trec.jsonl")) as fh:
        return [json.loads(line) for _, line in zip(range(n), fh, strict=False)]


def tasks_of(rows):
    return [{"id": i + 1, "data": {"text": r["text"]}, "annotations": [], "predictions": []} for i, r in enumerate(rows)]


def timed_predict(client: httpx.Client, url: str, tasks: list[dict]) -> float:
    t0 = time.perf_counter()
    r = client.post(url + "/predict", json={"project": PROJECT, "tasks": tasks, "label_config": CONFIG})
    dt = time.perf_counter() - t0
    r.raise_for_status()
    body = r.json()
    assert len(body["results"]) == len(tasks) and all(body["results"]), body.get("errors")
    return dt


def publish_trained_model(model_dir: Path, rows: list[dict], n_labels: int = 50) -> str:
    """Fit MoLAM on ``n_labels`` gold labels of the bench pool (no student) and publish it, offline."""
    import numpy as np

    from molal.config import get_settings
    from molal.service.labelconfig import parse_label_config
    from molal.service.pipeline import Service
    from molal.service.train import Pool, fit_round

    svc = Service(get_settings(model_dir=model_dir))
    state = svc.store.project(1)
    state.set_setting("student", False)
    spec = parse_label_config(CONFIG)
    texts = [r["text"] for r in rows]
    rng = np.random.default_rng(0)
    human = {int(i): TREC.index(rows[i]["label"]) for i in rng.choice(len(rows), n_labels, replace=False)}
    pool = Pool(task_ids=list(range(1, len(rows) + 1)), texts=texts, data=[{"text": t} for t in texts],
                human=human, prediction_versions=[[] for _ in texts])
    return fit_round(svc, state, spec, pool, None, job_id="bench").version


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200, help="sequential requests per batch size")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--concurrent-requests", type=int, default=400)
    ap.add_argument("--trained", action="store_true", help="serve a published MoLAM model (else the mixture mean)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = load_rows(max(100, 500))
    with tempfile.TemporaryDirectory(prefix="molal-bench-") as tmp:
        model_dir = Path(tmp)
        out: dict = {"workers": args.workers, "threads": args.threads, "cpus": os.cpu_count(),
                     "serving": "molam" if args.trained else "mixture-mean"}
        if args.trained:
            t0 = time.perf_counter()
            out["version"] = publish_trained_model(model_dir, rows)
            out["offline_fit_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()  # `molal serve` launch -> first /health 200
        proc, url = start_gunicorn(model_dir, {"LOG_LEVEL": "WARNING"}, args.workers, threads=args.threads,
                                   serve_cli=True, poll_s=0.05)
        out["cold_start_health_s"] = round(time.perf_counter() - t0, 3)
        try:
            with httpx.Client(timeout=120) as c:
                t0 = time.perf_counter()
                c.post(url + "/setup", json={"project": PROJECT, "schema": CONFIG}).raise_for_status()
                out["first_setup_s"] = round(time.perf_counter() - t0, 3)
                # first predict: loads the mixture (and the model) in the worker and annotates 100 texts
                # (replay, uncached), then every worker warms up the same way
                firsts = [timed_predict(c, url, tasks_of(rows[:100])) for _ in range(args.workers * 3)]
                # (with --trained the pool was annotated while fitting MoLAM, so this first call is cached)
                key = "first_predict_100_s" if args.trained else "first_predict_100_uncached_s"
                out[key] = round(firsts[0], 3)
                out["warm_predict_100_s"] = round(min(firsts[1:]), 3)
                lat = {}
                for n in (1, 10, 100):
                    tasks = tasks_of(rows[:n])
                    xs = [timed_predict(c, url, tasks) for _ in range(args.requests)]
                    lat[n] = {"p50_ms": round(1000 * pct(xs, 50), 2), "p99_ms": round(1000 * pct(xs, 99), 2),
                              "mean_ms": round(1000 * statistics.mean(xs), 2), "n": len(xs)}
                out["predict_latency"] = lat

            tasks = tasks_of(rows[:10])

            def worker(k: int) -> list[float]:
                with httpx.Client(timeout=120) as cc:
                    return [timed_predict(cc, url, tasks) for _ in range(k)]

            per = max(1, args.concurrent_requests // args.concurrency)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as ex:
                res = list(ex.map(worker, [per] * args.concurrency))
            wall = time.perf_counter() - t0
            xs = [x for r in res for x in r]
            out["concurrent"] = {"clients": args.concurrency, "requests": len(xs), "tasks_per_request": 10,
                                 "req_per_s": round(len(xs) / wall, 1), "tasks_per_s": round(10 * len(xs) / wall, 1),
                                 "p50_ms": round(1000 * pct(xs, 50), 2), "p99_ms": round(1000 * pct(xs, 99), 2)}
            with httpx.Client(timeout=30) as c:
                out["metrics"] = c.get(url + "/metrics").json()
        finally:
            stop_gunicorn(proc)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
