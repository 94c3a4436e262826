"""The demo connects its backend to a real Label Studio even when the backend is slow to answer Label
Studio's checks (``/setup`` within 3 s), and fails with one clear line (no headers, cookies or tokens) when
it never answers. The backend here is a real HTTP server whose ``/setup`` is slow on purpose."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from molal.demo import DemoError, connect_backend, create_project, load_rows


class SlowSetupBackend:
    """``/health`` answers at once; the first ``slow_setups`` calls of ``/setup`` take ``delay`` s (more than
    Label Studio's 3 s), later ones answer at once. ``status`` != 200 makes every ``/setup`` fail."""

    def __init__(self, slow_setups: int, delay: float = 4.5, status: int = 200) -> None:
        self.slow_setups, self.delay, self.status = slow_setups, delay, status
        self.setups = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"status": "UP", "model_class": "MolalBackend"})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/setup"):
                    owner.setups += 1
                    if owner.setups <= owner.slow_setups:
                        time.sleep(owner.delay)
                    if owner.status != 200:
                        return self._send(owner.status, {"error": "not ready"})
                    return self._send(200, {"model_version": "molam-0"})
                self._send(200, {})

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # Label Studio hung up on a slow /setup: expected
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def project(ls_client):
    rows, classes = load_rows(None, None, n=5, seed=0)
    pid, _ = create_project(ls_client, "e2e connect", classes, rows)
    yield pid
    ls_client.projects.delete(id=pid)


def test_a_backend_slow_to_answer_setup_is_connected_after_retries(ls_client, project):
    be = SlowSetupBackend(slow_setups=2)
    try:
        t = time.monotonic()
        ml_id = connect_backend(ls_client, project, be.url, deadline_s=60)
        assert be.setups >= 3  # two checks timed out on Label Studio's side, the third one passed
        assert time.monotonic() - t < 60
        (ml,) = [m for m in ls_client.ml.list(project=project)]
        assert int(ml.id) == ml_id and ml.url.rstrip("/") == be.url
    finally:
        be.close()


def test_a_backend_that_never_answers_fails_in_one_line_without_headers(ls_client, project):
    be = SlowSetupBackend(slow_setups=10**6, delay=4.0)
    try:
        t = time.monotonic()
        with pytest.raises(DemoError) as err:
            connect_backend(ls_client, project, be.url, deadline_s=12)
        assert time.monotonic() - t < 40
    finally:
        be.close()
    msg = str(err.value)
    print(msg)
    assert "\n" not in msg and len(msg) < 500, msg
    assert msg.startswith("Label Studio could not connect the molal backend at " + be.url), msg
    for secret in ("set-cookie", "sessionid", "csrftoken", "headers", "Token "):
        assert secret.lower() not in msg.lower(), msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback of the SDK error
    assert not list(ls_client.ml.list(project=project))  # nothing half-connected is left behind
