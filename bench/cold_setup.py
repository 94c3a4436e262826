"""Cold ``/setup``: how long the first ``/setup`` of a freshly booted backend takes, on a loaded machine.

Label Studio gives ``/setup`` 3 s (``ML_TIMEOUT_SETUP``) when a model is connected and before every prediction
batch. A worker that imports the label-config parser, the annotators and MoLAM on its first request spent
3-16 s there on a loaded machine. This script starts the backend (gunicorn, 2 workers, fresh MODEL_DIR) with
``--load`` busy processes running, waits for ``/health``, then sends ``--setups`` ``/setup`` requests (new
projects, the TREC label config) one after another and records each latency; ``--runs`` times. With
``--baseline REV`` it measures the same against git revision REV (checked out in a temporary worktree, same
virtualenv) in the same run.

    .venv/bin/python bench/cold_setup.py [--load 6] [--runs 3] [--setups 4] [--baseline HEAD~1] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import TREC_CONFIG as CONFIG  # noqa: E402
from tests.conftest import free_port  # noqa: E402


def busy(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def one_run(tree: Path, setups: int) -> dict:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="molal-cold-"))
    env = {**os.environ, "MODEL_DIR": str(tmp / "state"), "MOLAL_BIND": f"127.0.0.1:{port}", "MOLAL_WORKERS": "2",
           "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LOG_LEVEL": "warning"}
    for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "REDIS_URL"):
        env.pop(k, None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(tree / "backend" / "gunicorn.conf.py"),
                             "backend.wsgi:app"], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 300 or proc.poll() is not None:
                raise RuntimeError("the backend did not start")
            time.sleep(0.1)
        boot = time.monotonic() - t0
        lat = []
        for i in range(setups):
            t = time.monotonic()
            r = httpx.post(url + "/setup", json={"project": f"{i + 1}.1", "schema": CONFIG}, timeout=60)
            lat.append(round(time.monotonic() - t, 3))
            assert r.status_code == 200, r.text
        return {"boot_to_health_s": round(boot, 2), "setup_s": lat}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(tree: Path, args) -> dict:
    runs = [one_run(tree, args.setups) for _ in range(args.runs)]
    firsts = [r["setup_s"][0] for r in runs]
    return {"runs": runs, "first_setup_s": {"min": min(firsts), "max": max(firsts)},
            "max_setup_s": max(max(r["setup_s"]) for r in runs),
            "over_3s": sum(x > 3.0 for r in runs for x in r["setup_s"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, default=6, help="busy processes while measuring")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--setups", type=int, default=4)
    ap.add_argument("--baseline", default=None, help="git revision to measure in the same run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=busy, args=(stop,), daemon=True) for _ in range(args.load)]
    for h in hogs:
        h.start()
    base_tree = None
    try:
        res = {"load_processes": args.load, "cpus": os.cpu_count(), "this tree": measure(REPO, args)}
        if args.baseline:
            base_tree = Path(tempfile.mkdtemp(prefix="molal-baseline-"))
            subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.baseline], cwd=REPO,
                           check=True, capture_output=True)
            res[f"baseline {args.baseline}"] = measure(base_tree, args)
    finally:
        stop.set()
        for h in hogs:
            h.join(5)
        if base_tree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, capture_output=True)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
