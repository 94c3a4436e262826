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
