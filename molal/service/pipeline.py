"""The Label Studio integration logic: :class:`Service` (one per process) used by ``backend/`` and the CLI.

* ``setup`` / ``predict`` — what Label Studio's ``/setup`` and ``/predict`` call (see molal.service.predict).
* ``webhook`` — counts annotations and queues training (``START_TRAINING``, every ``train_every``).
* ``run_job`` — runs one job: ``train`` (the full round), ``sync``, ``query``, ``annotate``.

Models load once per process and are cached by version; the ``current.json`` pointer is re-checked with a
cheap ``stat`` per request, so a new version published by any process is picked up at the next request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from molal.config import Settings, get_settings
from molal.io import ArtifactError
from molal.lru import LRU
from molal.service.errors import BadRequest, NotFound, TooLarge, Unprocessable
from molal.service.jobs import JobContext, JobQueue, JobWorker, public_job, submit_rq
from molal.service.labelconfig import LabelConfigError, LabelSpec, parse_label_config
from molal.service.lstrust import setup_usable
from molal.service.store import ProjectIdError, ProjectSettings, ProjectState, ServiceStore, parse_project_id

log = logging.getLogger("molal.service")

#: actions Label Studio sends to webhooks (webhooks.models.WebhookAction + START_TRAINING in 1.23)
LS_ACTIONS = {
    "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED",
    "REVIEWS_DELETED", "START_TRAINING",
}
ANNOTATION_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"}


@dataclass
class LoadedModel:
    """A published model loaded in this process."""

    pointer: dict
    manifest: dict
    molam: Any
    student: Any = None
    student_loaded: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _short(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:8]


def import_training_stack() -> float:
    """Import what a training job needs (scikit-learn, XGBoost, torch, transformers). Returns seconds."""
    t0 = time.perf_counter()
    try:
        import sklearn.linear_model  # noqa: F401
        import torch  # noqa: F401
        import transformers.models.bert.modeling_bert  # noqa: F401  (the default encoder's; ~3 s more)
        import xgboost  # noqa: F401
        from transformers import AutoModel, AutoTokenizer  # noqa: F401

        import molal.molam  # noqa: F401
        import molal.student  # noqa: F401
    except Exception as exc:  # the job that needs them reports the error
        log.warning("warm-up: importing the training stack failed: %s", exc)
    dt = time.perf_counter() - t0
    log.info("warm-up: training stack imported in %.1f s", dt)
    return dt


class Service:
    """Per-process service state: settings, MODEL_DIR store, job queue, loaded mixtures and models."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.store = ServiceStore(self.settings.model_dir)
        self.jobs = JobQueue(self.store.jobs_path)
        self._cache = None
        # per-process caches, each bounded (a request can name any project, class list or text)
        self._mixtures: LRU[tuple, Any] = LRU(8)
        self._models: LRU[tuple[int, str], LoadedModel] = LRU(16)
        self._bad_models: LRU[tuple[int, str], str] = LRU(64)
        self._lock = threading.RLock()
        self.worker: JobWorker | None = None
        self._predict_pool = None
        self.warm = "off"  # the training-stack warm-up: off | warming | done (GET /health)
        self.started = time.time()
        self._counter_lock = threading.Lock()
        self.counters: dict[str, float] = {
            "predict_requests": 0, "predict_tasks": 0, "predict_pending": 0, "predict_seconds": 0.0,
            "setup_requests": 0, "webhook_requests": 0, "model_loads": 0, "model_load_seconds": 0.0,
        }

    # -- plumbing --------------------------------------------------------------------------------------
    def count(self, **inc: float) -> None:
        with self._counter_lock:
            for k, v in inc.items():
                self.counters[k] = self.counters.get(k, 0) + v

    def predict_pool(self):
        """Threads that run /predict's model calls, so a request can answer at its deadline while a long call
        finishes into the cache (:func:`molal.service.predict.annotate_by`); as many as request threads."""
        if self._predict_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            with self._lock:
                if self._predict_pool is None:
                    n = max(2, int(os.environ.get("MOLAL_THREADS", "4")))
                    self._predict_pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="molal-predict")
        return self._predict_pool

    @property
    def cache(self):
        if self._cache is None:
            from molal.cache import AnnotationCache

            with self._lock:
                if self._cache is None:
                    self._cache = AnnotationCache(self.store.cache_path)
        return self._cache

    def start_worker(self) -> JobWorker | None:
        """Start the in-process job worker thread (not with REDIS_URL: RQ workers run the jobs)."""
        if self.settings.redis_url is not None:
            return None
        with self._lock:
            if self.worker is None or not self.worker.is_alive():
                self.jobs.reap_stale()
                self.worker = JobWorker(self.jobs, self.run_job)
                self.worker.start()
        if self.settings.warm_start:
            self._warm_training()
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def submit(self, project: int, kind: str, payload: dict | None = None, source: str = "") -> tuple[dict, bool]:
        """Queue a job (coalesced with a queued one of the same kind); hand it to RQ or wake the worker."""
        job, created = self.jobs.enqueue(project, kind, payload, source=source)
        if created:
            log.info("queued %s job %s for project %s (%s)", kind, job["id"], project, source or "api")
            if self.settings.redis_url is not None:
                submit_rq(self.settings.redis_url.get_secret_value(), job, str(self.store.root))
        if self.worker is not None:
            self.worker.wake.set()
        return job, created

    def project(self, project: object) -> ProjectState:
        """The project's state, created on first use (write paths: /setup, /predict, jobs, the CLI)."""
        try:
            return self.store.project(project)
        except ProjectIdError as exc:
            raise BadRequest(str(exc)) from None

    def known_project(self, project: object) -> ProjectState:
        """The project's state for read paths: 404 when this backend never saw the project (nothing created)."""
        try:
            state = self.store.existing(project)
        except ProjectIdError as exc:
            raise BadRequest(str(exc)) from None
        if state is None:
            raise NotFound(f"project {parse_project_id(project)} is not known to this backend (Label Studio "
                           "registers it with /setup when the model is connected)")
        return state

    def parse_config(self, config: object, from_name: str | None = None) -> LabelSpec:
        """:func:`parse_label_config` under this server's limits; 422 with the reason."""
        try:
            return parse_label_config(config, from_name, max_classes=self.settings.max_classes,
                                      max_chars=self.settings.max_label_config_chars)
        except LabelConfigError as exc:
            raise Unprocessable(str(exc)) from None

    def checked_project(self, project: object, label_config: object) -> tuple[int, ProjectState | None, LabelSpec]:
        """Validate a request's project id and label config *before* anything is created: returns
        ``(id, state or None when the project is new, spec)``. A request refused here leaves no trace."""
        try:
            pid = parse_project_id(project)
        except ProjectIdError as exc:
            raise BadRequest(str(exc)) from None
        state = self.store.existing(pid)
        if state is not None:
            return pid, state, self.spec_for(state, label_config or None)
        if not label_config:
            raise Unprocessable(f"project {pid}: no label config known; Label Studio sends it in /setup and "
                                "/predict (field 'schema' or 'label_config')")
        return pid, None, self.parse_config(label_config)  # a new project has no from_name setting

    def project_settings(self, state: ProjectState) -> ProjectSettings:
        return state.settings(self.settings)

    def spec_for(self, state: ProjectState, label_config: str | None = None) -> LabelSpec:
        ps = self.project_settings(state)
        config = label_config or state.get("label_config")
        if not config:
            raise Unprocessable(
                f"project {state.id}: no label config known; Label Studio sends it in /setup and /predict "
                "(field 'schema' or 'label_config')"
            )
        return self.parse_config(config, ps.from_name)

    # -- mixture ---------------------------------------------------------------------------------------
    def mixture_for(self, state: ProjectState, classes: tuple[str, ...] | list[str], texts: list[str] | None = None):
        """The project's mixture (loaded once per process). ``MOLAL_MIXTURE`` / the project's ``mixture``
        setting names a config file; otherwise ``Mixture.default`` decides once per project from a probe
        of the project's texts (stored, so every process and every later batch gets the same mixture).
        Returns None when the default is still undecided and no texts are given."""
        from molal.annotators import Mixture

        ps = self.project_settings(state)
        if ps.mixture:
            p = Path(ps.mixture).expanduser()
            try:
                mtime = p.stat().st_mtime_ns
            except OSError:
                raise Unprocessable(f"project {state.id}: mixture config {p} not found") from None
            return self._mixtures.setdefault(("file", str(p), mtime), lambda: Mixture.from_config(p))
        probe = state.get("default_mixture_probe")
        if probe is None:
            good = [t for t in (texts or []) if isinstance(t, str) and t.strip()]
            if not good:
                return None
            probe = good[:32]
            state.put("default_mixture_probe", probe)
        def make():
            m = Mixture.default(texts=probe, class_names=list(classes))
            log.info("project %s: default mixture %r", state.id, m)
            return m

        return self._mixtures.setdefault(("default", _short(json.dumps(probe)), tuple(classes)), make)

    @staticmethod
    def mixture_version(mixture, classes) -> str:
        return f"mixture-mean-{_short(mixture.fingerprint() + json.dumps(list(classes)))}"

    # -- models ----------------------------------------------------------------------------------------
    def loaded_model(self, state: ProjectState) -> LoadedModel | None:
        """The project's current published model (None before the first training), cached per version."""
        ptr = state.current()
        if not ptr:
            return None
        key = (state.id, ptr["dir"])
        m = self._models.get(key)
        if m is not None:
            return m
        bad = self._bad_models.get(key)
        if bad is not None:  # refused before: do not re-hash it on every request
            raise ArtifactError(bad)
        with self._lock:
            m = self._models.get(key)
            if m is not None:
                return m
            t0 = time.perf_counter()
            from molal.molam import MoLAM

            try:
                manifest = state.read_manifest(ptr["dir"], verify=True)
                molam = MoLAM.load(state.model_dir(ptr["dir"]) / "molam")
            except Exception as exc:
                why = f"model {ptr.get('molam')}: {type(exc).__name__}: {exc}"
                self._bad_models.put(key, why)
                raise ArtifactError(why) from exc
            m = LoadedModel(pointer=ptr, manifest=manifest, molam=molam)
            for k in [k for k in self._models if k[0] == state.id]:
                self._models.pop(k)  # drop older versions of this project
            self._models.put(key, m)
            dt = time.perf_counter() - t0
            self.count(model_loads=1, model_load_seconds=dt)
            log.info("project %s: loaded model %s in %.2f s", state.id, ptr["molam"], dt)
            return m

    def student_of(self, state: ProjectState, m: LoadedModel):
        if not m.pointer.get("student"):
            return None
        with m.lock:
            if not m.student_loaded:
                from molal.student import Student

                t0 = time.perf_counter()
                m.student = Student.load(state.model_dir(m.pointer["dir"]) / "student", device=self.settings.device)
                m.student_loaded = True
                self.count(model_loads=1, model_load_seconds=time.perf_counter() - t0)
        return m.student

    def serving(self, state: ProjectState, spec: LabelSpec, texts: list[str] | None = None) -> dict:
        """What serves this project now: ``{"kind": molam|student|mixture-mean, "version", "model", "mixture"}``."""
        ps = self.project_settings(state)
        mixture = self.mixture_for(state, spec.classes, texts)
        try:
            m = self.loaded_model(state)
        except ArtifactError as exc:
            log.error("project %s: current model unusable (%s); serving the mixture mean", state.id, exc)
            m = None
        if m is not None and list(m.manifest.get("info", {}).get("classes", [])) != list(spec.classes):
            log.warning("project %s: the label config's classes changed since training; serving the mixture mean",
                        state.id)
            m = None
        if m is not None:
            if ps.serve_model == "student" and m.pointer.get("student"):
                return {"kind": "student", "version": m.pointer["student"], "model": m, "mixture": mixture}
            fp = m.manifest.get("info", {}).get("mixture_fingerprint")
            if mixture is not None and fp == mixture.fingerprint():
                return {"kind": "molam", "version": m.pointer["molam"], "model": m, "mixture": mixture}
            if mixture is not None:
                log.warning("project %s: the mixture changed since MoLAM was trained; serving the mixture mean",
                            state.id)
        if mixture is None:
            return {"kind": "mixture-mean", "version": "mixture-mean-undecided", "model": None, "mixture": None}
        return {"kind": "mixture-mean", "version": self.mixture_version(mixture, spec.classes), "model": None,
                "mixture": mixture}

    # -- /setup ----------------------------------------------------------------------------------------
    def setup(self, payload: Any) -> dict:
        if not isinstance(payload, dict):
            raise BadRequest("expected a JSON object with 'project' and 'schema'")
        self.count(setup_requests=1)
        schema = payload.get("schema") or payload.get("label_config")
        pid, state, spec = self.checked_project(payload.get("project"), schema)
        state = state or self.project(pid)
        if schema and schema != state.get("label_config"):
            state.put("label_config", schema)
        host, token = payload.get("hostname"), payload.get("access_token")
        if isinstance(host, str) and isinstance(token, str) and host and token and len(token) <= 4096 \
                and setup_usable(self.settings, host):
            state.save_connection(host, token)  # only where molal's trust rule would ever use them
        srv = self.serving(state, spec)
        if srv["kind"] == "student" and not srv["model"].student_loaded:
            # loading torch + the encoder takes seconds: warm it in the background (setup must answer in 3 s)
            threading.Thread(target=self._warm_student, args=(state, srv["model"]), daemon=True,
                             name="molal-warm-student").start()
        return {"model_version": srv["version"]}

    def _warm_training(self) -> None:
        """Import the training stack in the background, once per process (the job worker's): the first
        training job then does not wait ~5-10 s for the imports (``MOLAL_WARM_START``)."""
        with self._lock:
            if self.warm != "off" or self.worker is None:
                return
            self.warm = "warming"

        def run() -> None:
            import_training_stack()
            self.warm = "done"

        threading.Thread(target=run, daemon=True, name="molal-warm-training").start()

    def _warm_student(self, state: ProjectState, m: LoadedModel) -> None:
        try:
            st = self.student_of(state, m)
            if st is not None:
                st.predict_proba(["warm-up"])
        except Exception as exc:  # the request that needs it will report the error
            log.warning("project %s: could not preload the student: %s", state.id, exc)

    # -- /predict --------------------------------------------------------------------------------------
    def predict(self, payload: Any, budget_s: float | None = None) -> dict:
        from molal.service.predict import check_tasks, predict_tasks

        if not isinstance(payload, dict):
            raise BadRequest("expected a JSON object with 'tasks' and 'project'")
        tasks = payload.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequest("field 'tasks' must be a list of Label Studio tasks")
        if len(tasks) > self.settings.max_tasks:
            raise TooLarge(f"{len(tasks)} tasks in one request; this backend takes at most {self.settings.max_tasks} "
                           "(MOLAL_MAX_TASKS). Retrieve predictions for fewer tasks at a time, or push them all in "
                           "bulk with `molal sync --project N`")
        pid, state, spec = self.checked_project(payload.get("project"), payload.get("label_config"))
        check_tasks(tasks, spec, self.settings.max_text_chars)  # refuse bad batches before any state is created
        state = state or self.project(pid)
        budget = self.settings.predict_time_budget_s if budget_s is None else budget_s
        t0 = time.perf_counter()
        out = predict_tasks(self, state, spec, tasks, deadline=time.monotonic() + budget)
        if payload.get("label_config") and payload["label_config"] != state.get("label_config"):
            state.put("label_config", payload["label_config"])
        self.count(predict_requests=1, predict_tasks=len(tasks), predict_pending=out.get("pending", 0),
                   predict_seconds=time.perf_counter() - t0)
        return out

    # -- /webhook --------------------------------------------------------------------------------------
    def webhook(self, payload: Any) -> dict:
        if not isinstance(payload, dict):
            raise BadRequest("expected a JSON object with 'action'")
        action = payload.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("field 'action' is missing")
        if action not in LS_ACTIONS:
            raise BadRequest(f"unknown action {action[:60]!r}; Label Studio actions are: {', '.join(sorted(LS_ACTIONS))}")
        self.count(webhook_requests=1)
        if action == "START_TRAINING":
            pid = self.known_project(self._project_from(payload)).id
            job, created = self.submit(pid, "train", source="START_TRAINING")
            return {"status": "queued" if created else "coalesced", "job": job["id"], "project": pid}
        if action in ANNOTATION_ACTIONS:
            ann = payload.get("annotation")
            if isinstance(ann, dict):
                anns = [ann]
            elif isinstance(ann, list) and ann and all(isinstance(a, dict) for a in ann):
                anns = ann
            else:
                raise BadRequest(f"{action}: field 'annotation' must be an annotation object")
            pid = self._project_from(payload, anns[0])
            state = self.store.existing(pid)
            if state is None:  # Label Studio calls /setup when the model is connected: not this backend's project
                return {"status": "ignored", "action": action, "project": pid,
                        "reason": "project not known to this backend"}
            counted = [a for a in anns if not a.get("was_cancelled")]
            n = state.incr("new_annotations", len(counted)) if counted else state.get("new_annotations", 0)
            every = self.project_settings(state).train_every
            if every > 0 and n >= every:
                state.put("new_annotations", 0)
                job, created = self.submit(pid, "train", source=f"{n} new annotations")
                return {"status": "queued" if created else "coalesced", "job": job["id"], "project": pid,
                        "new_annotations": n}
            return {"status": "counted", "project": pid, "new_annotations": n, "train_every": every}
        return {"status": "ignored", "action": action}

    def train_request(self, payload: Any) -> dict:
        """``POST /train`` (older Label Studio flow, feature flag off): queue a train job like START_TRAINING;
        the job pulls the labelled tasks itself, so the annotations in the payload are not needed."""
        if not isinstance(payload, dict):
            raise BadRequest("expected a JSON object with 'project'")
        pid = self.known_project(self._project_from({"action": "train", **payload})).id
        self.count(webhook_requests=1)
        job, created = self.submit(pid, "train", source="/train")
        return {"status": "queued" if created else "coalesced", "job": job["id"], "project": pid}

    @staticmethod
    def _project_from(payload: dict, annotation: dict | None = None) -> int:
        proj = payload.get("project")
        cand = proj.get("id") if isinstance(proj, dict) else proj
        if cand is None and annotation is not None:
            cand = annotation.get("project")
        if cand is None:
            raise BadRequest(f"{payload.get('action')}: the project id is missing (expected 'project': {{'id': N}})")
        try:
            return parse_project_id(cand)
        except ProjectIdError as exc:
            raise BadRequest(str(exc)) from None

    # -- jobs ------------------------------------------------------------------------------------------
    def run_job(self, ctx: JobContext) -> dict:
        from molal.service import train as tr

        kind = ctx.job["kind"]
        state = self.store.project(ctx.job["project"])
        if kind == "train":
            return tr.train_project(self, state, ctx)
        if kind == "sync":
            return tr.sync_project(self, state, ctx)
        if kind == "query":
            return tr.query_project(self, state, ctx, strategy=ctx.job["payload"].get("strategy"))
        if kind == "annotate":
            return tr.annotate_texts(self, state, ctx, ctx.job["payload"])
        raise NotFound(f"unknown job kind {kind!r}")

    def job(self, job_id: str) -> dict:
        """One job as HTTP shows it (:func:`molal.service.jobs.public_job`: no payload, no traceback)."""
        if not isinstance(job_id, str) or not job_id.isalnum() or len(job_id) > 32:
            raise BadRequest("bad job id")
        row = self.jobs.get(job_id)
        if row is None:
            raise NotFound(f"no job {job_id}")
        return public_job(row)

    def project_jobs(self, project: object, limit: int = 50) -> list[dict]:
        """The newest jobs of one known project, as HTTP shows them."""
        state = self.known_project(project)
        return [public_job(r) for r in self.jobs.list(project=state.id, limit=limit)]

    # -- info ------------------------------------------------------------------------------------------
    def versions(self, project: object | None) -> dict:
        """Label Studio's ``GET /versions`` (it sends no project: an empty list); ``?project=N`` lists the
        published versions of a known project. Which projects exist is not shown."""
        if project is None:
            return {"versions": []}
        state = self.known_project(project)
        cur = state.current()
        out = []
        for v in state.versions():
            out.append(f"molam-{v['version']}")
            if v["info"].get("student"):
                out.append(f"student-{v['version']}")
        return {"versions": out, "current": cur}

    def metrics(self) -> dict:
        c = dict(self.counters)
        if c["predict_requests"]:
            c["predict_mean_ms"] = round(1000 * c["predict_seconds"] / c["predict_requests"], 2)
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "jobs": self.jobs.counts(),
            "worker": "rq" if self.settings.redis_url is not None else ("thread" if self.worker else "none"),
            "projects": len(self.store.project_ids()),
            "loaded_models": len(self._models),
            "loaded_mixtures": len(self._mixtures),
            **c,
        }

    def project_info(self, project: object, public: bool = False) -> dict:
        """Settings, current model, versions of a project (``molal project show``; ``GET /projects/N`` with
        ``public``: the project must exist, and the mixture config is named by its file name, not its path)."""
        state = self.known_project(project) if public else self.project(project)
        d = state.summary(self.settings)
        d["settings"] = asdict(self.project_settings(state))
        if public and d["settings"].get("mixture"):
            d["settings"]["mixture"] = Path(d["settings"]["mixture"]).name
        return d
