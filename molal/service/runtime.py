"""The service's runtime: what request handlers and jobs of a process share (:class:`Runtime`) — settings,
the ``MODEL_DIR`` store, the job queue, the annotation cache, and the model being served (mixtures and
published models loaded once per process, in LRUs; :class:`Serving` says what serves a project now).

:class:`molal.service.pipeline.Service` is a Runtime with Label Studio's protocol on top; the modules the
handlers and jobs live in (:mod:`~molal.service.predict`, :mod:`~molal.service.train`) take a Runtime and never
import the Service: the arrows point one way. The ``current.json`` pointer of a project's model is re-checked
with a cheap ``stat`` per request, so a new version published by any process is picked up at the next request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from molal.config import Settings, get_settings
from molal.io import ArtifactError
from molal.lru import LRU
from molal.service.errors import BadRequest, InsufficientStorage, NotFound, Unprocessable
from molal.service.jobs import JobContext, JobQueue, JobWorker, submit_rq
from molal.service.labelconfig import LabelConfigError, LabelSpec, parse_label_config
from molal.service.store import ProjectIdError, ProjectSettings, ProjectState, ServiceStore, parse_project_id

log = logging.getLogger("molal.service")


@dataclass
class LoadedModel:
    """A published model loaded in this process."""

    pointer: dict
    manifest: dict
    molam: Any
    student: Any = None
    student_loaded: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


#: characters of each text kept in a project's default-mixture probe
PROBE_CHARS = 2000
#: the project state key of the task framing the serving model was trained with (the labelling instructions
#: as a training job read them, :func:`molal.service.labelconfig.task_framing`): /predict and the other jobs use
#: it, so the served model and its prompts stay a pair
TASK_FRAMING_KEY = "task_framing"


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


@dataclass(frozen=True)
class Serving:
    """What serves a project now: ``kind`` molam | student | mixture-mean, the ``version`` its predictions
    carry, the published ``model`` (None for the mixture mean) and the project's ``mixture`` (None while the
    default mixture is undecided)."""

    kind: str
    version: str
    model: LoadedModel | None
    mixture: Any

    @property
    def needs_llms(self) -> bool:
        """Whether the served probabilities come from the mixture's outputs (not the student's own)."""
        return self.kind != "student"

    def probs_from_outputs(self, outputs) -> np.ndarray:
        """The served (n, K) probabilities from the mixture's outputs: MoLAM's, or the mean over LLMs."""
        if self.kind == "molam":
            return np.asarray(self.model.molam.predict_proba(outputs), dtype=np.float64)
        if self.kind == "mixture-mean":
            return outputs.normalized_probs().mean(axis=1)
        raise ValueError(f"{self.kind} predictions do not come from the mixture's outputs")


class Runtime:
    """Per-process service state: settings, MODEL_DIR store, job queue, annotation cache, loaded mixtures and
    models. ``runner`` runs a claimed job (the in-process worker thread's), ``kinds`` are the job kinds it knows."""

    """Per-process service state: settings, MODEL_DIR store, job queue, loaded mixtures and models."""

    def __init__(self, settings: Settings | None = None, runner: Callable[[JobContext], dict] | None = None,
                 kinds: tuple[str, ...] = ()) -> None:
        self.runner = runner
        self.kinds = kinds
        self.settings = settings or get_settings()
        self.store = ServiceStore.from_settings(self.settings)
        self.jobs = JobQueue(self.store.jobs_target)
        self._cache = None
        from molal.embeddings import use_store

        # text embeddings beside the annotation cache (opened at the first embedding, not now)
        use_store(str(self.store.cache_target), self.settings.embedding_store_mb)
        # per-process caches, each bounded (a request can name any project, class list or text)
        self._mixtures: LRU[tuple, Any] = LRU(8)
        self._models: LRU[tuple[int, str], LoadedModel] = LRU(16)
        self._bad_models: LRU[tuple[int, str], str] = LRU(64)
        self._specs: LRU[tuple[bytes | None, str | None], LabelSpec] = LRU(256)  # parsed label configs
        self._lock = threading.RLock()
        self.worker: JobWorker | None = None
        self._predict_pool = None
        self._queue_pool = None
        self._queued = 0
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

    #: calls waiting for or running in the queue thread at most (each holds its texts: up to 32 MB)
    queue_backlog = 2

    def queue_later(self, fn: Callable[[], Any]):
        """Run ``fn`` in the service's queue thread: a Future, or None when :attr:`queue_backlog` calls are
        already waiting or running there. It queues the jobs a request starts but need not wait for:
        /predict's background job stores every pending text (up to 32 MB: seconds on a busy disk, more when
        merged into a queued job), and the answer must not wait past its budget for that; the backlog bound
        keeps a flood of such requests from holding their texts in memory."""
        from concurrent.futures import ThreadPoolExecutor

        with self._lock:
            if self._queue_pool is None:
                self._queue_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="molal-queue")
            if self._queued >= self.queue_backlog:
                return None
            self._queued += 1

        def run():
            try:
                return fn()
            finally:
                with self._lock:
                    self._queued -= 1

        return self._queue_pool.submit(run)

    @property
    def cache(self):
        if self._cache is None:
            from molal.cache import AnnotationCache

            with self._lock:
                if self._cache is None:
                    self._cache = AnnotationCache(self.store.cache_target)
        return self._cache

    def start_worker(self) -> JobWorker | None:
        """Start the in-process job worker thread (not with REDIS_URL: RQ workers run the jobs)."""
        if self.settings.redis_url is not None:
            return None
        with self._lock:
            if self.worker is None or not self.worker.is_alive():
                self.jobs.reap_stale()
                if self.runner is None:
                    raise RuntimeError("this runtime has no job runner")
                self.worker = JobWorker(self.jobs, self.runner, after=self.after_job, nice=self.settings.job_nice)
                self.worker.start()
        if self.settings.warm_start:
            self._warm_training()
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def after_job(self, row: dict) -> None:
        """Called with a job's final row once it has ended (the Service shows the state in Label Studio)."""

    def submit(self, project: int, kind: str, payload: dict | None = None, source: str = "") -> tuple[dict, bool]:
        """Queue a job (coalesced with a queued one of the same kind); hand it to RQ or wake the worker."""
        if self.kinds and kind not in self.kinds:
            raise BadRequest(f"unknown job kind {kind!r}; known: {', '.join(self.kinds)}")
        job, created = self.jobs.enqueue(project, kind, payload, source=source)
        if created:
            log.info("queued %s job %s for project %s (%s)", kind, job["id"], project, source or "api")
            if self.settings.redis_url is not None:
                submit_rq(self.settings.redis_url.get_secret_value(), job, str(self.store.root))
        if self.worker is not None:
            self.worker.wake.set()
        return job, created

    def project(self, project: object) -> ProjectState:
        """The project's state, created on first use (write paths: /setup, /predict, jobs, the CLI) unless this
        backend already keeps ``MOLAL_MAX_PROJECTS`` projects (507, nothing created)."""
        try:
            pid = parse_project_id(project)
        except ProjectIdError as exc:
            raise BadRequest(str(exc)) from None
        if not self.store.exists(pid):
            n = len(self.store.project_ids())
            if n >= self.settings.max_projects:
                raise InsufficientStorage(
                    f"project {pid} is new, and this backend already keeps the state of {n} projects, its limit "
                    f"(MOLAL_MAX_PROJECTS={self.settings.max_projects}); raise MOLAL_MAX_PROJECTS, or remove "
                    "the state of projects no longer used")
        return self.store.project(pid)

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
        """:func:`parse_label_config` under this server's limits (``MOLAL_LABEL_CONFIG_BUDGET_S`` for a new
        config); 422 with the reason. Configs parsed before are remembered (Label Studio sends the same one
        with every /predict)."""
        key = (hashlib.sha256(config.encode("utf-8", "surrogatepass")).digest() if isinstance(config, str) else None,
               from_name)
        spec = self._specs.get(key) if key[0] is not None else None
        if spec is not None:
            return spec
        try:
            spec = parse_label_config(config, from_name, max_classes=self.settings.max_classes,
                                      max_chars=self.settings.max_label_config_chars,
                                      budget_s=self.settings.label_config_budget_s)
        except LabelConfigError as exc:
            raise Unprocessable(str(exc)) from None
        self._specs.put(key, spec)
        return spec

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
    def mixture_for(self, state: ProjectState, classes: tuple[str, ...] | list[str], texts: list[str] | None = None,
                    examples: list[dict[str, str]] | None = None, descriptions: dict[str, str] | None = None,
                    task: str | None = None):
        """The project's mixture (loaded once per process). ``MOLAL_MIXTURE`` / the project's ``mixture``
        setting names a config file; otherwise ``Mixture.default`` decides once per project from a probe
        of the project's texts (stored, so every process and every later batch gets the same mixture).
        Returns None when the default is still undecided and no texts are given. ``descriptions`` (class ->
        one line: the label config's hints, :attr:`LabelSpec.descriptions`) reach every member unless the
        project setting ``hints`` is off; ``task`` (a training job's framing from the labelling instructions)
        frames every LLM member's prompt, else the framing stored with the serving model. Prompts with
        ``examples = "seeds"`` get ``examples`` (a training job's), else those stored with the serving model
        (none yet: zero-shot)."""
        ps = self.project_settings(state)
        desc = dict(descriptions or {}) if ps.hints else {}
        base = self._base_mixture(state, classes, texts, desc)
        if base is None:
            return None
        task = task if task is not None else (state.get(TASK_FRAMING_KEY) or "")
        if desc or task or base.task:
            ctx_key = ("context", base.fingerprint(), _short(json.dumps([sorted(desc.items()), task])))
            base = self._mixtures.setdefault(ctx_key, lambda b=base: b.with_context(desc, task))
        if not base.wants_seed_examples():
            return base
        ex = examples if examples is not None else (state.get("seed_examples") or [])
        return self._mixtures.setdefault(("seeds", base.fingerprint(), _short(json.dumps(ex))),
                                        lambda: base.with_seed_examples(ex))

    def _base_mixture(self, state: ProjectState, classes, texts: list[str] | None,
                      descriptions: dict[str, str] | None = None):
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
            # spread over the texts, not the first 32: a pool whose head happens to be in the bundled recording
            # (and the rest not) would otherwise get the replay mixture, which fails on the rest
            # the first PROBE_CHARS of each: the probe only asks whether the bundled recording holds the texts
            # (none of its questions is near that long), and is stored with the project (32 x 32,000
            # characters would make every project's state 1 MB)
            probe = [t[:PROBE_CHARS] for t in good[:: max(1, len(good) // 32)][:32]]
            state.put("default_mixture_probe", probe)
        desc = dict(descriptions or {})

        def make():
            # described classes: the scorers include one whose label texts are the descriptions themselves
            m = Mixture.default(texts=probe, class_names=list(classes), descriptions=desc or None)
            log.info("project %s: default mixture %r", state.id, m)
            return m

        key = ("default", _short(json.dumps(probe)), tuple(classes))
        if desc:  # only then: projects without descriptions keep their key
            key += (_short(json.dumps(sorted(desc.items()))),)
        return self._mixtures.setdefault(key, make)

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

    def serving(self, state: ProjectState, spec: LabelSpec, texts: list[str] | None = None) -> Serving:
        """What serves this project now (:class:`Serving`)."""
        ps = self.project_settings(state)
        mixture = self.mixture_for(state, spec.classes, texts, descriptions=spec.description_map)
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
                return Serving("student", m.pointer["student"], m, mixture)
            fp = m.manifest.get("info", {}).get("mixture_fingerprint")
            if mixture is not None and fp == mixture.fingerprint():
                return Serving("molam", m.pointer["molam"], m, mixture)
            if mixture is not None:
                log.warning("project %s: the mixture changed since MoLAM was trained; serving the mixture mean",
                            state.id)
        if mixture is None:
            return Serving("mixture-mean", "mixture-mean-undecided", None, None)
        return Serving("mixture-mean", self.mixture_version(mixture, spec.classes), None, mixture)

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
