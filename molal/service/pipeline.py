"""The Label Studio integration: :class:`Service` (one per process) used by ``backend/`` and the CLI.

* ``setup`` / ``predict`` — what Label Studio's ``/setup`` and ``/predict`` call (see molal.service.predict).
* ``webhook`` — counts annotations and queues training (``START_TRAINING``, every ``train_every``).
* ``run_job`` — runs one job through the table :data:`molal.service.train.JOBS` (train, sync, query, annotate);
  :func:`run_job_by_id` is the entry point of RQ workers (``molal worker``).

What a Service shares with the jobs and handlers below it (store, queue, cache, models) is its
:class:`~molal.service.runtime.Runtime`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from molal.config import Settings
from molal.service.errors import BadRequest, Gone, NotFound, TooLarge
from molal.service.jobs import JobContext, execute, public_job
from molal.service.lstrust import setup_usable
from molal.service.predict import Clock, check_tasks, predict_tasks
from molal.service.runtime import Runtime
from molal.service.store import ProjectIdError, parse_project_id, version_name
from molal.service.train import JOBS

log = logging.getLogger("molal.service")

#: actions Label Studio sends to webhooks (webhooks.models.WebhookAction + START_TRAINING in 1.23)
LS_ACTIONS = {
    "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED",
    "REVIEWS_DELETED", "START_TRAINING",
}
ANNOTATION_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED"}


class Service(Runtime):
    """A :class:`~molal.service.runtime.Runtime` that answers Label Studio: ``/setup``, ``/predict``, webhooks,
    ``/train``, the job, version and project views; it runs jobs through :data:`molal.service.train.JOBS`."""

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings, runner=self.run_job, kinds=tuple(JOBS))

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
        if srv.kind == "student" and not srv.model.student_loaded:
            # loading torch + the encoder takes seconds: warm it in the background (setup must answer in 3 s)
            threading.Thread(target=self._warm_student, args=(state, srv.model), daemon=True,
                             name="molal-warm-student").start()
        return {"model_version": srv.version}

    # -- /predict --------------------------------------------------------------------------------------
    def predict(self, payload: Any, budget_s: float | None = None, started: float | None = None) -> dict:
        """The answer to ``/predict`` within ``budget_s`` (``MOLAL_PREDICT_BUDGET_S``) from ``started`` (a
        ``time.monotonic()`` value: when the request's handler began, before its body was parsed; default
        now): :func:`molal.service.predict.predict_tasks`."""
        started = time.monotonic() if started is None else started
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
        # bad batches are refused before any state is created
        texts, _ = check_tasks(tasks, spec, self.settings.max_text_chars)
        state = state or self.project(pid)
        budget = self.settings.predict_time_budget_s if budget_s is None else budget_s
        t0 = time.perf_counter()
        clock = Clock.plan(started, budget, len(tasks), sum(len(t) for t in texts if t is not None))
        out = predict_tasks(self, state, spec, tasks, clock)
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
            return self.train_submitted(pid, "START_TRAINING")
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
            # molal's own certified labels (molal.service.quality: "Created from prediction") are no new label
            counted = [a for a in anns if not a.get("was_cancelled") and a.get("last_action") != "prediction"]
            n = state.incr("new_annotations", len(counted)) if counted else state.get("new_annotations", 0)
            every = self.project_settings(state).train_every
            if every > 0 and n >= every and state.current() is not None:  # retrain: a model serves already
                state.put("new_annotations", 0)
                return {**self.train_submitted(pid, f"{n} new annotations"), "new_annotations": n}
            from molal.service.queue import retire_when_due

            retire_when_due(self, state)  # the superseded versions' grace is over: their predictions go
            return {"status": "counted", "project": pid, "new_annotations": n, "train_every": every}
        return {"status": "ignored", "action": action}

    def train_request(self, payload: Any) -> dict:
        """``POST /train`` (older Label Studio flow, feature flag off): queue a train job like START_TRAINING;
        the job pulls the labelled tasks itself, so the annotations in the payload are not needed."""
        if not isinstance(payload, dict):
            raise BadRequest("expected a JSON object with 'project'")
        pid = self.known_project(self._project_from({"action": "train", **payload})).id
        self.count(webhook_requests=1)
        return self.train_submitted(pid, "/train")

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
    def after_job(self, row: dict) -> None:
        """A training or queue job ended: show the project's state in Label Studio (molal.service.status)."""
        if row.get("kind") in ("train", "queue"):
            from molal.service.status import announce

            announce(self, self.store.project(row["project"]))

    def train_submitted(self, pid: int, source: str) -> dict:
        """Queue a training job and show it in Label Studio (in a thread: the caller answers at once)."""
        from molal.service.status import announce_later

        job, created = self.submit(pid, "train", source=source)
        announce_later(self, self.store.project(pid))
        return {"status": "queued" if created else "coalesced", "job": job["id"], "project": pid}

    def run_job(self, ctx: JobContext) -> dict:
        """Run a claimed job with its function in :data:`molal.service.train.JOBS`."""
        kind = ctx.job["kind"]
        fn = JOBS.get(kind)
        if fn is None:
            raise NotFound(f"unknown job kind {kind!r}; known: {', '.join(JOBS)}")
        return fn(self, self.store.project(ctx.job["project"]), ctx)

    def job(self, job_id: str) -> dict:
        """One job as HTTP shows it (:func:`molal.service.jobs.public_job`: no payload, no traceback)."""
        if not isinstance(job_id, str) or not job_id.isalnum() or len(job_id) > 32:
            raise BadRequest("bad job id")
        row = self.jobs.get(job_id)
        if row is None:
            raise NotFound(f"no job {job_id}")
        return public_job(row)

    #: molal's job states as Label Studio's train-job protocol names them (``POST /job_status``)
    LS_JOB_STATUS = {"queued": "queued", "running": "started", "succeeded": "finished", "failed": "failed"}

    def job_status(self, body: dict) -> dict:
        """``POST /job_status`` ``{"job": "<id>"}``: Label Studio records the ``job`` of a training response
        (``MLBackendTrainJob``) and asks this for its status: ``{"job_status": queued|started|finished|failed,
        ...}`` with the public job. An unknown job is :class:`Gone` (410: Label Studio reads "removed")."""
        job_id = body.get("job") if isinstance(body, dict) else None
        if not isinstance(job_id, str):
            raise BadRequest('send {"job": "<job id>"}')
        try:
            job = self.job(job_id)
        except NotFound:
            raise Gone(f"no job {job_id} (finished jobs are pruned; GET /jobs?project=N lists the kept ones)") from None
        return {"job_status": self.LS_JOB_STATUS.get(job["status"], job["status"]), **job}

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
            out.append(version_name("molam", v["version"]))
            if v["info"].get("student"):
                out.append(version_name("student", v["version"]))
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

    def status_page(self, project: object) -> str:
        """``GET /projects/N/status``: the project's state as a page (a project this backend never saw: 404)."""
        from molal.service.status import status_page

        return status_page(self, self.known_project(project))

    def project_info(self, project: object, public: bool = False) -> dict:
        """Settings, current model, versions of a project (``molal project show``; ``GET /projects/N`` with
        ``public``: the project must exist, and the mixture config is named by its file name, not its path)."""
        state = self.known_project(project) if public else self.project(project)
        d = state.summary(self.settings)
        d["settings"] = asdict(self.project_settings(state))
        from molal.service.status import project_status

        st = project_status(self, state)
        d["queue"], d["training"], d["last_training"] = st["queue"], st["training"], st["last"]
        from molal.service.quality import QUALITY_KEY

        d["quality"] = state.get(QUALITY_KEY)  # molal.service.quality: measured against people's labels
        if public and d["settings"].get("mixture"):
            d["settings"]["mixture"] = Path(d["settings"]["mixture"]).name
        return d


def run_job_by_id(job_id: str, model_dir: str, wait_s: float = 24 * 3600) -> dict | None:
    """Entry point of RQ workers (``molal worker``; the server enqueues this function by name): claim job
    ``job_id`` (waiting while its project has another job running) and run it."""
    from molal.config import get_settings

    svc = Service(get_settings(model_dir=model_dir))
    deadline = time.monotonic() + wait_s
    while True:
        job = svc.jobs.claim(job_id)
        if job is not None:
            return execute(svc.jobs, job, svc.run_job, svc.after_job)
        row = svc.jobs.get(job_id)
        if row is None or row["status"] != "queued":
            return row  # already run elsewhere, coalesced or failed
        if time.monotonic() > deadline:
            return row
        svc.jobs.reap_stale()
        time.sleep(1.0)
