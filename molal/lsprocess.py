"""Start and stop a REAL headless Label Studio (and the molal backend under gunicorn) as subprocesses.

Used by the end-to-end tests and by ``molal demo``. Facts relied on (docs/…/label-studio.md, measured on
Label Studio 1.23.2):

* the first start of a new data directory runs the Django migrations (~40 s on 2 cores). We run
  ``label-studio init --data-dir T --quiet`` once (no user: the template holds no account) and cache ``T``
  under ``$MOLAL_LS_TEMPLATE`` or ``~/.cache/molal/ls-template-<version>``; every new server copies it
  (~6 s to a healthy server);
* ``label-studio start`` creates the admin user from ``LABEL_STUDIO_USERNAME``/``_PASSWORD`` and sets its
  legacy token to ``LABEL_STUDIO_USER_TOKEN`` (> 5 chars; needs ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN``);
* a busy port makes Label Studio silently move to port+1: we pick a free port, check health on exactly
  that port and then check that *our* token is accepted there (so a foreign server is never mistaken
  for ours);
* ``--internal-host 127.0.0.1`` (the default binds 0.0.0.0);
* Label Studio reports server errors, 2% of request traces (with user data) and the browser's errors to
  sentry.io unless ``LABEL_STUDIO_SENTRY_DSN`` / ``LABEL_STUDIO_FRONTEND_SENTRY_DSN`` are empty. We empty
  them (no data leaves the machine; measured offline, an annotation POST took 0.19 s in-process with
  Sentry on and 0.10 s with it off).

Logs go to ``<data_dir>/label-studio.log`` and ``<model_dir>/backend.log``. Error messages quote the
log tail with secrets scrubbed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

from molal.logging import register_secret, scrub

DB_NAME = "label_studio.sqlite3"


class ProcessStartError(RuntimeError):
    """A subprocess did not become healthy; the message carries the (scrubbed) log tail."""


def ls_version() -> str:
    try:
        return metadata.version("label-studio")
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "Label Studio is not installed: pip install 'molal[labelstudio]' (or pip install label-studio)") from exc


def ls_executable() -> str:
    """The ``label-studio`` script next to this interpreter (the venv's), else the one on PATH."""
    cand = Path(sys.executable).with_name("label-studio")
    if cand.exists():
        return str(cand)
    found = shutil.which("label-studio")
    if not found:
        raise RuntimeError("the label-studio command was not found: pip install 'molal[labelstudio]'")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port whose successor is free too (Label Studio moves to P+1 when P is busy)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port < 65535 and port_free(port, host) and port_free(port + 1, host):
            return port
    raise RuntimeError("no free port found")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on ``port`` (Label Studio's own test: a connect succeeds) and a server could bind it
    (SO_REUSEADDR like gunicorn/uvicorn, so TIME_WAIT leftovers of a stopped server do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as c:
        c.settimeout(1.0)
        if c.connect_ex((host, port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _http_json(url: str, token: str | None = None, timeout: float = 2.0) -> tuple[int, object]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Token {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - local URL we built
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, None
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, None


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "(no log)"
    return scrub("\n".join(lines))


def _stop_group(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM the process group, wait, then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _base_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # never let an outer Label Studio / backend configuration leak into the child
    for k in list(env):
        if k.startswith("LABEL_STUDIO_") or k in ("DJANGO_DB", "DJANGO_SETTINGS_MODULE"):
            env.pop(k)
    env.update({
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        # no telemetry to sentry.io (see the module docstring)
        "LABEL_STUDIO_SENTRY_DSN": "",
        "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def template_dir() -> Path:
    """Where the migrated template lives (``MOLAL_LS_TEMPLATE`` or ``~/.cache/molal/ls-template-<ver>``)."""
    env = os.environ.get("MOLAL_LS_TEMPLATE")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "molal" / f"ls-template-{ls_version()}"


def ensure_template(timeout: float = 600.0) -> Path:
    """Build the migrated, user-less Label Studio data directory once (file-locked; atomic rename)."""
    tdir = template_dir()
    if (tdir / DB_NAME).exists():
        return tdir
    tdir.parent.mkdir(parents=True, exist_ok=True)
    with open(tdir.parent / (tdir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if (tdir / DB_NAME).exists():
            return tdir
        tmp = Path(tempfile.mkdtemp(prefix=tdir.name + ".tmp-", dir=tdir.parent))
        log = tmp.parent / (tdir.name + ".init.log")
        env = _base_env(tmp)
        with open(log, "wb") as fh:
            proc = subprocess.run([ls_executable(), "init", "--data-dir", str(tmp), "--quiet"], env=env,
                                  stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=timeout, check=False)
        if proc.returncode != 0 or not (tmp / DB_NAME).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ProcessStartError(f"label-studio init failed (rc={proc.returncode}); log {log}:\n{_tail(log)}")
        if tdir.exists():
            shutil.rmtree(tdir, ignore_errors=True)
        os.replace(tmp, tdir)
    return tdir


class LabelStudioProcess:
    """A headless Label Studio on 127.0.0.1:``port`` with one admin user and a legacy API token.

    >>> with LabelStudioProcess(tmp / "ls", port=free_port(), username="a@b.c", password=..., token=...) as ls:
    ...     ls.url, ls.token
    """

    def __init__(self, data_dir: str | Path, port: int | None = None, username: str = "admin@molal.local",
                 password: str | None = None, token: str | None = None, host: str = "127.0.0.1",
                 extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.extra_env = dict(extra_env or {})  # e.g. DJANGO_DB=default + POSTGRE_*: Label Studio on PostgreSQL
        self.port = port or free_port(host)
        self.host = host
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.token = token or secrets.token_hex(20)
        if len(self.token) <= 5:
            raise ValueError("the Label Studio user token must be longer than 5 characters")
        register_secret(self.password)
        register_secret(self.token)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "label-studio.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def prepare(self) -> bool:
        """Copy the migrated template into ``data_dir`` unless it already holds a database.
        Returns True when the directory was new."""
        if (self.data_dir / DB_NAME).exists():
            return False
        tdir = ensure_template()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tdir, self.data_dir, dirs_exist_ok=True)
        return True

    def env(self) -> dict[str, str]:
        env = _base_env(self.data_dir)
        env.update({"LABEL_STUDIO_USERNAME": self.username, "LABEL_STUDIO_PASSWORD": self.password,
                    "LABEL_STUDIO_USER_TOKEN": self.token})
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 180.0) -> LabelStudioProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.prepare()
        if not port_free(self.port, self.host):
            raise ProcessStartError(f"port {self.port} is busy: Label Studio would silently move to another port")
        argv = [ls_executable(), "start", "--no-browser", "--internal-host", self.host, "--port", str(self.port),
                "--data-dir", str(self.data_dir)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(argv, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ProcessStartError(f"Label Studio exited with rc={self.proc.returncode}; "
                                        f"log {self.log_path}:\n{_tail(self.log_path)}")
            try:
                status, body = _http_json(f"{self.url}/health")
                if status == 200:
                    # health on exactly our port; now check that it is *our* server (our token, our user)
                    status, me = _http_json(f"{self.url}/api/current-user/whoami", token=self.token)
                    if status == 200 and isinstance(me, dict) and me.get("email") == self.username:
                        return
                    if status in (401, 403):
                        raise ProcessStartError(
                            f"a server on port {self.port} refuses our token (another Label Studio?); "
                            f"log {self.log_path}:\n{_tail(self.log_path)}")
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise ProcessStartError(f"Label Studio not healthy on {self.url} after {timeout:.0f} s; "
                                f"log {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self, timeout: float = 15.0) -> None:
        _stop_group(self.proc, timeout)

    def client(self):
        """A label-studio-sdk client for this server (base_url and api_key passed explicitly)."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token, timeout=120)

    def __enter__(self) -> LabelStudioProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BackendProcess:
    """The molal backend (``molal serve`` → gunicorn ``backend.wsgi:app``) as a subprocess."""

    def __init__(self, model_dir: str | Path, port: int | None = None, *, label_studio_url: str | None = None,
                 api_key: str | None = None, workers: int = 1, threads: int = 4, host: str = "127.0.0.1",
                 extra_env: dict[str, str] | None = None) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.label_studio_url = label_studio_url
        self.api_key = api_key
        register_secret(api_key)
        self.workers = workers
        self.threads = threads
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = self.model_dir / "backend.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MODEL_DIR"] = str(self.model_dir)
        if self.label_studio_url:
            env["LABEL_STUDIO_URL"] = self.label_studio_url
        if self.api_key:
            env["LABEL_STUDIO_API_KEY"] = self.api_key
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 90.0) -> BackendProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.model_dir.mkdir(parents=True, exist_ok=True)
        if not port_free(self.port, self.host):
            raise ProcessStartError(f"port {self.port} is busy")
        argv = [sys.executable, "-m", "molal.cli.main", "serve", "--host", self.host, "--port", str(self.port),
                "--workers", str(self.workers), "--threads", str(self.threads), "--model-dir", str(self.model_dir)]
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(argv, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ProcessStartError(f"the molal backend exited with rc={self.proc.returncode}; "
                                            f"log {self.log_path}:\n{_tail(self.log_path)}")
                try:
                    status, body = _http_json(f"{self.url}/health")
                    if status == 200 and isinstance(body, dict) and body.get("status") == "UP":
                        return self
                except (OSError, urllib.error.URLError):
                    pass
                time.sleep(0.3)
            raise ProcessStartError(f"the molal backend is not healthy on {self.url} after {timeout:.0f} s; "
                                    f"log {self.log_path}:\n{_tail(self.log_path)}")
        except BaseException:
            self.stop()
            raise

    def get(self, path: str, timeout: float = 10.0) -> object:
        status, body = _http_json(f"{self.url}{path}", timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}")
        return body

    def stop(self, timeout: float = 20.0) -> None:
        _stop_group(self.proc, timeout)

    def __enter__(self) -> BackendProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
