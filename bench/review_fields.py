"""What the reviewer's fields cost: writing task data in a real Label Studio at 2,000 tasks.

Label Studio 1.23 (Community) has no bulk update of task data: every ``data.priority`` and every review field
(:mod:`molal.service.review`) is one PATCH per task, while predictions import in bulk. The training job
therefore writes them only for the head of the queue (project setting ``priority_top``). This script starts a
real Label Studio, imports ``--tasks`` TREC tasks, and times, through molal's own client
(:meth:`LSClient.update_task_data`, its thread pool) and its own job functions (:func:`priority_updates`):

* ``priority_top`` = 100 and 0 (= every task), priorities only (what the job wrote before the review fields);
* the same with the review fields (what a training job writes now);
* a bulk import of one prediction per task (the cheap channel, for comparison).

Each write starts from tasks without priorities or fields (a new project's first training job; later jobs
write only what changed, which is again the head: the fields change with every model).

    .venv/bin/python bench/review_fields.py [--tasks 2000] [--tops 100,0] [--out bench/out/review_fields.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--tops", default="100,0", help="priority_top values (0 = every task)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from molal.demo import choice_result, create_project, load_rows
    from molal.lsprocess import LabelStudioProcess
    from molal.service.lsclient import LSClient
    from molal.service.review import review_fields
    from molal.service.train import Pool, priority_updates

    rows, classes = load_rows(None, None, n=args.tasks, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="molal-bench-review-"))
    ls = LabelStudioProcess(tmp / "ls")
    t = time.monotonic()
    ls.start()
    print(f"Label Studio up in {time.monotonic() - t:.1f} s", file=sys.stderr)
    results: list[dict] = []
    try:
        sdk = ls.client()
        lsc = LSClient(ls.url, ls.token)
        rng = np.random.default_rng(0)
        for top in [int(x) for x in args.tops.split(",")]:
            for with_fields in (False, True):
                pid, ids = create_project(sdk, f"bench top={top} fields={with_fields}", classes, rows)
                pool = Pool(task_ids=ids, texts=[r["text"] for r in rows], data=[{"text": r["text"]} for r in rows],
                            human={})
                unl = list(range(len(ids)))
                prio = rng.permutation(len(unl)) + 1
                fields = None
                if with_fields:  # realistic values: random MoLAM / LLM / student probabilities
                    head = [r for r in unl if not top or prio[r] > len(unl) - top]
                    served = rng.dirichlet(np.ones(len(classes)), size=len(head))
                    llm = rng.dirichlet(np.ones(len(classes)), size=(len(head), 5))
                    student = rng.dirichlet(np.ones(len(classes)), size=len(head))
                    fields = dict(zip(head, review_fields(served, llm, classes, student), strict=True))
                updates = priority_updates(pool, unl, prio, "priority", top=top, fields=fields)
                t = time.monotonic()
                n = lsc.update_task_data(updates)
                dt = time.monotonic() - t
                res = {"tasks": len(ids), "priority_top": top, "review_fields": with_fields, "patches": n,
                       "seconds": round(dt, 1), "ms_per_task": round(1000 * dt / max(n, 1), 1),
                       "threads": lsc.threads, "bytes_per_task": round(np.mean([len(json.dumps(d)) for _, d in updates]))}
                print(json.dumps(res), file=sys.stderr)
                results.append(res)
        # the bulk channel, for comparison: one prediction per task in one import
        pid, ids = create_project(sdk, "bench predictions", classes, rows)
        preds = [{"task": t, "result": choice_result(classes[i % len(classes)]), "score": 0.5, "model_version": "b"}
                 for i, t in enumerate(ids)]
        t = time.monotonic()
        lsc.import_predictions(pid, preds)
        dt = time.monotonic() - t
        results.append({"tasks": len(ids), "bulk_prediction_import": True, "seconds": round(dt, 1),
                        "ms_per_task": round(1000 * dt / len(ids), 1)})
    finally:
        ls.stop()
    out = {"command": " ".join(["bench/review_fields.py", *sys.argv[1:]]), "load_avg_1m": os.getloadavg()[0],
           "cores": os.cpu_count(), "results": results}
    print(json.dumps(out, indent=1))
    print("\n| tasks | priority_top | review fields | PATCHes | seconds | ms/task |\n|---|---|---|---|---|---|")
    for r in results:
        if r.get("bulk_prediction_import"):
            print(f"| {r['tasks']} | bulk prediction import | – | 1 request | {r['seconds']} | {r['ms_per_task']} |")
        else:
            print(f"| {r['tasks']} | {r['priority_top'] or 'all'} | {'yes' if r['review_fields'] else 'no'} | "
                  f"{r['patches']} | {r['seconds']} | {r['ms_per_task']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
