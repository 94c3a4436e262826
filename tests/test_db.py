"""molal.db: one interface over SQLite and PostgreSQL (dialect translation, rows, errors that hide passwords)."""

from __future__ import annotations

import pytest

from molal.db import DatabaseError, describe, is_url, open_database, pg_schema
from molal.logging import scrub


def test_urls_are_told_from_paths_and_shown_without_credentials():
    assert is_url("postgresql://u:p@h:5432/db") and is_url("postgres://h/db")
    assert not is_url("/var/lib/molal/jobs.db") and not is_url("mysql://h/db")
    assert describe("postgresql://molal:s3cret@db.internal:5433/molal") == "postgresql://db.internal:5433/molal"
    assert "s3cret" not in describe("mysql://u:s3cret@h/db")
    assert "s3cret" not in describe("postgresql://u:s3cret@h:notaport/db")
    assert "s3cret" not in scrub("connecting to postgresql://molal:s3cret@db:5432/molal failed")


def test_one_schema_text_for_both_dialects():
    pg = pg_schema("CREATE TABLE t (a INTEGER PRIMARY KEY, b REAL, c BLOB, d TEXT) WITHOUT ROWID;")
    assert pg == "CREATE TABLE t (a BIGINT PRIMARY KEY, b DOUBLE PRECISION, c BYTEA, d TEXT);"


def _roundtrip(db) -> None:
    db.execute("INSERT INTO t(k, v, b) VALUES(?, ?, ?) ON CONFLICT (k) DO UPDATE SET v=excluded.v", ("a", 1.5, b"x"))
    db.execute("INSERT INTO t(k, v, b) VALUES(?, ?, ?) ON CONFLICT (k) DO UPDATE SET v=excluded.v", ("a", 2.5, b"x"))
    row = db.execute("SELECT k, v, b FROM t WHERE k=?", ("a",)).fetchone()
    assert row["k"] == row[0] == "a" and row["v"] == 2.5 and bytes(row["b"]) == b"x"
    assert dict(row) == {"k": "a", "v": 2.5, "b": row["b"]}
    with pytest.raises(RuntimeError), db.transaction() as c:
        c.execute("INSERT INTO t(k, v, b) VALUES(?, ?, ?)", ("gone", 0.0, b""))
        raise RuntimeError("rolled back")
    assert db.execute("SELECT COUNT(*) AS n FROM t").fetchone()["n"] == 1
    assert db.execute("DELETE FROM t WHERE k=?", ("a",)).rowcount == 1
    # a time.time() keeps its sub-second part (PostgreSQL's REAL would not)
    db.execute("INSERT INTO t(k, v, b) VALUES(?, ?, ?)", ("t", 1764640000.123456, b""))
    assert db.execute("SELECT v FROM t WHERE k='t'").fetchone()[0] == 1764640000.123456


SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v REAL NOT NULL, b BLOB);"


def test_statements_rows_and_transactions_read_the_same(state_db):
    _roundtrip(open_database(state_db.target("t"), SCHEMA, "test"))


@pytest.mark.postgres
def test_an_unreachable_server_is_a_clear_error_without_the_password(postgres_server):
    from tests.conftest import free_port

    url = f"postgresql://molal:hunter2-secret@127.0.0.1:{free_port()}/molal?connect_timeout=2"
    db = open_database(url, SCHEMA, "test")
    with pytest.raises(DatabaseError) as err:
        db.execute("SELECT 1")
    assert f"postgresql://127.0.0.1:{url.split(':')[3].split('/')[0]}/molal" in str(err.value)
    assert "hunter2" not in str(err.value)
    bad = postgres_server.url.replace(postgres_server.password, "wrong-password")
    with pytest.raises(DatabaseError, match="password authentication failed") as err:
        open_database(bad, SCHEMA, "test").execute("SELECT 1")
    assert "wrong-password" not in str(err.value)


def test_urls_are_parsed_before_use_and_refused_without_quoting_them():
    """parse_pg_url: libpq's parameters from a URL (percent-decoded; several hosts; query parameters), the shown
    form, the secrets; every error names no part of the text."""
    from molal.db import DatabaseURLError, check_target, parse_pg_url

    pg = parse_pg_url("postgresql://mo%40lal:p%40ss%3Aw%2Fo%3Frd%23%25@h1:5433,[::1]/my%20db?sslmode=require"
                      "&application_name=x")
    assert pg.params == {"user": "mo@lal", "password": "p@ss:w/o?rd#%", "host": "h1,::1", "port": "5433,",
                         "dbname": "my db", "sslmode": "require", "application_name": "x"}
    assert pg.shown == str(pg) == "postgresql://h1:5433,[::1]/my%20db"
    assert "p@ss" not in repr(pg) and "p%40ss" not in repr(pg) and "p@ss:w/o?rd#%" in pg.secrets
    assert pg.scrub('token "p@ss:w/o?rd#%" and p%40ss%3Aw%2Fo%3Frd%23%25') == 'token "***" and ***'
    assert parse_pg_url("postgres://u@h/db?password=x%20y").params["password"] == "x y"
    assert parse_pg_url(" postgresql://h/db\n").params == {"host": "h", "dbname": "db"}  # a secret file's newline
    for bad, why in [("postgresql://u:se%ZZcret@h/db", "'%'"), ("postgresql://u:se/cret@h/db", "raw '/'"),
                     ("host=h password=secret", "keyword string"), ("postgresql://u:secret@h:99999/db", "port"),
                     ("postgresql://u:se%00cret@h/db", "NUL"), ("postgresql://u:se%FFcret@h/db", "UTF-8"),
                     ("postgresql://h/db?secret=1", "query parameter 1"), ("mysql://u:secret@h/db", "mysql://"),
                     ("postgresql:u:secret@h/db", "not a postgresql:// URL")]:
        with pytest.raises(DatabaseURLError, match="postgresql://USER:PASSWORD@") as err:
            parse_pg_url(bad, "MOLAL_DATABASE_URL")
        assert why in str(err.value) and "secret" not in str(err.value).replace("PASSWORD", "")
        assert err.value.__context__ is None and err.value.__cause__ is None
    for path in ("/var/lib/molal/cache.db", "cache.sqlite", "data@2024/c.db"):
        check_target(path)  # ordinary paths pass
    for dsn in ("host=h password=secret", "u:secret@h/db", "redis://u:secret@h/0"):
        with pytest.raises(DatabaseURLError):
            check_target(dsn)
        assert "secret" not in describe(dsn)


@pytest.mark.postgres
def test_a_password_with_every_special_character_connects(postgres_server, tmp_path, monkeypatch):
    """The parsed URL reaches libpq as keywords: a role whose password holds @ : / ? # % & ' " \\ and spaces
    connects with it percent-encoded (in the user part or ?password=), from a passfile, or from a service file."""
    from urllib.parse import quote

    import psycopg

    from molal.db import close_pools

    pw = "p@ss:w/o?r#d%&'\" \\ x"
    sq = pw.replace("'", "''")
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE odd LOGIN PASSWORD '{sq}'")  # noqa: S608 - a test's own constant
    db = postgres_server.new_database().rsplit("/", 1)[1]
    port = postgres_server.port
    for url in (f"postgresql://odd:{quote(pw, safe='')}@127.0.0.1:{port}/{db}",
                f"postgres://odd@127.0.0.1:{port}/{db}?password={quote(pw, safe='')}"):
        assert open_database(url, "", "test").execute("SELECT 1 AS one").fetchone()["one"] == 1
        close_pools()
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{port}:{db}:odd:{pw.replace(chr(92), chr(92) * 2).replace(':', chr(92) + ':')}\n")
    passfile.chmod(0o600)
    url = f"postgresql://odd@127.0.0.1:{port}/{db}?passfile={quote(str(passfile), safe='')}"
    assert open_database(url, "", "test").execute("SELECT 1").fetchone()[0] == 1
    close_pools()
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[molal]\nhost=127.0.0.1\nport={port}\ndbname={db}\nuser=odd\npassword={pw}\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    assert open_database("postgresql://?service=molal", "", "test").execute("SELECT 1").fetchone()[0] == 1
    close_pools()
    with pytest.raises(DatabaseError, match="password authentication failed") as err:
        open_database(f"postgresql://odd:{quote(pw[:-1], safe='')}@127.0.0.1:{port}/{db}", SCHEMA, "t2").execute("SELECT 1")
    assert "p@ss" not in str(err.value) and "x" not in str(err.value).split("failed")[-1].replace("odd", "")


def test_a_fork_while_another_thread_holds_the_pools_lock_does_not_hang_the_child():
    """RQ forks a work horse while `molal worker`'s reaper thread may be inside molal.db (holding the pools'
    lock, e.g. while it applies the schema): the child gets a fresh lock instead of waiting forever."""
    import os
    import threading

    from molal import db

    held, release = threading.Event(), threading.Event()

    def hold():
        with db._POOLS_LOCK:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: the lock the other thread holds in the parent is free here
            os._exit(0 if db._POOLS_LOCK.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        t.join(5)
