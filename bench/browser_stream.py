"""Submit → next task in the labelling stream, measured in a real browser, with and without a molal job running.

    .venv/bin/python bench/browser_stream.py [--tasks 2000] [--labels 40] [--backend-src DIR] [--out F.json]

One real Label Studio and one molal backend (``molal serve``, the demo's offline setup: the bundled TREC
recordings, the frozen-encoder student), a project of ``--tasks`` TREC tasks with the review panel, 50 gold
seeds, one training job, the whole queue written. Then a person (Chromium driven by Playwright) labels from
the "molal queue" tab with "Label Tasks As Displayed", accepting the pre-fill, ``--labels`` tasks each:

* ``idle``: nothing else runs (retraining every N labels switched off for the project);
* ``job``: a training job runs meanwhile (``molal train --force`` equivalent, started as the labelling
  starts, and started again whenever it ends), as when molal retrains while people label.

Reported per phase: the seconds from pressing Submit until the next task's review line is on screen (median,
p90, max). ``--backend-src DIR`` runs the backend from another checkout (e.g. a ``git worktree`` of an older
commit: "before"); the browser, Label Studio and this script stay the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * (len(xs) - 1)))], 3) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--labels", type=int, default=40, help="tasks labelled per phase")
    ap.add_argument("--backend-src", type=Path, default=None, help="run the backend from this checkout")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from molal.demo import (
        backend_get,
        connect_backend,
        create_project,
        label_seeds,
        load_rows,
        pick_seeds,
        start_training,
        wait_job,
    )
    from molal.lsprocess import BackendProcess, LabelStudioProcess
    from molal.service.review import INSTRUCTIONS
    from tests.e2e.test_browser_review import CHROMIUM, LAUNCH_ARGS, _log_in, _panel

    tmp = Path(tempfile.mkdtemp(prefix="molal-bench-stream-"))
    ls = LabelStudioProcess(tmp / "ls", username="bench@molal.local")
    ls.start()
    env = {"MOLAL_STUDENT_FREEZE_ENCODER": "true", "MOLAL_STUDENT_MAX_LENGTH": "64", "MOLAL_TRAIN_EVERY": "0"}
    if args.backend_src is not None:
        env["PYTHONPATH"] = str(args.backend_src.resolve())
    be = BackendProcess(tmp / "backend", label_studio_url=ls.url, api_key=ls.token, workers=2, threads=4,
                        extra_env=env)
    be.start(timeout=180)
    out: dict = {"command": " ".join(["bench/browser_stream.py", *sys.argv[1:]]), "cores": os.cpu_count(),
                 "backend_src": str(args.backend_src) if args.backend_src else "this checkout", "phases": {}}
    try:
        sdk = ls.client()
        rows, classes = load_rows(None, None, n=args.tasks, seed=3)
        pid, ids = create_project(sdk, "bench stream", classes, rows)
        gold = {t: r["label"] for t, r in zip(ids, rows, strict=True)}
        sdk.projects.update(id=pid, expert_instruction=INSTRUCTIONS, show_instruction=False)
        from molal.config import get_settings
        from molal.service.store import ServiceStore

        ServiceStore.from_settings(get_settings(model_dir=be.model_dir)).project(pid).set_setting("review_panel", True)
        ml_id = connect_backend(sdk, pid, be.url)
        label_seeds(sdk, pick_seeds(gold, 50, seed=0), gold)
        job = wait_job(be.url, start_training(sdk, ml_id, be.url, pid), timeout=1800)
        assert job["status"] == "succeeded", job
        t0 = time.monotonic()
        while True:  # every queue job (if the backend has them) done
            busy = [j for j in backend_get(be.url, f"/jobs?project={pid}")["jobs"] if j["status"] in ("queued", "running")]
            if not busy:
                break
            time.sleep(2)
        out["queue_wait_s"] = round(time.monotonic() - t0, 1)
        view = next(int((v if isinstance(v, dict) else v.model_dump())["id"]) for v in sdk.views.list(project=pid))

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            pg = browser.new_page(viewport={"width": 1400, "height": 900})
            pg.set_default_timeout(60_000)
            _log_in(pg, ls)
            pg.goto(f"{ls.url}/projects/{pid}/data?tab={view}")
            pg.locator(".lsf-table-row").first.wait_for()
            pg.get_by_role("button", name="Toggle open").click()
            pg.get_by_text("Label Tasks As Displayed").click()
            last = None

            def label(n: int) -> list[float]:
                nonlocal last
                waits: list[float] = []
                t_submit = None
                for _ in range(n):
                    while True:
                        line = _panel(pg)
                        if line != last:
                            break
                        time.sleep(0.02)
                    if t_submit is not None:
                        waits.append(time.monotonic() - t_submit)
                    last = line
                    time.sleep(0.5)  # reading
                    t_submit = time.monotonic()
                    pg.get_by_role("button", name="Submit current annotation").click()
                return waits

            for phase in ("idle", "job"):
                stop = threading.Event()
                jobs: list[str] = []

                def keep_training(stop=stop, jobs=jobs) -> None:
                    from molal.service.jobs import JobQueue

                    table = JobQueue(ServiceStore.from_settings(get_settings(model_dir=be.model_dir)).jobs_target)
                    while not stop.is_set():  # `molal train --force --queue`: a real round, whatever is new
                        jid = table.enqueue(pid, "train", {"force": True}, source="bench")[0]["id"]
                        jobs.append(jid)
                        while not stop.is_set():
                            if backend_get(be.url, f"/jobs/{jid}")["status"] in ("succeeded", "failed"):
                                break
                            time.sleep(1)

                th = threading.Thread(target=keep_training, daemon=True) if phase == "job" else None
                if th is not None:
                    th.start()
                    time.sleep(3)  # the job is under way
                waits = label(args.labels)
                stop.set()
                out["phases"][phase] = {"n": len(waits), "median_s": pct(waits, 0.5), "p90_s": pct(waits, 0.9),
                                        "max_s": round(max(waits), 3), "training_jobs": len(jobs)}
                print(json.dumps({phase: out["phases"][phase]}), file=sys.stderr, flush=True)
                if th is not None:
                    th.join(600)
            browser.close()
    finally:
        be.stop()
        ls.stop()
    out["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))
    print("\n| backend | phase | submit → next median | p90 | max | tasks |\n|---|---|---:|---:|---:|---:|")
    for phase, r in out["phases"].items():
        print(f"| {out['backend_src']} | {phase} | {r['median_s']} s | {r['p90_s']} s | {r['max_s']} s | {r['n']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
