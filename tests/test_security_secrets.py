"""No form of the PostgreSQL URL, good or mistyped, prints its password (issue 25, B): not the library's
exceptions (their whole chain), not the log, not a job's row, not ``molal jobs``, not ``molal serve`` nor
gunicorn run directly (the traceback and the line gunicorn repeats). Most forms need no database: they fail
while being read, or on a closed port."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

#: two fragments of every password below: neither may appear anywhere
FRAGMENTS = ("s3cr3t", "Zq8rX")
SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY);"


def forms(port: int) -> dict[str, str]:
    """Mistyped and good URLs; ``port`` is closed (nothing listens there)."""
    return {
        "bad percent-escape": "postgresql://molal:Pw-s3cr3t%ZZ@127.0.0.1:5432/molal",
        "postgres:// scheme, bad escape": "postgres://molal:Pw-s3cr3t%ZZ-Zq8rX@127.0.0.1:5432/molal",
        "libpq keyword string": "host=127.0.0.1 port=5432 user=molal password=Pw-s3cr3t dbname=molal",
        "keyword string, quoted": f"host=127.0.0.1 port={port} password='Pw s3cr3t Zq8rX' dbname=molal",
        "?password= with a bad escape": "postgresql://molal@host/db?password=Pw-s3cr3t%ZZ",
        "raw / in the password": "postgresql://molal:Pw-s3cr3t/Zq8rX@127.0.0.1:5432/molal",
        "raw ? in the password": "postgresql://molal:Pw-s3cr3t?Zq8rX@127.0.0.1:5432/molal",
        "raw # in the password": "postgresql://molal:Pw-s3cr3t#Zq8rX@127.0.0.1:5432/molal",
        "raw @ in the password": f"postgresql://molal:Pw-s3cr3t@Zq8rX@127.0.0.1:{port}/molal",
        "raw : and quotes (a good URL)": f"postgresql://molal:Pw:s3cr3t'\"Zq8rX@127.0.0.1:{port}/molal",
        "no // after the scheme": "postgresql:molal:Pw-s3cr3t@127.0.0.1:5432/molal",
        "no scheme": "molal:Pw-s3cr3t@127.0.0.1:5432/molal",
        "%00 in the password": "postgresql://molal:Pw-s3cr3t%00Zq8rX@127.0.0.1:5432/molal",
        "%FF (not UTF-8)": "postgresql://molal:Pw-s3cr3t%FFZq8rX@127.0.0.1:5432/molal",
        "a short escape %2": "postgresql://molal:Pw-s3cr3t%2@127.0.0.1:5432/molal",
        "%25 (a good URL)": f"postgresql://molal:Pw-s3cr3t%25Zq8rX@127.0.0.1:{port}/molal",
        "bad port": "postgresql://molal:Pw-s3cr3t@127.0.0.1:Zq8rX/molal",
        "unknown query parameter": f"postgresql://molal@127.0.0.1:{port}/molal?pasword=Pw-s3cr3t",
        "a line break": f"postgresql://molal:Pw-s3cr3t\n@127.0.0.1:{port}/molal",
        "unreachable, good URL": f"postgresql://molal:Pw-s3cr3t@127.0.0.1:{port}/molal?connect_timeout=3",
        "another scheme": "mysql://molal:Pw-s3cr3t@127.0.0.1:3306/molal",
    }


def _chain(exc: BaseException) -> str:
    """Everything an exception can show: its formatted chain, repr, args, and every __cause__/__context__
    (even a suppressed one) with theirs."""
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out += ["".join(traceback.format_exception(exc)), repr(exc), repr(exc.args), str(vars(exc))]
        if hasattr(exc, "errors"):
            try:
                out.append(repr(exc.errors()))
            except Exception:  # noqa: BLE001
                pass
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


def _leaks(text: str) -> list[str]:
    return [f for f in FRAGMENTS if f in text]


@pytest.fixture()
def captured_log():
    """The root logger's output through molal's own handler and formatter (as `molal serve` logs)."""
    from molal.logging import RedactingFilter, _install_record_factory

    _install_record_factory()
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    h.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.addHandler(h)
    try:
        yield buf
    finally:
        root.removeHandler(h)


def test_no_url_form_prints_its_password_in_library_exceptions_or_logs(tmp_path, captured_log, monkeypatch):
    """Every entry point that takes a URL (Settings, ServiceStore, open_database, AnnotationCache, JobQueue),
    every form: the exception (and its chain) and the log line of it hold no part of the password."""
    from molal.cache import AnnotationCache
    from molal.config import get_settings
    from molal.db import open_database
    from molal.service.jobs import JobQueue
    from molal.service.store import ServiceStore

    monkeypatch.delenv("MOLAL_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # a URL taken for a path would make files here
    log = logging.getLogger("molal.test")
    calls = {
        "Settings": lambda u: get_settings(model_dir=tmp_path, database_url=u),
        "ServiceStore": lambda u: ServiceStore(tmp_path / "md", database_url=u).project(1),
        "open_database": lambda u: open_database(u, SCHEMA, "test").execute("SELECT 1"),
        "AnnotationCache": lambda u: AnnotationCache(u).count(),
        "JobQueue": lambda u: JobQueue(u).list(),
    }
    leaked, refused = [], 0
    for what, url in forms(free_port()).items():
        for entry, call in calls.items():
            if entry == "Settings" and "unreachable" in what:
                continue  # a good URL: Settings does not connect
            try:
                call(url)
            except Exception as exc:  # noqa: BLE001 - any exception: its text is the point
                refused += 1
                log.error("%s failed: %s", entry, exc, exc_info=exc)
                if _leaks(_chain(exc)):
                    leaked.append(f"{entry} / {what}: {_leaks(_chain(exc))}")
            else:
                if entry != "Settings" or what not in ("raw : and quotes (a good URL)", "%25 (a good URL)"):
                    leaked.append(f"{entry} / {what}: accepted")
    assert not leaked, "\n".join(leaked)
    assert refused > 90
    assert not _leaks(captured_log.getvalue()), captured_log.getvalue()[-3000:]
    assert not list((tmp_path / "md").glob("**/*.db")), "a refused URL created state"


def test_the_password_is_not_in_a_job_row_nor_its_log(tmp_path, captured_log, monkeypatch):
    """A job that opens a database at a mistyped URL fails; its row (message, error, result) — what
    `molal jobs <id>`, GET /jobs and the log show — holds no part of the password."""
    from molal.cache import AnnotationCache
    from molal.service.jobs import JobQueue, execute

    monkeypatch.chdir(tmp_path)
    q = JobQueue(tmp_path / "jobs.db")
    leaked = []
    for what, url in forms(free_port()).items():
        job, _ = q.enqueue(1, "annotate", {"n": what})
        claimed = q.claim(job["id"])

        def runner(ctx, url=url):
            AnnotationCache(url).count()
            return {"ok": True}

        row = execute(q, claimed, runner)
        if row["status"] != "failed":
            leaked.append(f"{what}: accepted")
        elif _leaks(repr(row)):
            leaked.append(f"{what}: {row['error'][:300]}")
    assert not leaked, "\n".join(leaked)
    assert not _leaks(captured_log.getvalue()), captured_log.getvalue()[-3000:]


def _molal(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "molal.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOLAL_", "PG"))}
    env.update(MODEL_DIR=str(tmp_path / "md"), PYTHONPATH=str(REPO), **extra)
    return env


def test_molal_jobs_prints_no_password(tmp_path):
    """`molal jobs` (and every command that reads the settings) with a mistyped URL: one clear line naming
    the variable, none of its value; with a good URL to a closed port or PGPASSWORD: the server's error only."""
    port = free_port()
    f = forms(port)
    cases = {k: {"MOLAL_DATABASE_URL": f[k]} for k in (
        "bad percent-escape", "libpq keyword string", "?password= with a bad escape", "raw / in the password",
        "no // after the scheme", "unreachable, good URL")}
    cases["PGPASSWORD, no password in the URL"] = {
        "MOLAL_DATABASE_URL": f"postgresql://molal@127.0.0.1:{port}/molal", "PGPASSWORD": "Pw-s3cr3t-Zq8rX"}
    for what, extra in cases.items():
        r = _molal("jobs", env=_env(tmp_path, **extra))
        out = r.stdout + r.stderr
        assert r.returncode != 0, (what, out)
        assert not _leaks(out), (what, out)
        assert "Traceback" not in out and out.startswith("error: "), (what, out)
        if "unreachable" not in what and "PGPASSWORD" not in what:
            assert "MOLAL_DATABASE_URL cannot be used" in out and "postgresql://USER:PASSWORD@" in out, out
        else:
            assert f"postgresql://127.0.0.1:{port}/molal" in out and "refused" in out, out


def _serve_output(cmd: list[str], env: dict, timeout: float = 120) -> tuple[int, str]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow
def test_molal_serve_and_gunicorn_print_no_password(tmp_path):
    """`molal serve` refuses a mistyped URL before gunicorn starts; gunicorn run directly (the Docker image's
    command) stops at its start hook; a good URL to a closed port fails the worker's boot — in every case
    neither the traceback nor the line gunicorn repeats after it shows the password (~20 s)."""
    port = free_port()
    bad = forms(port)["bad percent-escape"]
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", str(REPO / "backend" / "gunicorn.conf.py"), "--bind",
                f"127.0.0.1:{free_port()}", "--workers", "1", "backend.wsgi:app"]
    rc, out = _serve_output([sys.executable, "-m", "molal.cli.main", "serve", "--port", str(free_port()),
                             "--workers", "1"], _env(tmp_path, MOLAL_DATABASE_URL=bad))
    assert rc == 2 and not _leaks(out) and "MOLAL_DATABASE_URL cannot be used" in out, out
    assert "gunicorn" not in out.lower(), out  # refused before gunicorn started
    rc, out = _serve_output(gunicorn, _env(tmp_path, MOLAL_DATABASE_URL=bad))
    assert rc != 0 and not _leaks(out) and "MOLAL_DATABASE_URL cannot be used" in out, out
    rc, out = _serve_output(gunicorn, _env(tmp_path, MOLAL_DATABASE_URL=forms(port)["unreachable, good URL"]))
    assert rc != 0 and not _leaks(out), out
    assert f"postgresql://127.0.0.1:{port}/molal" in out and "Worker failed to boot" in out, out
