"""molal.lsprocess against real processes: port checks and clean stops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from molal.lsprocess import BackendProcess, LabelStudioProcess, ProcessStartError, port_free


def test_busy_port_is_refused_not_silently_moved(label_studio, tmp_path):
    # Label Studio would move to port+1 silently; we refuse instead of talking to the wrong server
    other = LabelStudioProcess(tmp_path / "ls2", port=label_studio.port, username="x@y.z")
    with pytest.raises(ProcessStartError, match="busy"):
        other.start(timeout=30)
    assert other.proc is None


def test_running_server_is_ours(label_studio):
    me = label_studio.client().users.whoami()
    assert me.email == label_studio.username
    assert (label_studio.data_dir / "label-studio.log").exists()
    assert label_studio.password not in (label_studio.data_dir / "label-studio.log").read_text(errors="replace")


def test_label_studio_telemetry_is_off(label_studio):
    # Label Studio reports to sentry.io by default (server errors, sampled traces, the browser's errors);
    # the servers we start have it off: offline machines, and annotators' data stays on the machine
    import httpx

    with httpx.Client(base_url=label_studio.url, timeout=10, follow_redirects=True) as h:
        h.get("/user/login/")
        h.post("/user/login/", data={"email": label_studio.username, "password": label_studio.password,
                                     "csrfmiddlewaretoken": h.cookies["csrftoken"]})
        page = h.get("/projects/").text  # the app's page (base.html) carries the browser's Sentry settings
    assert "sentry_environment" in page and "sentry_dsn: null," in page
    assert "ingest.sentry.io" not in page
    env = Path(f"/proc/{label_studio.proc.pid}/environ").read_bytes().split(b"\0")
    assert b"LABEL_STUDIO_SENTRY_DSN=" in env  # the server side: sentry_sdk is not initialised


def test_backend_process_stops_its_whole_group(tmp_path):
    b = BackendProcess(tmp_path / "m", workers=2, threads=1)
    b.start()
    pgid = b.proc.pid
    assert b.get("/health")["status"] == "UP"
    b.stop()
    assert b.proc.poll() is not None
    assert port_free(b.port)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # no gunicorn worker left behind
