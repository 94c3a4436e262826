"""molal's state databases behind one small interface: SQLite files (the embedded default) or PostgreSQL.

Three things keep state in a database: the job table (:mod:`molal.service.jobs`), each project's state
(:mod:`molal.service.store`) and the annotation cache (:mod:`molal.cache`). They all talk to a
:class:`Database` and write one SQL text for both dialects:

* placeholders are ``?`` (translated to the driver's ``%s`` for PostgreSQL);
* upserts are ``INSERT ... ON CONFLICT (...) DO UPDATE/NOTHING`` (SQLite 3.24+ and PostgreSQL alike);
* a schema is written once with SQLite's type names; :func:`pg_schema` maps ``INTEGER`` to ``BIGINT``,
  ``REAL`` to ``DOUBLE PRECISION`` (PostgreSQL's ``REAL`` is 4 bytes: a ``time.time()`` would lose its
  seconds), ``BLOB`` to ``BYTEA`` and drops ``WITHOUT ROWID``;
* :meth:`Database.transaction` is an *exclusive* transaction by default: SQLite's ``BEGIN IMMEDIATE``
  (one writer per file), PostgreSQL's ``BEGIN`` plus a transaction-level advisory lock named after the
  database's namespace (``jobs``, ``project``, ``cache``), so a read-then-write (claiming a job, counting)
  means the same on both;
* rows read by name (``row["id"]``), by position (``row[0]``) and convert with ``dict(row)``.

:func:`open_database` takes a path (SQLite) or a ``postgresql://`` URL. PostgreSQL connections come from one
:class:`psycopg_pool.ConnectionPool` per URL and process (opened again after a fork).

The URL's password is never printed. :func:`parse_pg_url` reads every URL before anything else touches it:
a URL it cannot read (a bad ``%`` escape, a raw ``@``/``/``/``#`` in the password, a libpq keyword string,
another scheme) is a :class:`DatabaseURLError` that names no part of it; a good one becomes libpq's
parameters, which reach psycopg as keywords (libpq's own parser, whose errors quote what they cannot read,
never sees the text), the form shown (``postgresql://host:port/dbname``, :func:`describe`) and the secrets,
registered with :mod:`molal.logging` and removed from every driver message molal passes on.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, unquote_to_bytes

from molal.io import FILE_MODE, ensure_dir

T = TypeVar("T")

PG_SCHEMES = ("postgresql", "postgres")


class DatabaseError(RuntimeError):
    """The state database cannot be used (unreachable server, missing driver, not molal's database)."""


def is_url(target: object) -> bool:
    """Whether ``target`` names a PostgreSQL server (``postgresql://`` or ``postgres://``) rather than a file."""
    return isinstance(target, str) and target.split("://", 1)[0].strip().lower() in PG_SCHEMES and "://" in target


# -- database URLs ---------------------------------------------------------------------------------------------
class DatabaseURLError(DatabaseError, ValueError):
    """A database URL (or a string that was meant as one) molal cannot use. The message names no part of it
    beyond a well-known scheme: a mistyped URL may hold its password anywhere."""


#: how to write a URL molal reads (every URL error ends with it)
URL_HELP = ("write it as postgresql://USER:PASSWORD@HOST:PORT/DBNAME, percent-encoding any @ : / ? # % & or space "
            "in the user name, password and parameters (Python: urllib.parse.quote(password, safe=''))")
#: libpq's connection parameters (``?key=value`` in a URL); psycopg adds those of the installed libpq
_LIBPQ_KEYWORDS = frozenset((
    "application_name", "channel_binding", "client_encoding", "connect_timeout", "dbname",
    "fallback_application_name", "gssdelegation", "gssencmode", "gsslib", "host", "hostaddr", "keepalives",
    "keepalives_count", "keepalives_idle", "keepalives_interval", "krbsrvname", "load_balance_hosts",
    "max_protocol_version", "min_protocol_version", "oauth_client_id", "oauth_client_secret", "oauth_issuer",
    "oauth_scope", "options", "passfile", "password", "port", "replication", "require_auth", "requirepeer",
    "scram_client_key", "scram_server_key", "service", "ssl_max_protocol_version", "ssl_min_protocol_version",
    "sslcert", "sslcertmode", "sslcompression", "sslcrl", "sslcrldir", "sslkey", "sslkeylogfile", "sslmode",
    "sslnegotiation", "sslpassword", "sslrootcert", "sslsni", "target_session_attrs", "tcp_user_timeout", "user",
))
#: parameters whose values are secrets (never shown, redacted from every message and log)
_SECRET_KEYWORDS = frozenset(("password", "sslpassword", "oauth_client_secret", "scram_client_key",
                              "scram_server_key"))
#: other schemes named in an error (any other is "not a postgresql:// URL": a scheme is shown only when known)
_KNOWN_SCHEMES = frozenset(("mysql", "mariadb", "sqlite", "sqlite3", "redis", "rediss", "http", "https",
                            "mssql", "oracle", "mongodb", "file", "jdbc"))
_KEYWORD_STRING = re.compile(r"\s*([A-Za-z_]+)\s*=")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_NO_SCHEME_URL = re.compile(r"^[^/\s:@]+:[^@]*@")  # user:password@host... without its postgresql://


@functools.lru_cache(maxsize=1)
def _keywords() -> frozenset[str]:
    try:
        from psycopg import pq

        return _LIBPQ_KEYWORDS | {o.keyword.decode() for o in pq.Conninfo.get_defaults()}
    except Exception:  # no driver (or no libpq): the static list
        return _LIBPQ_KEYWORDS


@dataclass(frozen=True, eq=False)
class PGParams:
    """A parsed PostgreSQL URL: libpq's connection parameters (for ``psycopg.connect(**params)``: no text of the
    user's reaches libpq's own parser, whose errors quote it), the URL as it may be shown, and the secrets to
    redact. Its ``repr`` and ``str`` are the shown form."""

    shown: str
    params: dict[str, str] = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)

    def __str__(self) -> str:
        return self.shown

    def scrub(self, text: str) -> str:
        """``text`` without any of this URL's secrets (as written, decoded or percent-encoded)."""
        for s in sorted(self.secrets, key=len, reverse=True):
            if len(s) >= 3:
                text = text.replace(s, "***")
        return text


def _secret_forms(raw: str, decoded: str | None) -> list[str]:
    out = [raw]
    if decoded is not None:
        out += [decoded, quote(decoded, safe=""), quote(decoded)]
    return [s for s in out if s]


def _register(secrets: list[str]) -> None:
    from molal.logging import register_secret

    for s in secrets:
        register_secret(s)


def parse_pg_url(text: object, name: str = "the database URL") -> PGParams:
    """Parse and check a ``postgresql://`` (or ``postgres://``) URL — ``USER:PASSWORD@HOST:PORT,.../DBNAME?k=v``
    as libpq reads it — or raise :class:`DatabaseURLError`, whose message says what is wrong and names no part of
    the text (``name``, e.g. ``MOLAL_DATABASE_URL``, says which setting). Strict where libpq would guess: the
    user name and password end at the last ``@`` and may not hold a raw ``/ ? # @``; every ``%`` must start a
    two-digit escape of UTF-8 text; no control characters; query parameters must be libpq's. The secrets found
    (even in a URL refused) are registered with :mod:`molal.logging`, so no log line shows them either."""
    found: list[str] = []

    def fail(reason: str) -> DatabaseURLError:
        _register(found)
        return DatabaseURLError(f"{name} cannot be used: {reason}; {URL_HELP}")

    if not isinstance(text, str):
        raise fail("it is not text")
    s = text.strip()
    head, sep, rest = s.partition("://")
    if "@" in s and sep:  # the likely password, registered before anything can fail
        userinfo = rest[:rest.rfind("@")] if "@" in rest else ""
        found += _secret_forms(userinfo.partition(":")[2], None)
    for m in re.finditer(r"(?i)(?:^|[?&\s])(?:ssl)?password=([^&\s]*)", s):
        found += _secret_forms(m.group(1), None)
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        raise fail("it holds a control character (a line break, a tab?)")
    if not sep:
        if _KEYWORD_STRING.match(s) and _KEYWORD_STRING.match(s).group(1).lower() in _keywords():
            raise fail("it is a libpq keyword string (host=... dbname=...), not a URL")
        raise fail("it is not a postgresql:// URL")
    scheme = head.lower()
    if scheme not in PG_SCHEMES:
        raise fail(f"it is a {scheme}:// URL, not a postgresql:// one" if scheme in _KNOWN_SCHEMES
                   else "it is not a postgresql:// URL")

    def unq(part: str, what: str) -> str:
        if _BAD_PERCENT.search(part):
            raise fail(f"{what} holds a '%' that does not start a two-digit escape (a literal % is %25)")
        raw = unquote_to_bytes(part)
        try:
            out: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:  # (its text quotes a byte: raised below, not chained)
            out = None
        if out is None:
            raise fail(f"{what} is not UTF-8 text once percent-decoded")
        if "\0" in out:
            raise fail(f"{what} holds a NUL character (%00)")
        return out

    params: dict[str, str] = {}
    at = rest.rfind("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1:]
        user_raw, colon, pw_raw = userinfo.partition(":")
        if any(c in userinfo for c in "/?#@"):
            raise fail("the user name and password (before the last '@') hold a raw '/', '?', '#' or '@'")
        if user_raw:
            params["user"] = unq(user_raw, "the user name")
        if colon:
            params["password"] = unq(pw_raw, "the password")
            found += _secret_forms(pw_raw, params["password"])
    if "#" in rest:
        raise fail("it holds a raw '#'")
    hostpart, _, query = rest.partition("?")
    hosts, slash, path = hostpart.partition("/")
    names: list[str] = []
    ports: list[str] = []
    if hosts:
        for h in hosts.split(","):
            if h.startswith("["):
                end = h.find("]")
                if end < 0:
                    raise fail("an IPv6 host has no closing ']'")
                host, tail = h[1:end], h[end + 1:]
                if tail and not tail.startswith(":"):
                    raise fail("a host has characters after its IPv6 address")
                port = tail[1:]
            else:
                host, _, port = h.partition(":")
            if port and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise fail("a port is not a number from 1 to 65535")
            names.append(unq(host, "a host name"))
            ports.append(port)
        if any(names):
            params["host"] = ",".join(names)
        if any(ports):
            params["port"] = ",".join(ports)
    if slash and path:
        params["dbname"] = unq(path, "the database name")
    if query:
        known = _keywords()
        for i, item in enumerate(query.split("&"), 1):
            if not item:
                continue
            k_raw, eq, v_raw = item.partition("=")
            key = unq(k_raw, f"query parameter {i}'s name")
            if not eq or key not in known:
                raise fail(f"query parameter {i} is not key=value with a libpq parameter name (host, port, "
                           "sslmode, connect_timeout, ...)")
            params[key] = unq(v_raw, "the password" if key == "password" else f"the value of {key}")
            if key in _SECRET_KEYWORDS:
                found += _secret_forms(v_raw, params[key])
    if "port" in params and not all(p.isdigit() and 1 <= int(p) <= 65535 for p in params["port"].split(",") if p):
        raise fail("a port is not a number from 1 to 65535")
    host_list = params.get("host", "").split(",")
    port_list = params.get("port", "").split(",")
    shown_hosts = []
    for i, h in enumerate(host_list):
        p = port_list[i] if len(port_list) == len(host_list) else (port_list[0] if len(port_list) == 1 else "")
        h = h or "localhost"
        h = f"[{h}]" if ":" in h else quote(h, safe="")
        shown_hosts.append(h + (f":{p}" if p else ""))
    shown = f"{scheme}://{','.join(shown_hosts)}/{quote(params.get('dbname', ''), safe='')}"
    if "service" in params:
        shown += f" (service {quote(params['service'], safe='')})"
    pg = PGParams(shown, params, tuple(dict.fromkeys(found)))
    _register(list(pg.secrets))
    return pg


def check_target(target: object, name: str = "the database") -> None:
    """Refuse (:class:`DatabaseURLError`, naming no part of it) a database target meant as a path that reads
    as a connection string instead: a URL of any scheme but PostgreSQL's that molal cannot read, a libpq
    keyword string (``host=... password=...``), ``user:password@host`` without its scheme. A good
    ``postgresql://`` URL and an ordinary file path pass."""
    if not isinstance(target, str):
        return
    s = target.strip()
    if "://" in s or (_KEYWORD_STRING.match(s) and _KEYWORD_STRING.match(s).group(1).lower() in _keywords()) \
            or _NO_SCHEME_URL.match(s) or s.lower().startswith(tuple(f"{p}:" for p in PG_SCHEMES)):
        parse_pg_url(s, name)


def describe(target: object) -> str:
    """A database target as it may be shown: a file path, or ``postgresql://host:port/dbname`` without the user
    and password (a string that is neither reads as a placeholder)."""
    if isinstance(target, PGParams):
        return target.shown
    if not isinstance(target, str):
        return str(target)
    if is_url(target):
        try:
            return parse_pg_url(target).shown
        except DatabaseURLError:
            return "<a database URL that cannot be read>"
    if "://" in target:  # another service's URL (a Ray address): scheme, host and port, when nothing else is there
        scheme, _, rest = target.strip().partition("://")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,20}", scheme):
            return "<a URL that cannot be read>"
        if "@" in rest or not re.fullmatch(r"[A-Za-z0-9.\-]*(:[0-9]{1,5})?(/[^?#]*)?", rest):
            return f"{scheme}://<…>"
        return f"{scheme}://{rest}"
    try:
        check_target(target)
    except DatabaseURLError:
        return "<a database connection string that cannot be read>"
    return target


class Row(tuple):
    """One row of a PostgreSQL result, readable like :class:`sqlite3.Row`: by position, by column name, and
    ``dict(row)``."""

    _names: dict[str, int]

    def __new__(cls, values: Sequence[Any], names: dict[str, int]) -> Row:
        r = super().__new__(cls, values)
        r._names = names
        return r

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


class Rows(list):
    """The rows of one statement, fetched before its connection went back to the pool; ``rowcount`` is the
    number of rows the statement changed."""

    rowcount: int = -1

    def fetchone(self) -> Any:
        return self[0] if self else None

    def fetchall(self) -> list:
        return list(self)


class Cursor(Protocol):
    """What a transaction body may call (both dialects)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows: ...

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> None: ...


class Database(Protocol):
    """A state database: statements, exclusive transactions, retries of transient conflicts."""

    dialect: str  # "sqlite" | "postgresql"
    target: str  # the path, or the URL as :func:`describe` prints it

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows: ...

    def transaction(self, exclusive: bool = True) -> Any: ...  # a context manager yielding a Cursor

    def retry(self, fn: Callable[[], T], attempts: int = 20) -> T: ...

    def close(self) -> None: ...


# -- SQLite ----------------------------------------------------------------------------------------------------
def _set_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switch the database to WAL (a persistent property of the file). Switching needs an exclusive lock,
    and SQLite answers "database is locked" at once, without the busy handler, while another connection
    holds one: two gunicorn workers opening a fresh MODEL_DIR together hit it. Retry until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":  # pragma: no cover - e.g. some network filesystems
                    raise DatabaseError(f"cannot switch {conn} to WAL mode (got {mode})")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def connect_sqlite(path: Path, timeout: float = 30.0) -> sqlite3.Connection:
    """A WAL-mode SQLite connection with a busy timeout, created owner-only."""
    ensure_dir(path.parent)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE)
        os.close(fd)
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    _set_wal(conn, timeout)
    conn.execute("PRAGMA synchronous=NORMAL")
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        try:
            if side.exists() and side.stat().st_uid == os.getuid():
                os.chmod(side, FILE_MODE)
        except OSError:
            pass
    return conn


class _SQLiteCursor:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        cur = self.conn.execute(sql, params)
        rows = Rows(cur.fetchall())
        rows.rowcount = cur.rowcount
        return rows

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, seq)


class SQLiteDB:
    """A small pool of connections to one SQLite file (schema applied by the first connection).

    A statement borrows a connection and returns it with its rows already fetched, so the number of open
    files does not grow with the number of threads that ever touched the database: at most ``max_idle``
    connections (3 file descriptors each: the database, its WAL and shared-memory files) stay open between
    statements. :meth:`close` closes the idle ones; connections still lent out are closed when returned.
    ``migrate`` (if given) runs once, with the first connection, inside an exclusive transaction."""

    dialect = "sqlite"

    def __init__(self, path: str | os.PathLike[str], schema: str, max_idle: int = 2, timeout: float = 30.0,
                 migrate: Callable[[Cursor], None] | None = None) -> None:
        self.path = Path(path)
        self.target = str(self.path)
        self.schema = schema
        self.max_idle = max_idle
        self.timeout = timeout
        self.migrate = migrate
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._schema_done = False
        self._closed = False

    def _take(self) -> sqlite3.Connection:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's connections are not ours to use or close
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
            first = not self._schema_done
        try:
            c = connect_sqlite(self.path, self.timeout)
            if first:
                self.retry(lambda: self._apply_schema(c))
                self._schema_done = True
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"{self.path}: not a usable molal database ({exc})") from exc
        return c

    def _apply_schema(self, c: sqlite3.Connection) -> None:
        c.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(self.schema):
                c.execute(stmt)
            if self.migrate is not None:
                self.migrate(_SQLiteCursor(c))
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def _give(self, c: sqlite3.Connection) -> None:
        with self._lock:
            if not self._closed and self._pid == os.getpid() and len(self._idle) < self.max_idle \
                    and not c.in_transaction:
                self._idle.append(c)
                return
        c.close()

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        c = self._take()
        try:
            yield c
        finally:
            self._give(c)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        with self.connection() as c:
            return _SQLiteCursor(c).execute(sql, params)

    @contextmanager
    def transaction(self, exclusive: bool = True) -> Iterator[Cursor]:
        """``BEGIN IMMEDIATE`` (``BEGIN`` if not ``exclusive``) ... ``COMMIT``, ``ROLLBACK`` on an exception."""
        with self.connection() as c:
            c.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")
            try:
                yield _SQLiteCursor(c)
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def retry(self, fn: Callable[[], T], attempts: int = 20) -> T:
        """Run ``fn``, retrying 'database is locked' beyond the busy timeout (rare under WAL)."""
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or i == attempts - 1:
                    raise
                time.sleep(min(0.05 * 2**i, 1.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


# -- PostgreSQL ------------------------------------------------------------------------------------------------
_TYPE_MAP = [(re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
             (re.compile(r"\bBLOB\b"), "BYTEA"), (re.compile(r"\s*\bWITHOUT ROWID\b"), "")]


def pg_schema(schema: str) -> str:
    """A schema written with SQLite's type names, in PostgreSQL's."""
    for pat, repl in _TYPE_MAP:
        schema = pat.sub(repl, schema)
    return schema


def _statements(schema: str) -> list[str]:
    return [s.strip() for s in schema.split(";") if s.strip()]


def _pg_sql(sql: str) -> str:
    if "%" in sql:
        raise ValueError("molal's SQL must not contain '%' (it is the PostgreSQL driver's placeholder)")
    return sql.replace("?", "%s")


def _lock_key(name: str) -> int:
    """A signed 63-bit advisory-lock key for a namespace (stable across processes and hosts)."""
    return int.from_bytes(hashlib.sha256(f"molal:{name}".encode()).digest()[:8], "big") >> 1


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    desc = cursor.description
    names = {c.name: i for i, c in enumerate(desc)} if desc else {}
    return lambda values: Row(values, names)


_POOLS: dict[tuple[str, int], Any] = {}
_POOLS_LOCK = threading.Lock()
_INHERITED: list[Any] = []
_SCHEMAS_DONE: set[tuple[str, int, str]] = set()


def _new_lock_after_fork() -> None:
    """In a forked child, a fresh ``_POOLS_LOCK``: another thread of the parent may have held it at the fork (a
    first version of ``molal worker``'s reaper was such a thread when RQ forked a work horse), and that thread
    does not exist here to release it — the child would wait on it forever. Pools and schemas are per pid, so
    the child starts its own anyway."""
    global _POOLS_LOCK
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


def _pool(url: str, params: PGParams, max_size: int) -> Any:
    """The process's connection pool for ``url`` (a fresh one after a fork: a parent's sockets are not ours)."""
    key = (url, os.getpid())
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            try:
                from psycopg_pool import ConnectionPool
            except ImportError as exc:
                raise DatabaseError("a postgresql:// database needs the driver: pip install 'molal[postgres]'") \
                    from exc
            # the parsed parameters, never the URL: libpq's parser quotes what it cannot read
            pool = ConnectionPool("", min_size=0, max_size=max_size, open=True, name="molal",
                                  kwargs={**params.params, "autocommit": True, "row_factory": _row_factory},
                                  timeout=30.0)
            for k in [k for k in _POOLS if k[1] != os.getpid()]:
                # a parent's pool (before a fork, e.g. gunicorn's preload): never used nor closed here — closing
                # would end the parent's sessions on the sockets both processes hold — and kept referenced, so
                # that no finaliser closes it either
                _INHERITED.append(_POOLS.pop(k))
            _POOLS[key] = pool
    return pool


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type's name when it has no text): what an error message quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pg_errors() -> Any:
    import psycopg

    return psycopg


class _PGCursor:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        cur = self.conn.execute(_pg_sql(sql), tuple(params) if params else None)
        rows = Rows(cur.fetchall() if cur.description else [])
        rows.rowcount = cur.rowcount
        return rows

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> None:
        seq = [tuple(p) for p in seq]
        if seq:
            with self.conn.cursor() as cur:
                cur.executemany(_pg_sql(sql), seq)


class PostgresDB:
    """Tables of one namespace (``jobs``, ``project``, ``cache``) in a PostgreSQL database.

    The schema (:func:`pg_schema` of the SQLite one) is applied once per process, under the namespace's advisory
    lock, so processes starting together do not race on ``CREATE TABLE IF NOT EXISTS``."""

    dialect = "postgresql"

    def __init__(self, url: str, schema: str, namespace: str, max_size: int = 8,
                 migrate: Callable[[Cursor], None] | None = None) -> None:
        self._params = parse_pg_url(url)  # parsed and checked before anything else touches it
        self._url = url
        self.target = self._params.shown
        self.schema = pg_schema(schema)
        self.namespace = namespace
        self.max_size = max_size
        self.migrate = migrate
        self._lock_key = _lock_key(namespace)
        self._closed = False

    def _pool(self) -> Any:
        key = (self._url, os.getpid(), self.schema)
        if key not in _SCHEMAS_DONE:
            with _POOLS_LOCK:
                if key not in _SCHEMAS_DONE:
                    self._apply_schema()
                    _SCHEMAS_DONE.add(key)
        return _pool(self._url, self._params, self.max_size)

    def _apply_schema(self) -> None:
        """On a connection of its own, not the pool's: a pool retries a failing connection in the background
        until its timeout, so a wrong password or a stopped server would read "no connection within 30 s";
        here it reads what the server said, at once."""
        try:
            import psycopg
        except ImportError as exc:
            raise DatabaseError("a postgresql:// database needs the driver: pip install 'molal[postgres]'") from exc
        err: DatabaseError | None = None
        try:
            conn = psycopg.connect(**{"connect_timeout": "30", **self._params.params}, autocommit=True)
        except psycopg.Error as exc:  # a refused or unreachable server, a bad parameter value
            err = self._error(exc)
        if err is not None:
            raise err  # outside the handler: the driver's exception is not chained (__context__)
        try:
            with conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                for stmt in _statements(self.schema):
                    conn.execute(stmt)
                if self.migrate is not None:
                    self.migrate(_PGCursor(conn))
        except psycopg.OperationalError as exc:
            err = self._error(exc)
        if err is not None:
            raise err

    def _error(self, exc: BaseException, what: str = "") -> DatabaseError:
        """A :class:`DatabaseError` for a driver's error: the server's first line, the URL's secrets redacted
        (no chained exception: the driver's message is not kept anywhere)."""
        return DatabaseError(f"{self.target}: {what}{self._params.scrub(first_line(exc))}")

    @contextmanager
    def _connection(self, pool: Any) -> Iterator[Any]:
        psycopg = _pg_errors()
        try:
            with pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise self._error(exc) from None
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise self._error(exc, "no database connection within 30 s: ") from None
            raise

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        with self._connection(self._pool()) as conn:
            return _PGCursor(conn).execute(sql, params)

    @contextmanager
    def transaction(self, exclusive: bool = True) -> Iterator[Cursor]:
        """``BEGIN`` ... ``COMMIT`` (``ROLLBACK`` on an exception); ``exclusive`` also takes the namespace's
        advisory lock for the transaction, like SQLite's ``BEGIN IMMEDIATE`` takes the file's write lock."""
        with self._connection(self._pool()) as conn, conn.transaction():
            if exclusive:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            yield _PGCursor(conn)

    def retry(self, fn: Callable[[], T], attempts: int = 20) -> T:
        """Run ``fn``, retrying a deadlock or serialization failure (two transactions upserting the same keys)."""
        psycopg = _pg_errors()
        transient = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
        for i in range(attempts):
            try:
                return fn()
            except transient:
                if i == attempts - 1:
                    raise
                time.sleep(min(0.02 * 2**i, 1.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Nothing to do per object: the process's pool is shared by every database on the same URL."""
        self._closed = True


def open_database(target: str | os.PathLike[str], schema: str, namespace: str, *, max_idle: int = 2,
                  timeout: float = 30.0, migrate: Callable[[Cursor], None] | None = None) -> SQLiteDB | PostgresDB:
    """A :class:`PostgresDB` for a ``postgresql://`` URL, else a :class:`SQLiteDB` file at ``target``
    (:class:`DatabaseURLError` for a string that reads as a connection string molal cannot use)."""
    check_target(target)
    if is_url(target):
        return PostgresDB(str(target), schema, namespace, migrate=migrate)
    return SQLiteDB(Path(target), schema, max_idle=max_idle, timeout=timeout, migrate=migrate)


def close_pools() -> None:
    """Close this process's PostgreSQL pools (tests, and a process about to exit)."""
    with _POOLS_LOCK:
        pools = [p for k, p in _POOLS.items() if k[1] == os.getpid()]
        _POOLS.clear()
        _SCHEMAS_DONE.clear()
    for p in pools:
        p.close()
