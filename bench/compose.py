"""Build and start-up times of the compose stack with podman (issue 28): runs tests/e2e/test_compose.py (the
images built here, docker/docker-compose.yml brought up by podman-compose, the Start Training flow on the RQ
worker, the worker killed mid-job, the whole stack restarted) and prints what it timed, as JSON and a table.

    .venv/bin/python bench/compose.py --cold --wheels /path/to/llama-cpp-python-wheel-folder \\
        --json-out bench/out/compose.json

``--cold`` removes the images first (the Debian base, the stand-ins, molal's two) so every build starts from
nothing, as on a clean CI machine; without it podman's layer cache makes the builds near instant. Needs root,
podman, runc, debootstrap and podman-compose (see tests/compose/stack.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.compose.stack import (  # noqa: E402
    BASE_IMAGE,
    LLAMACPP_IMAGE,
    MOLAL_IMAGE,
    PREFIX,
    PYTHON_IMAGE,
    STANDINS,
    Podman,
    new_workdir,
)


def remove_images() -> None:
    pm = Podman(new_workdir() / "podman.log")
    names = [*STANDINS.values(), *(f"{PREFIX}/{n}:latest" for n in STANDINS), MOLAL_IMAGE, LLAMACPP_IMAGE,
             PYTHON_IMAGE, BASE_IMAGE]
    pm.podman("rmi", "-f", *names, check=False)
    pm.podman("image", "prune", "-f", check=False)
    pm.podman("builder", "prune", "-f", check=False)  # dangling build layers (podman 4.3: may be absent)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="remove the images first (builds from nothing)")
    ap.add_argument("--wheels", action="append", default=[], help="extra wheel folder for the builds (find-links)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    if args.cold:
        remove_images()
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        env = {**os.environ, "MOLAL_COMPOSE_REPORT": str(report), "MOLAL_REQUIRE_COMPOSE": "1",
               "MOLAL_COMPOSE_WHEELS": os.pathsep.join(args.wheels)}
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "compose",
                             str(REPO / "tests/e2e/test_compose.py")], env=env, cwd=REPO).returncode
        out = json.loads(report.read_text()) if report.exists() else {}
    out.update({"cold": args.cold, "pytest_rc": rc, "pytest_wall_s": round(time.monotonic() - t0, 1)})
    print(json.dumps(out, indent=2))
    rows = [(f"build {k}", v) for k, v in out.get("build_s", {}).items()]
    rows += [(k, out[k]) for k in ("build_total_s", "up_s", "up_to_healthy_s", "first_training_job_s",
                                   "killed_job_settled_s", "restart_to_healthy_s", "pytest_wall_s") if k in out]
    width = max(len(k) for k, _ in rows) if rows else 10
    print(f"\n{'step':<{width}}  seconds")
    for k, v in rows:
        print(f"{k:<{width}}  {v:>7}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
