"""A real PostgreSQL server for tests: Debian's ``postgresql`` binaries, a throw-away cluster on a free loopback
port with password (SCRAM) authentication, one fresh database per test.

A machine without PostgreSQL (or without the ``psycopg`` driver) skips the PostgreSQL half of the state tests,
unless ``MOLAL_REQUIRE_POSTGRES=1`` — CI sets it, so there they fail instead. As root (CI, containers)
the server runs as the ``postgres`` user: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import free_port


def _need(why: str) -> None:
    if os.environ.get("MOLAL_REQUIRE_POSTGRES") == "1":
        pytest.fail(why + " (MOLAL_REQUIRE_POSTGRES=1)")
    pytest.skip(why)


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("initdb")
    return Path(exe).parent if exe else None


class PostgresServer:
    """One running cluster; :meth:`new_database` hands out fresh databases on it."""

    def __init__(self) -> None:
        bindir = _bindir()
        if bindir is None:
            _need("PostgreSQL is not installed (apt-get install -y postgresql); .ci/run installs it")
        try:
            import psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError:
            _need("the PostgreSQL driver is not installed: pip install 'molal[postgres]'")
        self.bindir = bindir
        # its own directory under /tmp: pytest's base (/tmp/pytest-of-root, 0700) is closed to the postgres user
        self.base = base = Path(tempfile.mkdtemp(prefix="molal-pg-"))
        self.data = base / "data"
        self.sock = base / "sock"
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.user = "molal"
        self._as: list[str] = []
        self.sock.mkdir()
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(base, "postgres")
            shutil.chown(self.sock, "postgres")
        pwfile = base / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            shutil.chown(pwfile, "postgres")
        self._run(["initdb", "-D", str(self.data), "-U", self.user, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                   "-E", "UTF8", "--no-sync", "--no-instructions"])
        pwfile.unlink()
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run(["pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(base / "server.log"), "-w", "-t", "60",
                   "start"])
        self.url = f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/postgres"
        self._n = 0

    def _run(self, cmd: list[str]) -> None:
        r = subprocess.run([*self._as, str(self.bindir / cmd[0]), *cmd[1:]], cwd=self.base,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")

    def new_database(self) -> str:
        """A URL of a new, empty database."""
        import psycopg

        self._n += 1
        name = f"t{self._n}_{secrets.token_hex(3)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name

    def stop(self) -> None:
        from molal.db import close_pools

        close_pools()
        try:
            self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"])
        except (RuntimeError, subprocess.SubprocessError):  # pragma: no cover - the directory goes anyway
            pass
        shutil.rmtree(self.base, ignore_errors=True)
