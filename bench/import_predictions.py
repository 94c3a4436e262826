"""Label Studio's prediction import at scale, as molal's jobs send it (``LSClient.import_predictions``).

    nice -n 10 python bench/import_predictions.py --tasks 20000 --per-task 5 --out bench/out/import_20k.json

A real Label Studio 1.23.2 (its default SQLite database), one project of ``--tasks`` TREC questions, and
``--per-task`` predictions per task imported the way a first training job imports them: the members' votes
first (``per-task - 1`` model versions, the per-LLM predictions), then the served model's (one more), each
version through one ``import_predictions`` call sized by ``--rule``: ``adaptive`` (molal's
:func:`molal.service.lsclient.next_import_size`) or ``slice`` (the earlier rule: scale by WRITE_SLICE_S / the
last request's seconds, floor 50), ``--max-requests`` caps a run of the slow rule. Prints one JSON object
(each request's size and seconds) and a table per version.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class _Stop(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--per-task", type=int, default=5)
    ap.add_argument("--rule", choices=("adaptive", "slice"), default="adaptive")
    ap.add_argument("--max-requests", type=int, default=0, help="stop after this many requests (0: none)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from bench.scale import rows_for
    from molal.demo import choice_result, create_project
    from molal.lsprocess import LabelStudioProcess
    from molal.service import lsclient
    from molal.service.lsclient import LSClient

    if args.rule == "slice":
        def slice_rule(history, chunk):
            size, dt = history[-1]
            return min(chunk, max(50, int(size * min(4.0, max(0.25, lsclient.WRITE_SLICE_S / max(dt, 1e-3))))))
        lsclient.next_import_size = slice_rule
    rows, classes = rows_for(args.tasks, "trec")
    tmp = Path(tempfile.mkdtemp(prefix="molal-bench-import-"))
    ls = LabelStudioProcess(tmp / "ls")
    ls.start()
    out = {"command": " ".join(["bench/import_predictions.py", *sys.argv[1:]]), "tasks": args.tasks,
           "rule": args.rule, "versions": []}
    requests = 0
    try:
        pid, ids = create_project(ls.client(), "import bench", classes, rows)
        lsc = LSClient(ls.url, ls.token)
        for v in range(args.per_task):
            name = f"llm:m{v}" if v < args.per_task - 1 else "molam-1"
            log: list[dict] = []
            last = [time.monotonic(), 0]

            def on_chunk(n: int, log=log, last=last) -> None:
                nonlocal requests
                now = time.monotonic()
                log.append({"size": n - last[1], "seconds": round(now - last[0], 2)})
                last[0], last[1] = now, n
                requests += 1
                if args.max_requests and requests >= args.max_requests:
                    raise _Stop

            preds = ({"task": t, "result": choice_result(rows[i]["label"]), "model_version": name, "score": 0.5}
                     for i, t in enumerate(ids))
            t0 = time.monotonic()
            try:
                lsc.import_predictions(pid, preds, on_chunk=on_chunk, total=len(ids))
                stopped = False
            except _Stop:
                stopped = True
            out["versions"].append({"version": name, "seconds": round(time.monotonic() - t0, 1),
                                    "imported": sum(r["size"] for r in log), "requests": log, "stopped": stopped})
            r = out["versions"][-1]
            print(f"{name}: {r['imported']} predictions in {len(log)} requests, {r['seconds']} s"
                  + (" (stopped)" if stopped else ""), file=sys.stderr, flush=True)
            if stopped:
                break
    finally:
        ls.stop()
    print(json.dumps(out))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    print(f"\n{args.tasks} tasks, rule {args.rule}\n\n| version | predictions | requests | seconds | request s: first / max |")
    print("|---|---:|---:|---:|---|")
    for r in out["versions"]:
        secs = [q["seconds"] for q in r["requests"]] or [0]
        print(f"| {r['version']} | {r['imported']:,} | {len(r['requests'])} | {r['seconds']} | "
              f"{secs[0]} / {max(secs)} |")


if __name__ == "__main__":
    main()
