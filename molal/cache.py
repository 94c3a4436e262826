"""The annotation cache: what each annotator said about each text, in SQLite (or PostgreSQL, :mod:`molal.db`).

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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molal.annotators.base import stable_hash
from molal.db import DatabaseError, DatabaseURLError, check_target, describe, is_url, open_database
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
    """The annotation cache in a SQLite file (thread- and multi-process safe: WAL) or, given a
    ``postgresql://`` URL, in PostgreSQL tables that processes on several hosts share."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 60.0) -> None:
        self.timeout = float(timeout)
        try:
            check_target(path, "the annotation cache")  # a mistyped URL is refused before it names a file
        except DatabaseURLError as exc:
            raise CacheError(str(exc)) from None
        self.url = str(path) if is_url(path) else None
        self.path = Path(path) if self.url is None else None
        if self.path is not None:
            ensure_dir(self.path.parent)
            if not self.path.exists():
                # create owner-only before SQLite opens it; SQLite gives -wal/-shm the same mode
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, FILE_MODE)
                os.close(fd)
        self.target = describe(path)
        try:
            self.db = open_database(path, _SCHEMA, "cache", max_idle=4, timeout=self.timeout)
        except DatabaseURLError as exc:
            raise CacheError(str(exc)) from None
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?) ON CONFLICT DO NOTHING",
                                (str(SCHEMA_VERSION),))
        except (sqlite3.DatabaseError, DatabaseError) as exc:
            raise CacheError(f"{self.target}: not a usable molal annotation cache ({exc})") from exc
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise CacheError(f"{self.target}: cache schema version {row[0]} is newer than this molal ({SCHEMA_VERSION})")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> AnnotationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API -------------------------------------------------------------------------------------------
    def get_many(
        self, identity: Mapping[str, Any] | str, texts: Sequence[str], n_classes: int | None = None,
        keys: Sequence[str] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray | None] | None]:
        """For each text, ``(probs, consistency|None)`` if cached for this identity, else None. ``keys``: the
        texts' :func:`text_key` when the caller has them (a lookup for several identities hashes once)."""
        ident = identity_key(identity)
        hashes = list(keys) if keys is not None else [text_key(t) for t in texts]
        if len(hashes) != len(texts):
            raise ValueError(f"{len(hashes)} keys for {len(texts)} texts")
        found: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        uniq = list(dict.fromkeys(hashes))
        for s in range(0, len(uniq), _CHUNK):
            part = uniq[s : s + _CHUNK]
            q = (
                "SELECT text_hash, n_classes, probs, consistency FROM annotations WHERE ident=? AND text_hash IN "
                f"({','.join('?' * len(part))})"
            )
            rows = self.db.retry(lambda q=q, part=part: self.db.execute(q, [ident, *part]))
            for th, k, p, c in rows:
                if n_classes is not None and k != n_classes:
                    continue
                found[th] = (
                    np.frombuffer(bytes(p), dtype=np.float64).copy(),
                    None if c is None else np.frombuffer(bytes(c), dtype=np.float64).copy(),
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
        rows.sort(key=lambda r: r[1])  # one key order for every writer: concurrent upserts cannot deadlock

        def tx() -> None:
            # not exclusive: rows are upserted by key, so writers need no lock beyond the rows they touch
            with self.db.transaction(exclusive=self.db.dialect == "sqlite") as c:
                if ident_json is not None:
                    c.execute(
                        "INSERT INTO identities(ident, identity_json, created) VALUES(?,?,?) ON CONFLICT DO NOTHING",
                        (ident, ident_json, now),
                    )
                c.executemany(
                    "INSERT INTO annotations(ident, text_hash, n_classes, probs, consistency, created) "
                    "VALUES(?,?,?,?,?,?) ON CONFLICT (ident, text_hash) DO UPDATE SET n_classes=excluded.n_classes, "
                    "probs=excluded.probs, consistency=excluded.consistency, created=excluded.created",
                    rows,
                )

        self.db.retry(tx)
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
        if identity is None:
            return int(self.db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0])
        return int(self.db.execute("SELECT COUNT(*) FROM annotations WHERE ident=?",
                                   (identity_key(identity),)).fetchone()[0])

    def identities(self) -> list[dict[str, Any]]:
        """The identities stored (as dicts), for inspection."""
        rows = self.db.execute("SELECT identity_json FROM identities ORDER BY created")
        return [json.loads(r[0]) for r in rows]

    def clear(self, identity: Mapping[str, Any] | str | None = None) -> int:
        """Delete the rows of one identity (or everything); returns how many were deleted."""
        if identity is None:
            cur = self.db.retry(lambda: self.db.execute("DELETE FROM annotations"))
        else:
            cur = self.db.retry(lambda: self.db.execute("DELETE FROM annotations WHERE ident=?",
                                                        (identity_key(identity),)))
        return int(cur.rowcount)
