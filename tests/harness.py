"""Real-process scaffolding shared by the tests (faults, fuzz) and the bench scripts (bench/load.py,
bench/backend.py): the ML backend under gunicorn — directly or through ``molal serve`` — on a free loopback
port, waited for until ``/health`` answers, and stopped with its whole process group; the gunicorn master's
worker processes; a small JSON HTTP server on 127.0.0.1 to stand in for Label Studio.

Test-and-bench code, not product code. The bench scripts run as ``.venv/bin/python bench/x.py``: they put
the repository root on ``sys.path`` before ``from tests.harness import ...``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import ParseResult, urlparse

from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent


def start_gunicorn(
    model_dir: Path,
    env_extra: dict[str, str | None] | None = None,
    workers: int = 2,
    log: Any = None,
    *,
    threads: int | None = None,
    serve_cli: bool = False,
    poll_s: float = 0.2,
    timeout_s: float = 120.0,
    extra_args: list[str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """The backend (``backend.wsgi:app``, ``backend/gunicorn.conf.py``) on a free 127.0.0.1 port, in a new
    process group; returns once ``/health`` answers 200: ``(process, base url)``.

    ``env_extra`` is added to this process's environment (a ``None`` value removes the variable);
    ``serve_cli`` launches it through the product's ``molal serve`` command instead of gunicorn directly;
    ``log`` (a binary file) gets its stdout and stderr (else both are discarded); ``extra_args`` go to gunicorn's
    command line (they override the config file, e.g. ``["-k", "gthread"]``). Raises RuntimeError (after
    killing it) when it exits or does not answer within ``timeout_s``."""
    import httpx

    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(model_dir), "MOLAL_BIND": f"127.0.0.1:{port}",
           "MOLAL_WORKERS": str(workers), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    if threads is not None:
        env["MOLAL_THREADS"] = str(threads)
    for k, v in (env_extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    if serve_cli:
        argv = [str(Path(sys.executable).with_name("molal")), "serve", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers), "--threads", env.get("MOLAL_THREADS", "4")]
    else:
        argv = [sys.executable, "-m", "gunicorn", "-c", str(REPO / "backend" / "gunicorn.conf.py"), *(extra_args or []),
                "backend.wsgi:app"]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log else subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
            kill_group(proc)
            where = f"; see {log.name}" if isinstance(getattr(log, "name", None), str) else ""
            raise RuntimeError(f"gunicorn did not start (rc={proc.poll()}){where}")
        time.sleep(poll_s)


#: words for :func:`long_texts`
WORDS = ("river mountain question answer city country person number date money reason method animal plant "
         "colour music sport food language disease organisation product event vehicle instrument law").split()


def long_texts(n: int, chars: int, seed: int = 0) -> list[str]:
    """``n`` different texts of ``chars`` characters of words (each new to every cache: the heaviest input the
    text limits allow), the same for the same ``seed``."""
    import random

    rnd = random.Random(seed)
    out = []
    for i in range(n):
        words, size = [f"text {i}:"], 8
        while size < chars:
            w = rnd.choice(WORDS)
            words.append(w)
            size += len(w) + 1
        out.append(" ".join(words)[:chars])
    return out


def stop_gunicorn(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group (gunicorn stops gracefully); SIGKILL it after ``grace_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)


def sigkill_when(proc: subprocess.Popen, count: Any, at_least: int, timeout_s: float) -> None:
    """SIGKILL ``proc`` as soon as ``count()`` (polled every 50 ms; an exception reads as 0) reaches
    ``at_least``: a writer killed mid-run. Fails if ``proc`` ends first; ``proc`` never outlives the call."""
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            time.sleep(0.05)
            try:
                n = count()
            except Exception:  # noqa: BLE001 - the database may not be there or readable yet
                n = 0
            if n >= at_least:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and everything in its group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def worker_pids(master: int) -> set[int]:
    """The child processes of ``master`` (a gunicorn master's workers), from /proc."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                    out.add(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


class JSONServer:
    """A threaded HTTP server on a free 127.0.0.1 port answering GET, POST, PATCH and DELETE with JSON: subclasses
    implement :meth:`respond` (it runs in the server's threads). ``url`` is its base URL; :meth:`close`."""

    def __init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                status, obj = server.respond(self.command, urlparse(self.path), raw)
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle  # noqa: N815

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def respond(self, method: str, url: ParseResult, body: bytes) -> tuple[int, Any]:
        """(HTTP status, JSON-able answer) for one request; ``url`` is the parsed request path."""
        raise NotImplementedError

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()
