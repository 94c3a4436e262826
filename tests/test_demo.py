"""``molal demo --no-wait`` end to end: real Label Studio + real gunicorn backend, then the project is
checked through Label Studio's API (restarted on the demo's data directory = the idempotent reuse path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def _run_demo(data_dir: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOLAL_STUDENT_MAX_LENGTH="32", COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "molal.cli.main", "demo", "--data-dir", str(data_dir), "--tasks", "250",
                           "--no-wait", *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_no_wait_then_reuse(tmp_path):
    from molal.lsprocess import LabelStudioProcess

    data = tmp_path / "demo"
    password = "demo-pass-4821"
    r = _run_demo(data, "--password", password)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "SIMULATED" in out and "MoLAM" in out and "llm:qwen" in out
    assert password in r.stdout  # printed once for the user ...
    for log in (data / "label-studio" / "label-studio.log", data / "backend" / "backend.log"):
        assert password not in log.read_text(errors="replace")  # ... never logged
    state = json.loads((data / "demo-state.json").read_text())
    assert (os.stat(data / "demo-state.json").st_mode & 0o077) == 0
    version = state["version"]
    assert version.startswith("molam-")

    # both processes were stopped: start Label Studio again on the same data and check the project via the API
    ls = LabelStudioProcess(data / "label-studio", username=state["username"], password=state["password"],
                            token=state["token"])
    with ls:
        c = ls.client()
        tasks = [t.model_dump() for t in c.tasks.list(project=state["project"], fields="all", page_size=500)]
        assert len(tasks) == 250
        labeled = [t for t in tasks if t["annotations"]]
        assert len(labeled) == 50
        classes = {"abbreviation", "entity", "description", "human", "location", "numeric"}
        unl = [t for t in tasks if not t["annotations"]]
        for t in unl:
            preds = {p["model_version"]: p for p in t["predictions"]}
            assert version in preds
            assert preds[version]["result"][0]["value"]["choices"][0] in classes
        gold = state["gold"]
        acc = sum({p["model_version"]: p for p in t["predictions"]}[version]["result"][0]["value"]["choices"][0]
                  == gold[str(t["id"])] for t in unl) / len(unl)
        assert acc > 0.5, acc

    # second run: reuses the data directory (no new project, no new training)
    r2 = _run_demo(data)
    out2 = r2.stdout + r2.stderr
    assert r2.returncode == 0, out2[-4000:]
    assert "reused data directory" in out2
    assert json.loads((data / "demo-state.json").read_text())["project"] == state["project"]


def test_brief_is_one_line_with_the_reason_and_never_headers():
    """What the demo prints for a failed Label Studio call: status + Label Studio's reason, no headers."""
    from label_studio_sdk.core.api_error import ApiError

    from molal.demo import brief

    err = ApiError(status_code=400, headers={"set-cookie": "sessionid=abc123; csrftoken=def"},
                   body={"detail": "Validation error", "validation_errors": {"url": ["Can't connect:\n read timed out"]}})
    assert brief(err) == "HTTP 400: Can't connect: read timed out"
    long = brief(ApiError(status_code=502, headers={}, body="x " * 400))
    assert long.startswith("HTTP 502: x x") and long.endswith(" …") and len(long) < 320
    assert brief(ConnectionError("refused")) == "ConnectionError: refused"
    assert "abc123" not in brief(err) and "sessionid" not in str(err.body)
