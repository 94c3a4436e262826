"""Per-project state: settings, key/values, versions, auto-labels in a database (a SQLite file per project,
or tables shared by all projects in PostgreSQL: :mod:`molal.db`) + versioned model directories under
``MODEL_DIR``.

Layout with SQLite (the default)::

    MODEL_DIR/
      cache.db                       shared annotation cache (molal.cache.AnnotationCache)
      jobs.db                        job table for all projects (molal.service.jobs)
      projects/<id>/                 0700, one per Label Studio project (id validated as an int)
        state.db                     0600 SQLite (WAL): settings, kv, versions, connection, labels
                                     (with MOLAL_DATABASE_URL: tables in PostgreSQL instead, no .db files)
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
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from molal.config import QUEUE_HEAD, RETIRE_GRACE_S, TRAIN_EVERY
from molal.db import Cursor, Database, Rows, SQLiteDB, connect_sqlite, open_database, parse_pg_url
from molal.io import FILE_MODE, ArtifactError, atomic_write_json, ensure_dir, sha256_file

__all__ = ["FOR_HUMANS_KEY", "ProjectIdError", "ProjectSettings", "ProjectState", "Rows", "SQLiteDB",
           "ServiceStore", "coerce_setting", "connect_sqlite", "env_defaults", "parse_project_id", "version_name"]

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


_PROJECT_SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (project INTEGER PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS project_settings (project INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (project, key));
CREATE TABLE IF NOT EXISTS project_kv (project INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (project, key));
CREATE TABLE IF NOT EXISTS project_connection (project INTEGER PRIMARY KEY, hostname TEXT, access_token TEXT,
    updated REAL);
CREATE TABLE IF NOT EXISTS model_versions (project INTEGER NOT NULL, version TEXT NOT NULL, n INTEGER NOT NULL,
    created REAL NOT NULL, job_id TEXT, info TEXT NOT NULL, PRIMARY KEY (project, version));
CREATE TABLE IF NOT EXISTS auto_labels_v2 (project INTEGER NOT NULL, task_id INTEGER NOT NULL,
    label INTEGER NOT NULL, weight REAL NOT NULL, negatives TEXT NOT NULL, round INTEGER NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (project, task_id));
"""
#: the tables of a project's ``state.db`` before molal 0.x kept several projects in one database (PostgreSQL):
#: the same columns without ``project``; copied into the tables above the first time a file is opened
_LEGACY_TABLES = {
    "settings": ("project_settings", "key, value"),
    "kv": ("project_kv", "key, value"),
    "connection": ("project_connection", "hostname, access_token, updated"),
    "versions": ("model_versions", "version, n, created, job_id, info"),
    "auto_labels": ("auto_labels_v2", "task_id, label, weight, negatives, round, created"),
}


def _legacy_migration(project: int):
    """Copy a state.db written by an earlier molal (one project per file, tables without a ``project``
    column) into the current tables, in the schema's transaction; the old tables are dropped."""

    def migrate(c: Cursor) -> None:
        have = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for old, (new, cols) in _LEGACY_TABLES.items():
            if old in have:
                c.execute(f"INSERT INTO {new}(project, {cols}) SELECT ?, {cols} FROM {old} "  # noqa: S608 - fixed
                          "WHERE true ON CONFLICT DO NOTHING", (project,))
                c.execute(f"DROP TABLE {old}")

    return migrate


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
    priority_top: int = QUEUE_HEAD  # the job writes the queue's head (N tasks); the rest: a background job
    predictions_top: int = 20_000  # served predictions for the top N unlabeled tasks only (0 = all)
    per_llm_predictions: bool = True
    train_every: int = TRAIN_EVERY  # retrain after N new human labels once a model serves (0 = Start Training only)
    retire_grace_s: int = RETIRE_GRACE_S  # a superseded version's predictions stay this long after the new one
    from_name: str | None = None  # which <Choices> block (None = the first with a Text target)
    uncertainty_sampling: bool = False  # also set the project's sampling to "Uncertainty sampling"
    student: bool = True  # train the student in each training job
    molam_candidates: str | None = None  # comma list of MoLAM candidates (e.g. "lr_0.1,ds,best_single"); None = all
    molam_text_features: str | None = None  # MoLAM's text model encoder ("minilm"); None = LLM outputs only
    stop_when_stable: bool = False  # human_free loop: query no more tasks once the stopping rule is met
    review_panel: bool = False  # keep the read-only review panel (molal.service.review) in the label config
    audit_every: int = 10  # the audit slice: 1 task in N of the queue drawn at random, held out (0 = none)
    auto_label: bool = False  # label the certified part of the pool without a person (molal.service.quality)
    certify_epsilon: float = 0.05  # certified labels: at most this share wrong ...
    certify_delta: float = 0.1  # ... with probability at least 1 - this
    hints: bool = True  # a <Choice hint> (and the value of an aliased <Choice>) describes its class to the members
    instructions: str = "auto"  # the labelling instructions frame the LLMs' task: auto (short ones) | on | off

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


_CHOICES = {"loop_mode": ("review", "human_free"), "serve_model": ("molam", "student"),
            "instructions": ("auto", "on", "off")}
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
    if kind is float:  # the certificate's ε and δ
        from molal.trust import level

        return level(value, key)
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
        predictions_top=settings.predictions_top,
        per_llm_predictions=settings.per_llm_predictions,
        train_every=settings.train_every,
        retire_grace_s=getattr(settings, "retire_grace_s", RETIRE_GRACE_S),
        molam_text_features=getattr(settings, "molam_text_features", None),
    )


_KV_UPSERT = ("INSERT INTO project_kv(project, key, value) VALUES(?, ?, ?) "
              "ON CONFLICT (project, key) DO UPDATE SET value=excluded.value")


class ProjectState:
    """State of one Label Studio project in ``MODEL_DIR/projects/<id>/``."""

    def __init__(self, model_dir: Path, project_id: int, db: Database | None = None) -> None:
        """``db``: the database shared by all projects (PostgreSQL); by default the project's own SQLite file
        ``state.db``. Model files always live under ``model_dir`` (a volume shared by every host)."""
        self.id = parse_project_id(project_id)
        self.dir = ensure_dir(Path(model_dir) / "projects" / str(self.id))
        os.chmod(self.dir, 0o700)
        self.models_dir = ensure_dir(self.dir / "models")
        self._own_db = db is None
        self.db: Database = db if db is not None else SQLiteDB(
            self.dir / "state.db", _PROJECT_SCHEMA, max_idle=1, migrate=_legacy_migration(self.id))
        # the project exists from here on (ServiceStore.exists)
        self.db.execute("INSERT INTO projects(project, created) VALUES(?, ?) ON CONFLICT DO NOTHING",
                        (self.id, time.time()))
        self._pointer_stat: tuple[int, int] | None = None
        self._pointer: dict | None = None

    def close(self) -> None:
        """Close the idle database connections of the project's own file (a later use reopens them)."""
        if self._own_db:
            self.db.close()

    # -- settings ----------------------------------------------------------------------------------
    def settings(self, env: Any) -> ProjectSettings:
        ps = env_defaults(env)
        for row in self.db.execute("SELECT key, value FROM project_settings WHERE project=?", (self.id,)):
            if row["key"] in ProjectSettings.keys():
                setattr(ps, row["key"], json.loads(row["value"]))
        return ps

    def set_setting(self, key: str, value: Any) -> Any:
        v = coerce_setting(key, value)
        self.db.execute("INSERT INTO project_settings(project, key, value) VALUES(?, ?, ?) "
                        "ON CONFLICT (project, key) DO UPDATE SET value=excluded.value", (self.id, key, json.dumps(v)))
        return v

    def unset_setting(self, key: str) -> None:
        if key not in ProjectSettings.keys():
            raise ValueError(f"unknown project setting {key!r}; known: {', '.join(ProjectSettings.keys())}")
        self.db.execute("DELETE FROM project_settings WHERE project=? AND key=?", (self.id, key))

    def stored_settings(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"])
                for r in self.db.execute("SELECT key, value FROM project_settings WHERE project=?", (self.id,))}

    # -- key/value ---------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM project_kv WHERE project=? AND key=?", (self.id, key)).fetchone()
        return json.loads(row["value"]) if row else default

    def put(self, key: str, value: Any) -> None:
        self.db.execute(_KV_UPSERT, (self.id, key, json.dumps(value)))

    def incr(self, key: str, by: int = 1) -> int:
        with self.db.transaction() as c:
            row = c.execute("SELECT value FROM project_kv WHERE project=? AND key=?", (self.id, key)).fetchone()
            v = (json.loads(row["value"]) if row else 0) + by
            c.execute(_KV_UPSERT, (self.id, key, json.dumps(v)))
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
            "INSERT INTO project_connection(project, hostname, access_token, updated) VALUES(?, ?, ?, ?) "
            "ON CONFLICT (project) DO UPDATE SET hostname=excluded.hostname, access_token=excluded.access_token, "
            "updated=excluded.updated",
            (self.id, hostname, access_token, time.time()),
        )

    def connection(self) -> tuple[str | None, str | None]:
        row = self.db.execute("SELECT hostname, access_token FROM project_connection WHERE project=?",
                              (self.id,)).fetchone()
        if not row:
            return (None, None)
        return (row["hostname"], row["access_token"])

    # -- model versions ------------------------------------------------------------------------------
    def next_version_number(self) -> int:
        row = self.db.execute("SELECT MAX(n) AS m FROM model_versions WHERE project=?", (self.id,)).fetchone()
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
            "INSERT INTO model_versions(project, version, n, created, job_id, info) VALUES(?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (project, version) DO UPDATE SET n=excluded.n, created=excluded.created, "
            "job_id=excluded.job_id, info=excluded.info",
            (self.id, name, n, pointer["published"], job_id, json.dumps(info)),
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
        rows = self.db.execute("SELECT version, n, created, job_id, info FROM model_versions WHERE project=? "
                               "ORDER BY n", (self.id,)).fetchall()
        return [{**dict(r), "info": json.loads(r["info"])} for r in rows]

    # -- human-free mode: MoLAM-labelled tasks added by AL rounds --------------------------------------
    def auto_labels(self) -> dict[int, dict]:
        rows = self.db.execute("SELECT task_id, label, weight, negatives, round FROM auto_labels_v2 WHERE project=?",
                               (self.id,)).fetchall()
        return {
            int(r["task_id"]): {"label": int(r["label"]), "weight": float(r["weight"]),
                                "negatives": json.loads(r["negatives"]), "round": int(r["round"])}
            for r in rows
        }

    def add_auto_labels(self, rows: list[tuple[int, int, float, list[int], int]]) -> None:
        with self.db.transaction() as c:
            c.executemany(
                "INSERT INTO auto_labels_v2(project, task_id, label, weight, negatives, round, created) "
                "VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT (project, task_id) DO UPDATE SET label=excluded.label, "
                "weight=excluded.weight, negatives=excluded.negatives, round=excluded.round, created=excluded.created",
                [(self.id, int(t), int(lab), float(w), json.dumps(neg), int(r), time.time())
                 for t, lab, w, neg, r in sorted(rows)],
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
    """The root of ``MODEL_DIR``: project states (an LRU per process), where the job table and the annotation
    cache live.

    By default every database is a SQLite file under ``MODEL_DIR`` (one host). With ``database_url``
    (``postgresql://...``, ``MOLAL_DATABASE_URL``) the job table, every project's state and the annotation
    cache are tables in that PostgreSQL database, and ``MODEL_DIR`` holds only model files (a volume every
    host mounts). Only :meth:`project` creates a project; read paths use :meth:`existing`."""

    #: project states kept open per process (each holds up to 2 idle SQLite connections)
    max_open_projects = 64

    def __init__(self, model_dir: str | os.PathLike[str], database_url: str | None = None) -> None:
        from molal.lru import LRU

        if database_url is not None:
            parse_pg_url(database_url, "MOLAL_DATABASE_URL")  # DatabaseURLError (a ValueError) naming no part of it
        self.root = ensure_dir(Path(model_dir).expanduser().resolve())
        os.chmod(self.root, 0o700)
        ensure_dir(self.root / "projects")  # 0700 (a parent made by mkdir(parents=True) would get 0755)
        self.database_url = database_url
        self._shared_db: Database | None = None
        self._projects: LRU[int, ProjectState] = LRU(self.max_open_projects, on_evict=lambda _k, st: st.close())

    @classmethod
    def from_settings(cls, settings: Any) -> ServiceStore:
        """The store :class:`molal.config.Settings` describe (``MODEL_DIR``, ``MOLAL_DATABASE_URL``)."""
        url = settings.database_url.get_secret_value() if getattr(settings, "database_url", None) else None
        return cls(settings.model_dir, database_url=url)

    @property
    def shared_db(self) -> Database | None:
        """The PostgreSQL database of project states (None with SQLite files)."""
        if self.database_url is None:
            return None
        if self._shared_db is None:
            self._shared_db = open_database(self.database_url, _PROJECT_SCHEMA, "project")
        return self._shared_db

    @property
    def cache_path(self) -> Path:
        return self.root / "cache.db"

    @property
    def jobs_path(self) -> Path:
        return self.root / "jobs.db"

    @property
    def cache_target(self) -> str | Path:
        """Where the annotation cache lives: the database URL, or ``MODEL_DIR/cache.db``."""
        return self.database_url or self.cache_path

    @property
    def jobs_target(self) -> str | Path:
        """Where the job table lives: the database URL, or ``MODEL_DIR/jobs.db``."""
        return self.database_url or self.jobs_path

    def project(self, project_id: object) -> ProjectState:
        """The project's state, created on first use."""
        pid = parse_project_id(project_id)
        return self._projects.setdefault(pid, lambda: ProjectState(self.root, pid, db=self.shared_db))

    def exists(self, project_id: object) -> bool:
        pid = parse_project_id(project_id)
        if self.shared_db is not None:
            return self.shared_db.execute("SELECT 1 FROM projects WHERE project=?", (pid,)).fetchone() is not None
        return (self.root / "projects" / str(pid) / "state.db").is_file()

    def existing(self, project_id: object) -> ProjectState | None:
        """The project's state if it was ever created (by /setup, /predict, a webhook, the CLI), else None —
        nothing is created."""
        pid = parse_project_id(project_id)
        st = self._projects.get(pid)
        if st is not None or not self.exists(pid):
            return st
        return self.project(pid)

    def project_ids(self) -> list[int]:
        if self.shared_db is not None:
            return [int(r[0]) for r in self.shared_db.execute("SELECT project FROM projects ORDER BY project")]
        d = self.root / "projects"
        if not d.exists():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())
