"""Time "clone to working demo": a fresh venv + the README's installs, then ``molal demo --no-wait``
(first run, then a second run that reuses the data directory).

    python bench/demo_timing.py --fresh-venv /tmp/venv-bench --out bench/out/demo_timing.json
    python bench/demo_timing.py --python .venv/bin/python      # installed already: demo only

Each phase is a real subprocess; wall-clock seconds are recorded with the machine's load average. The
first run's training job is broken down into its stages from the backend's log (``train_stages``: seconds
from the START_TRAINING webhook to each job message; the per-LLM import runs beside MoLAM and the student).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return time.monotonic() - t, r


JOB_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) INFO molal\.[\w.]+: (?:job \w+ \((?:\w+, )?project \d+\):? |(queued))(.*)$")


def train_stages(backend_log: Path) -> list[tuple[float, str]]:
    """(seconds since the train job was queued, message) for each message of the first train job."""
    from datetime import datetime

    out: list[tuple[float, str]] = []
    t0 = None
    for line in backend_log.read_text(errors="replace").splitlines():
        m = JOB_LINE.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if m.group(2) and t0 is None:
            t0 = t
        if t0 is not None:
            out.append((round(t - t0, 1), (m.group(2) or "") + m.group(3)[:110]))
            if m.group(3).startswith(("succeeded in", "failed")):
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh-venv", type=Path, default=None, help="create this venv and install (README step 1)")
    ap.add_argument("--python", default=sys.executable, help="interpreter with molal installed (no --fresh-venv)")
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "demo_timing.json")
    a = ap.parse_args()
    res: dict = {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "tasks": a.tasks}
    py = a.python
    if a.fresh_venv:
        if a.fresh_venv.exists():
            shutil.rmtree(a.fresh_venv)
        vpy = str(a.fresh_venv / "bin/python")
        # README step 1: torch with pip, then uv, then molal + Label Studio with uv (cold caches)
        steps = [[sys.executable, "-m", "venv", str(a.fresh_venv)],
                 [vpy, "-m", "pip", "install", "-q", "torch==2.13.0"],
                 [vpy, "-m", "pip", "install", "-q", "uv"],
                 [str(a.fresh_venv / "bin/uv"), "pip", "install", "-q", "--python", vpy, "-e", ".[labelstudio,dev]"]]
        t_all = 0.0
        for s in steps:
            dt, r = timed(s, cwd=REPO, env=dict(os.environ, PIP_NO_CACHE_DIR="1", UV_NO_CACHE="1"))
            if r.returncode != 0:
                raise SystemExit(f"{' '.join(s)} failed:\n{r.stderr[-3000:]}")
            res.setdefault("install_steps_s", []).append(round(dt, 1))
            t_all += dt
        res["install_s"] = round(t_all, 1)
        py = str(a.fresh_venv / "bin/python")
    data = Path(tempfile.mkdtemp(prefix="molal-demo-bench-")) / "demo"
    env = dict(os.environ, COLUMNS="120")
    if a.fresh_venv:
        # a fresh machine has no migrated Label Studio template: build it inside the timed first run
        env["MOLAL_LS_TEMPLATE"] = str(data.parent / "ls-template")
    res["template_cached"] = not a.fresh_venv
    for name, extra in (("demo_first_s", ["--fresh"]), ("demo_reuse_s", [])):
        dt, r = timed([py, "-m", "molal.cli.main", "demo", "--data-dir", str(data), "--tasks", str(a.tasks),
                       "--no-wait", *extra], cwd=REPO, env=env)
        if r.returncode != 0:
            raise SystemExit(f"demo failed:\n{(r.stdout + r.stderr)[-3000:]}")
        res[name] = round(dt, 1)
        m = re.search(r"timings: (.*?total [0-9.]+s(?: \(reused data directory\))?)", r.stdout.replace("\n", " "))
        res[name.replace("_s", "_phases")] = re.sub(r"\s+", " ", m.group(1)) if m else None
        acc = re.search(r"MoLAM\s*│\s*([0-9.]+)", r.stdout)
        res["molam_acc"] = float(acc.group(1)) if acc else None
        if name == "demo_first_s":
            res["train_stages"] = train_stages(data / "backend" / "backend.log")
    res["load_after"] = os.getloadavg()
    if "install_s" in res:
        res["clone_to_demo_s"] = round(res["install_s"] + res["demo_first_s"], 1)
    shutil.rmtree(data.parent, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
