"""The annotation cache: what each annotator said about each text, in SQLite.

Keyed by (sha256 of the annotator identity JSON, sha256 of the exact text). Values: the class
probabilities and (optional) consistency as float64 blobs. The database runs in WAL mode with a busy
timeout, so several processes/threads may read and write at once; every :meth:`AnnotationCache.put_many`
is one small transaction, so a run killed mid-way keeps everything it committed and the next run only
annotates the rest. The file (and its -wal/-shm companions) is created owner-only (0600).

Only successfully annotated rows are ever stored: failures are not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molal.annotators.base import stable_hash
from molal.io import FILE_MODE, ensure_dir

SCHEMA_VERSION = 1
_CHUNK = 500  # SQLite host-parameter limit safety

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    ident TEXT PRIMARY KEY, identity_json TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS annotations (
    ident TEXT NOT NULL, text_hash TEXT NOT NULL, n_classes INTEGER NOT NULL,
    probs BLOB NOT NULL, consistency BLOB, created REAL NOT NULL,
    PRIMARY KEY (ident, text_hash)) WITHOUT ROWID;
"""


class CacheError(RuntimeError):
    """The cache file is unusable (not a molal cache, newer schema, corrupted)."""


def identity_key(identity: Mapping[str, Any] | str) -> str:
    """sha256 of the canonical identity JSON (a str is taken as an already computed key)."""
    if isinstance(identity, str):
        return identity
    return stable_hash(dict(identity))


def text_key(text: str) -> str:
    """sha256 of the exact text (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AnnotationCache:
    """SQLite annotation cache. Thread-safe (one connection per thread) and multi-process safe (WAL)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = float(timeout)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        ensure_dir(self.path.parent)
        if not self.path.exists():
            # create owner-only before SQLite opens it; SQLite gives -wal/-shm the same mode
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, FILE_MODE)
            os.close(fd)
        conn = self._conn()
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path}: not a usable molal annotation cache ({exc})") from exc
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise CacheError(f"{self.path}: cache schema version {row[0]} is newer than this molal ({SCHEMA_VERSION})")

    # -- connections -----------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        pid = getattr(self._local, "pid", None)
        if conn is not None and pid == os.getpid():
            return conn
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # pragma: no cover - e.g. some network filesystems
                raise CacheError(f"{self.path}: cannot switch the cache to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._retry(lambda: conn.executescript(_SCHEMA))
            self._retry(
                lambda: conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            )
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"{self.path}: not a usable molal annotation cache ({exc})") from exc
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            try:
                if side.exists() and side.stat().st_uid == os.getuid():
                    os.chmod(side, FILE_MODE)
            except OSError:
                pass
        self._local.conn, self._local.pid = conn, os.getpid()
        with self._lock:
            self._conns.append(conn)
        return conn

    def _retry(self, fn, attempts: int = 20):
        """Run ``fn``, retrying 'database is locked' beyond the busy timeout (rare under WAL)."""
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or i == attempts - 1:
                    raise
                time.sleep(min(0.05 * 2**i, 1.0))
        return None  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            for c in self._conns:
                try:
                    c.close()
                except sqlite3.Error:  # pragma: no cover
                    pass
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> AnnotationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API -------------------------------------------------------------------------------------------
    def get_many(
        self, identity: Mapping[str, Any] | str, texts: Sequence[str], n_classes: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray | None] | None]:
        """For each text, ``(probs, consistency|None)`` if cached for this identity, else None."""
        ident = identity_key(identity)
        hashes = [text_key(t) for t in texts]
        found: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        conn = self._conn()
        uniq = list(dict.fromkeys(hashes))
        for s in range(0, len(uniq), _CHUNK):
            part = uniq[s : s + _CHUNK]
            q = (
                "SELECT text_hash, n_classes, probs, consistency FROM annotations WHERE ident=? AND text_hash IN "
                f"({','.join('?' * len(part))})"
            )
            rows = self._retry(lambda q=q, part=part: conn.execute(q, [ident, *part]).fetchall())
            for th, k, p, c in rows:
                if n_classes is not None and k != n_classes:
                    continue
                found[th] = (
                    np.frombuffer(p, dtype=np.float64).copy(),
                    None if c is None else np.frombuffer(c, dtype=np.float64).copy(),
                )
        return [found.get(h) for h in hashes]

    def put_many(
        self,
        identity: Mapping[str, Any] | str,
        texts: Sequence[str],
        probs: np.ndarray,
        consistency: np.ndarray | None = None,
    ) -> int:
        """Store rows (one transaction). Rows must be finite distributions; returns the number stored."""
        ident = identity_key(identity)
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[0] != len(texts):
            raise ValueError(f"probs must have shape ({len(texts)}, K), got {probs.shape}")
        if not np.isfinite(probs).all():
            raise ValueError("refusing to cache non-finite probabilities (failed rows must not be cached)")
        if consistency is not None:
            consistency = np.asarray(consistency, dtype=np.float64)
            if consistency.shape != probs.shape or not np.isfinite(consistency).all():
                raise ValueError("consistency must be finite with the same shape as probs")
        now = time.time()
        rows = [
            (
                ident,
                text_key(t),
                probs.shape[1],
                probs[i].tobytes(),
                None if consistency is None else consistency[i].tobytes(),
                now,
            )
            for i, t in enumerate(texts)
        ]
        ident_json = json.dumps(identity, sort_keys=True, default=str) if not isinstance(identity, str) else None
        conn = self._conn()

        def tx() -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if ident_json is not None:
                    conn.execute(
                        "INSERT OR IGNORE INTO identities(ident, identity_json, created) VALUES(?,?,?)",
                        (ident, ident_json, now),
                    )
                conn.executemany(
                    "INSERT OR REPLACE INTO annotations(ident, text_hash, n_classes, probs, consistency, created) "
                    "VALUES(?,?,?,?,?,?)",
                    rows,
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        self._retry(tx)
        return len(rows)

    def get(self, identity: Mapping[str, Any] | str, text: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        return self.get_many(identity, [text])[0]

    def put(
        self, identity: Mapping[str, Any] | str, text: str, probs: np.ndarray, consistency: np.ndarray | None = None
    ) -> None:
        self.put_many(
            identity, [text], np.asarray(probs)[None, :], None if consistency is None else np.asarray(consistency)[None, :]
        )

    def count(self, identity: Mapping[str, Any] | str | None = None) -> int:
        conn = self._conn()
        if identity is None:
            return int(conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0])
        return int(conn.execute("SELECT COUNT(*) FROM annotations WHERE ident=?", (identity_key(identity),)).fetchone()[0])

    def identities(self) -> list[dict[str, Any]]:
        """The identities stored (as dicts), for inspection."""
        rows = self._conn().execute("SELECT identity_json FROM identities ORDER BY created").fetchall()
        return [json.loads(r[0]) for r in rows]

    def clear(self, identity: Mapping[str, Any] | str | None = None) -> int:
        """Delete the rows of one identity (or everything); returns how many were deleted."""
        conn = self._conn()
        if identity is None:
            cur = self._retry(lambda: conn.execute("DELETE FROM annotations"))
        else:
            cur = self._retry(lambda: conn.execute("DELETE FROM annotations WHERE ident=?", (identity_key(identity),)))
        return int(cur.rowcount)
