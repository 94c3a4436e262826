"""Per-project state under ``MODEL_DIR`` (SQLite metadata + versioned model directories).

Layout::

    MODEL_DIR/
      cache.db                       shared annotation cache (molal.cache.AnnotationCache)
      jobs.db                        job table for all projects (molal.service.jobs)
      projects/<id>/                 0700, one per Label Studio project (id validated as an int)
        state.db                     0600 SQLite (WAL): settings, kv, versions, connection, labels
        models/<version>/            one published model (MoLAM + student + manifest.json)
        models/current.json          pointer to the serving version (atomically replaced)

Publishing a model writes every file of ``models/<version>/`` first (atomically), then a manifest with
the sha256 of every file, then swaps ``current.json``. A job killed at any point leaves the previous
pointer (and so the previous model) serving; :func:`read_manifest` refuses a model whose files do not
match their checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from molal.io import FILE_MODE, ArtifactError, atomic_write_json, ensure_dir, sha256_file

_PROJECT_RE = re.compile(r"^\s*(\d{1,12})(?:\.\d+(?:\.\d+)?)?\s*$")


class ProjectIdError(ValueError):
    """The project id sent by Label Studio (or given on the command line) is not a positive integer."""


def parse_project_id(value: object) -> int:
    """Label Studio sends ``"<id>.<created-timestamp>"``; accept that, an int, or ``{"id": N}``.

    Anything else raises :class:`ProjectIdError` — the id is validated before it touches any path."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        raise ProjectIdError(f"project id must be a positive integer, got {value!r}")
    if isinstance(value, int):
        pid = value
    elif isinstance(value, str):
        m = _PROJECT_RE.match(value)
        if not m:
            raise ProjectIdError(f"project must look like '<id>' or '<id>.<timestamp>', got {value[:40]!r}")
        pid = int(m.group(1))
    else:
        raise ProjectIdError(f"project id missing or of type {type(value).__name__}; expected '<id>.<timestamp>'")
    if pid <= 0 or pid >= 10**12:
        raise ProjectIdError(f"project id must be a positive integer below 10**12, got {pid if pid <= 0 else 'a larger one'}")
    return pid


def _set_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switch the database to WAL (a persistent property of the file). Switching needs an exclusive lock,
    and SQLite answers "database is locked" at once, without the busy handler, while another connection
    holds one: two gunicorn workers opening a fresh MODEL_DIR together hit it. Retry until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
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
            if side.exists():
                os.chmod(side, FILE_MODE)
        except OSError:
            pass
    return conn


class Rows(list):
    """The rows of one statement, fetched before its connection went back to the pool."""

    def fetchone(self) -> sqlite3.Row | None:
        return self[0] if self else None

    def fetchall(self) -> list[sqlite3.Row]:
        return list(self)


class SQLiteDB:
    """A small pool of connections to one SQLite file (schema applied by the first connection).

    A statement borrows a connection and returns it with its rows already fetched, so the number of open
    files does not grow with the number of threads that ever touched the database: at most ``max_idle``
    connections (3 file descriptors each: the database, its WAL and shared-memory files) stay open between
    statements. :meth:`close` closes the idle ones; connections still lent out are closed when returned."""

    def __init__(self, path: Path, schema: str, max_idle: int = 2) -> None:
        self.path = Path(path)
        self.schema = schema
        self.max_idle = max_idle
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
        c = connect_sqlite(self.path)
        if first:
            c.executescript(self.schema)
            self._schema_done = True
        return c

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

    def execute(self, sql: str, params: tuple | list = ()) -> Rows:
        with self.connection() as c:
            return Rows(c.execute(sql, params).fetchall())

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception) on one borrowed connection."""
        with self.connection() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


_PROJECT_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS connection (id INTEGER PRIMARY KEY CHECK (id = 1), hostname TEXT, access_token TEXT,
    updated REAL);
CREATE TABLE IF NOT EXISTS versions (version TEXT PRIMARY KEY, n INTEGER NOT NULL, created REAL NOT NULL,
    job_id TEXT, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS auto_labels (task_id INTEGER PRIMARY KEY, label INTEGER NOT NULL, weight REAL NOT NULL,
    negatives TEXT NOT NULL, round INTEGER NOT NULL, created REAL NOT NULL);
"""


def version_name(kind: str, model_dir: str) -> str:
    """The model version predictions of a published model carry: ``molam-3-9f2c`` for directory
    ``3-9f2c41d0`` (the round number and 4 hex digits of the content hash: short enough that Label Studio
    shows it whole, and a model published again after its state was lost still gets a new name)."""
    n, digest = str(model_dir).split("-", 1)
    return f"{kind}-{n}-{digest[:4]}"


FOR_HUMANS_KEY = "for_humans"  # task ids the last human-free round sent to people (human_per_round)


@dataclass
class ProjectSettings:
    """Per-project settings (stored in state.db; unset keys fall back to the environment's Settings)."""

    loop_mode: str = "review"  # review | human_free
    strategy: str = "entropy"
    query_batch: int = 50
    human_per_round: int = 0  # human_free loop: the k least confident MoLAM labels of each batch go to people
    serve_model: str = "molam"  # molam | student
    mixture: str | None = None  # mixture config path (None = Mixture.default())
    priority_field: str = "priority"
    priority_top: int = 200  # priority + review fields for the top N unlabeled tasks only, 0 elsewhere (0 = all)
    per_llm_predictions: bool = True
    train_every: int = 0  # train after N new annotations (0 = only on START_TRAINING)
    from_name: str | None = None  # which <Choices> block (None = the first with a Text target)
    uncertainty_sampling: bool = False  # also set the project's sampling to "Uncertainty sampling"
    student: bool = True  # train the student in each training job
    molam_candidates: str | None = None  # comma list of MoLAM candidates (e.g. "lr_0.1,ds,best_single"); None = all
    molam_text_features: str | None = None  # MoLAM's text model encoder ("minilm"); None = LLM outputs only
    stop_when_stable: bool = False  # human_free loop: query no more tasks once the stopping rule is met
    review_panel: bool = False  # keep the read-only review panel (molal.service.review) in the label config

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


_CHOICES = {"loop_mode": ("review", "human_free"), "serve_model": ("molam", "student")}
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def coerce_setting(key: str, value: Any) -> Any:
    """Validate one project setting (from the CLI or the API); raise ValueError with a clear message."""
    if key not in ProjectSettings.keys():
        raise ValueError(f"unknown project setting {key!r}; known: {', '.join(ProjectSettings.keys())}")
    default = getattr(ProjectSettings(), key)
    kind = type(default) if default is not None else str
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        if key in ("mixture", "from_name", "molam_candidates", "molam_text_features"):
            return None
        raise ValueError(f"{key} cannot be empty")
    if kind is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} must be true/false, got {value!r}")
    if kind is int:
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
        if v < 0 or (key == "query_batch" and v < 1):
            raise ValueError(f"{key} must be {'>= 1' if key == 'query_batch' else '>= 0'}, got {v}")
        return v
    v = str(value)
    if key in _CHOICES and v not in _CHOICES[key]:
        raise ValueError(f"{key} must be one of {list(_CHOICES[key])}, got {v!r}")
    if key == "priority_field" and not _FIELD_RE.match(v):
        raise ValueError(f"priority_field must be an identifier (letters, digits, _), got {v!r}")
    if key == "strategy":
        try:
            from molal.query import STRATEGIES
        except ImportError:  # the query module is not installed yet: accept any name
            STRATEGIES = None
        if STRATEGIES is not None and v not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {v!r}")
    return v


def env_defaults(settings: Any) -> ProjectSettings:
    """Project defaults from the environment (molal.config.Settings)."""
    return ProjectSettings(
        loop_mode=settings.loop_mode,
        strategy=settings.strategy,
        query_batch=settings.query_batch,
        human_per_round=settings.human_per_round,
        serve_model=settings.serve_model,
        mixture=str(settings.mixture) if settings.mixture else None,
        priority_field=settings.priority_field,
        priority_top=settings.priority_top,
        per_llm_predictions=settings.per_llm_predictions,
        train_every=settings.train_every,
        molam_text_features=getattr(settings, "molam_text_features", None),
    )


class ProjectState:
    """State of one Label Studio project in ``MODEL_DIR/projects/<id>/``."""

    def __init__(self, model_dir: Path, project_id: int) -> None:
        self.id = parse_project_id(project_id)
        self.dir = ensure_dir(Path(model_dir) / "projects" / str(self.id))
        os.chmod(self.dir, 0o700)
        self.models_dir = ensure_dir(self.dir / "models")
        self.db = SQLiteDB(self.dir / "state.db", _PROJECT_SCHEMA, max_idle=1)
        self.db.execute("SELECT 1")  # the file and its schema exist from here on (ServiceStore.exists)
        self._pointer_stat: tuple[int, int] | None = None
        self._pointer: dict | None = None

    def close(self) -> None:
        """Close the idle database connections (a later use reopens them)."""
        self.db.close()

    # -- settings ----------------------------------------------------------------------------------
    def settings(self, env: Any) -> ProjectSettings:
        ps = env_defaults(env)
        for row in self.db.execute("SELECT key, value FROM settings"):
            if row["key"] in ProjectSettings.keys():
                setattr(ps, row["key"], json.loads(row["value"]))
        return ps

    def set_setting(self, key: str, value: Any) -> Any:
        v = coerce_setting(key, value)
        self.db.execute("INSERT OR REPLACE INTO settings(key, value) VALUES(?, ?)", (key, json.dumps(v)))
        return v

    def unset_setting(self, key: str) -> None:
        if key not in ProjectSettings.keys():
            raise ValueError(f"unknown project setting {key!r}; known: {', '.join(ProjectSettings.keys())}")
        self.db.execute("DELETE FROM settings WHERE key=?", (key,))

    def stored_settings(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT key, value FROM settings")}

    # -- key/value ---------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def put(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", (key, json.dumps(value)))

    def incr(self, key: str, by: int = 1) -> int:
        with self.db.transaction() as c:
            row = c.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
            v = (json.loads(row["value"]) if row else 0) + by
            c.execute("INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", (key, json.dumps(v)))
        return v

    # -- Label Studio connection (from /setup) -------------------------------------------------------
    def save_connection(self, hostname: str | None, access_token: str | None) -> None:
        """Remember the hostname and token Label Studio sent in /setup (0600 file). Callers store them only
        when :func:`molal.service.lstrust.setup_usable` says the trust rule can use them."""
        if not hostname and not access_token:
            return
        if self.connection() == (hostname, access_token):
            return
        self.db.execute(
            "INSERT OR REPLACE INTO connection(id, hostname, access_token, updated) VALUES(1, ?, ?, ?)",
            (hostname, access_token, time.time()),
        )

    def connection(self) -> tuple[str | None, str | None]:
        row = self.db.execute("SELECT hostname, access_token FROM connection WHERE id=1").fetchone()
        if not row:
            return (None, None)
        return (row["hostname"], row["access_token"])

    # -- model versions ------------------------------------------------------------------------------
    def next_version_number(self) -> int:
        row = self.db.execute("SELECT MAX(n) AS m FROM versions").fetchone()
        return int(row["m"] or 0) + 1

    def staging_dir(self, job_id: str) -> Path:
        """A fresh private directory to write a model into before :meth:`publish` (same filesystem)."""
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", job_id):
            raise ArtifactError(f"bad job id {job_id!r}")
        d = self.models_dir / f".staging-{job_id}"
        if d.exists():
            shutil.rmtree(d)
        return ensure_dir(d)

    def model_dir(self, name: str) -> Path:
        if not re.match(r"^[0-9]{1,9}-[0-9a-f]{8}$", str(name)):
            raise ArtifactError(f"bad model directory name {name!r}")
        return self.models_dir / name

    def publish(self, staging: Path, n: int, info: dict, job_id: str | None = None,
                has_student: bool = False, extra: dict | None = None) -> dict:
        """Checksum every file of ``staging`` into a manifest, rename it to ``models/<n>-<hash>`` and
        atomically swap ``current.json`` to it. Returns the new pointer."""
        files = {}
        os.chmod(staging, 0o700)
        for p in sorted(staging.rglob("*")):
            # owner-only whatever the writer did (HF save_pretrained follows the umask: 0644 / 0755)
            os.chmod(p, 0o700 if p.is_dir() else FILE_MODE)
            if p.is_file() and p.name != "manifest.json":
                files[str(p.relative_to(staging))] = sha256_file(p)
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{n}-{digest}"
        pointer = {
            "dir": name,
            "n": n,
            "molam": version_name("molam", name),
            "student": version_name("student", name) if has_student else None,
            "published": time.time(),
            **(extra or {}),
        }
        manifest = {"format": 1, **pointer, "files": files, "info": info, "job_id": job_id}
        atomic_write_json(staging / "manifest.json", manifest)
        final = self.model_dir(name)
        if final.exists():  # identical content published before: keep the old copy
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
        self.db.execute(
            "INSERT OR REPLACE INTO versions(version, n, created, job_id, info) VALUES(?, ?, ?, ?, ?)",
            (name, n, pointer["published"], job_id, json.dumps(info)),
        )
        atomic_write_json(self.models_dir / "current.json", pointer)
        self.prune(keep=self.keep_versions)
        return pointer

    keep_versions = 3

    def prune(self, keep: int = 3) -> list[str]:
        """Delete all but the ``keep`` newest model directories (never the current one) and stale staging
        directories older than a day. Returns the deleted names."""
        cur = (self.current() or {}).get("dir")
        dirs = []
        for d in self.models_dir.iterdir():
            if d.is_dir() and re.match(r"^[0-9]{1,9}-[0-9a-f]{8}$", d.name):
                dirs.append((int(d.name.split("-")[0]), d))
        dirs.sort(reverse=True)
        gone = []
        for _, d in dirs[max(keep, 1):]:
            if d.name != cur:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
        for d in self.models_dir.glob(".staging-*"):
            try:
                if time.time() - d.stat().st_mtime > 86400:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
        return gone

    def current(self) -> dict | None:
        """The ``current.json`` pointer (cached; re-read only when the file's mtime/size/inode changes)."""
        p = self.models_dir / "current.json"
        try:
            st = p.stat()
        except FileNotFoundError:
            self._pointer_stat, self._pointer = None, None
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key != self._pointer_stat:
            try:
                self._pointer = json.loads(p.read_text())
            except (OSError, ValueError) as exc:
                raise ArtifactError(f"{p}: unreadable model pointer ({exc})") from exc
            self._pointer_stat = key
        return self._pointer

    def read_manifest(self, name: str, verify: bool = True) -> dict:
        """The manifest of ``models/<name>``; with ``verify`` every file must match its sha256."""
        vdir = self.model_dir(name)
        try:
            manifest = json.loads((vdir / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"model {name}: manifest missing or unreadable ({exc})") from exc
        if verify:
            for rel, digest in manifest.get("files", {}).items():
                f = vdir / rel
                if not f.exists() or sha256_file(f) != digest:
                    raise ArtifactError(f"model {name}: file {rel} is missing or does not match its checksum")
        return manifest

    def versions(self) -> list[dict]:
        rows = self.db.execute("SELECT version, n, created, job_id, info FROM versions ORDER BY n").fetchall()
        return [{**dict(r), "info": json.loads(r["info"])} for r in rows]

    # -- human-free mode: MoLAM-labelled tasks added by AL rounds --------------------------------------
    def auto_labels(self) -> dict[int, dict]:
        rows = self.db.execute("SELECT task_id, label, weight, negatives, round FROM auto_labels").fetchall()
        return {
            int(r["task_id"]): {"label": int(r["label"]), "weight": float(r["weight"]),
                                "negatives": json.loads(r["negatives"]), "round": int(r["round"])}
            for r in rows
        }

    def add_auto_labels(self, rows: list[tuple[int, int, float, list[int], int]]) -> None:
        with self.db.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO auto_labels(task_id, label, weight, negatives, round, created) "
                "VALUES(?, ?, ?, ?, ?, ?)",
                [(t, lab, w, json.dumps(neg), r, time.time()) for t, lab, w, neg, r in rows],
            )

    def summary(self, env: Any) -> dict:
        cur = self.current()
        return {
            "project": self.id,
            "current": cur,
            "settings": asdict(self.settings(env)),
            "versions": len(self.versions()),
            "auto_labels": len(self.auto_labels()),
            "new_annotations": self.get("new_annotations", 0),
            "for_humans": self.get(FOR_HUMANS_KEY, []),
            # the stopping rule (molal.learner.StoppingRule): κ between successive students' predictions on a
            # fixed sample of tasks, one per training job (the last 10)
            "stop_kappas": self.get("stop_kappas", [])[-10:],
        }


class ServiceStore:
    """The root of ``MODEL_DIR``: project states (an LRU per process), the shared cache path.

    Only :meth:`project` creates a project's directory; read paths use :meth:`existing`."""

    #: project states kept open per process (each holds up to 2 idle SQLite connections)
    max_open_projects = 64

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        from molal.lru import LRU

        self.root = ensure_dir(Path(model_dir).expanduser().resolve())
        os.chmod(self.root, 0o700)
        ensure_dir(self.root / "projects")  # 0700 (a parent made by mkdir(parents=True) would get 0755)
        self._projects: LRU[int, ProjectState] = LRU(self.max_open_projects, on_evict=lambda _k, st: st.close())

    @property
    def cache_path(self) -> Path:
        return self.root / "cache.db"

    @property
    def jobs_path(self) -> Path:
        return self.root / "jobs.db"

    def project(self, project_id: object) -> ProjectState:
        """The project's state, created on first use."""
        pid = parse_project_id(project_id)
        return self._projects.setdefault(pid, lambda: ProjectState(self.root, pid))

    def exists(self, project_id: object) -> bool:
        return (self.root / "projects" / str(parse_project_id(project_id)) / "state.db").is_file()

    def existing(self, project_id: object) -> ProjectState | None:
        """The project's state if it was ever created (by /setup, /predict, a webhook, the CLI), else None —
        nothing is created."""
        pid = parse_project_id(project_id)
        st = self._projects.get(pid)
        if st is not None or not self.exists(pid):
            return st
        return self.project(pid)

    def project_ids(self) -> list[int]:
        d = self.root / "projects"
        if not d.exists():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())
