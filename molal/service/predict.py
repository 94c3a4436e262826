"""``/predict``: Label Studio tasks → one prediction entry per task, in order.

Each entry is a list: the serving model's prediction (MoLAM, the student, or — before MoLAM is trained —
the mixture's mean probabilities, version ``mixture-mean-<hash>``) and, when the project's
``per_llm_predictions`` is on, one prediction per member of the mixture (``model_version = "llm:<name>"``, or
``"scorer:<name>"`` for an embedding scorer, which is not a language model).

Time budget: the mixture annotates under ``deadline`` (``MOLAL_PREDICT_BUDGET_S``, well under Label
Studio's 100 s predict timeout). Everything annotated is cached, so a retried batch costs nothing. Tasks
not annotated by the deadline get an **empty list** as their entry: Label Studio then stores *no*
prediction for them (its loop over a task's predictions runs zero times), so they are not marked as
holding the current model_version and a later "Retrieve predictions" asks for them again. Meanwhile an
``annotate`` job annotates them in the background, and the later retrieval is served from the cache.
Tasks whose text is missing (``data[<Text value>]`` absent or blank) or longer than ``MOLAL_MAX_TEXT_CHARS``
also get an empty list and are listed in the extra ``errors`` field of the answer; if *no* task has a text the
request is rejected (422).

The budget is the answer's: it runs from the moment the request's handler starts (the body read) until the
answer is built, whatever the input mix under the limits (:class:`Clock`). The model work stops early
enough to leave time for what follows it — the cache lookup, the entries, the background job, the JSON —
estimated from the request's size (:data:`FINISH_BASE_S`, :data:`FINISH_S_PER_MB`, :data:`FINISH_S_PER_TASK`,
measured in bench/predict_budget.py with a 3x margin). Every stage keeps to it: Label Studio-hosted files
are read in the first half of the model work's time (the rest are pending, without error), the mixture runs in a thread of the
service's predict pool and the request waits for it only until the model work's deadline plus a grace
(then it answers with what the annotation cache holds, and the call still running finishes into the cache,
where the background job finds it), the student predicts in chunks and stops at that deadline, and the
entries are built until the answer's deadline (the rest are pending; their annotations are cached).
Long texts cost the encoders only the characters they read (:func:`molal.embeddings.clip_texts`).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from molal.service.errors import BadRequest, Unprocessable
from molal.service.labelconfig import LabelSpec
from molal.service.taskdata import resolve_texts

if TYPE_CHECKING:
    from molal.service.runtime import Runtime
    from molal.service.store import ProjectState

log = logging.getLogger("molal.predict")


#: how long past the model work's deadline a request waits for a model call already running before answering
#: without it (within the budget: :class:`Clock` keeps it, scaled down for small budgets)
DEADLINE_GRACE_S = 1.0
#: texts per student forward between two deadline checks
STUDENT_CHUNK = 64
#: entries built between two deadline checks (the first chunk always is: a budget of 0 answers from the cache)
ENTRY_CHUNK = 256
#: pending texts up to this many characters are queued for the background job in the request itself
QUEUE_INLINE_CHARS = 1_000_000
#: the time /predict keeps for the steps after the model work: a base, per MB of task text (the cache lookup
#: hashes every text) and per task (entries and JSON). Measured by bench/predict_budget.py on a loaded 2-core
#: machine, times 3 (bench/RESULTS.md); the background job is queued beside them (:func:`queue_pending`)
FINISH_BASE_S = 0.2
FINISH_S_PER_MB = 0.05
FINISH_S_PER_TASK = 0.0007


@dataclass(frozen=True)
class Clock:
    """/predict's deadlines (``time.monotonic()`` values): ``end`` the answer's, ``work`` the model work's
    (reading task files, annotating, the student), ``wait`` how long the request waits for a model call still
    running at ``work``. What lies between ``work`` and ``end`` is the estimated time of the last steps
    plus the grace, at most half the budget."""

    end: float
    work: float
    wait: float

    @classmethod
    def plan(cls, started: float, budget_s: float, n_tasks: int, n_chars: int) -> Clock:
        finish = FINISH_BASE_S + FINISH_S_PER_MB * n_chars / 1e6 + FINISH_S_PER_TASK * n_tasks
        budget_s = max(0.0, float(budget_s))
        scale = min(1.0, budget_s / 2 / (finish + DEADLINE_GRACE_S))
        end = started + budget_s
        wait = end - finish * scale
        return cls(end=end, work=wait - DEADLINE_GRACE_S * scale, wait=wait)

    def left(self, until: float | None = None) -> float:
        return (self.end if until is None else until) - time.monotonic()


def too_long(n: int, max_chars: int) -> str:
    return f"task text has {n} characters; this backend annotates at most {max_chars} (MOLAL_MAX_TEXT_CHARS)"


def task_texts(tasks: list, spec: LabelSpec, max_chars: int | None = None) -> tuple[list[str | None], dict[int, str]]:
    """The text of each task (None when missing or over ``max_chars``) and position -> reason for the bad ones."""
    texts: list[str | None] = []
    errors: dict[int, str] = {}
    for i, t in enumerate(tasks):
        if not isinstance(t, dict):
            raise BadRequest(f"tasks[{i}] is not an object")
        data = t.get("data")
        if not isinstance(data, dict):
            texts.append(None)
            errors[i] = "task has no 'data' object"
            continue
        v = data.get(spec.value_key)
        if not isinstance(v, str) or not v.strip():
            texts.append(None)
            errors[i] = f"task data has no text in field {spec.value_key!r}" if v is None else (
                f"task data field {spec.value_key!r} is {'blank' if isinstance(v, str) else type(v).__name__}")
            continue
        if max_chars is not None and len(v) > max_chars:
            texts.append(None)
            errors[i] = too_long(len(v), max_chars)
            continue
        texts.append(v)
    return texts, errors


def check_tasks(tasks: list, spec: LabelSpec, max_chars: int | None = None) -> tuple[list[str | None], dict[int, str]]:
    """:func:`task_texts`, refusing (422) a non-empty batch in which no task has a usable text."""
    texts, errors = task_texts(tasks, spec, max_chars)
    if tasks and all(t is None for t in texts):
        reasons = sorted(set(errors.values()))
        raise Unprocessable(
            f"no task has a text to annotate: {'; '.join(reasons)[:300]} (the label config's <Text> tag reads "
            f"${spec.value_key})"
        )
    return texts, errors


def _annotate(mixture, texts: list[str], spec: LabelSpec, svc: Runtime, deadline: float):
    try:
        return mixture.annotate(texts, list(spec.classes), cache=svc.cache, deadline=deadline)
    except ValueError as exc:  # the annotators' contract: the class list does not suit them
        raise Unprocessable(f"the mixture cannot annotate the label config's classes: {exc}") from None


def annotate_by(mixture, texts: list[str], spec: LabelSpec, svc: Runtime, clock: Clock):
    """:func:`_annotate` under ``clock.work`` that returns by ``clock.wait`` even when one model call runs
    longer: the call goes on in the predict pool and lands in the cache; the answer is what the cache holds
    then."""
    if clock.left(clock.work) <= 0:
        return _annotate(mixture, texts, spec, svc, deadline=time.monotonic())  # cache only
    fut = svc.predict_pool().submit(_annotate, mixture, texts, spec, svc, clock.work)
    try:
        return fut.result(timeout=max(0.0, clock.left(clock.wait)))
    except FutureTimeout:
        fut.cancel()  # still queued behind other requests' calls: it never starts
        log.warning("a model call outlasted the predict budget; answering from the cache (the call finishes "
                    "into the cache in the background)")
        return _annotate(mixture, texts, spec, svc, deadline=time.monotonic())  # cache only


def student_probs(student, texts: list[str], deadline: float) -> tuple[dict[int, np.ndarray], list[int]]:
    """The student's probabilities for ``texts`` in chunks until ``deadline``: (row -> probs, rows not done)."""
    done: dict[int, np.ndarray] = {}
    for s in range(0, len(texts), STUDENT_CHUNK):
        if time.monotonic() >= deadline:
            return done, list(range(s, len(texts)))
        P = student.predict_proba(texts[s : s + STUDENT_CHUNK])
        for j in range(len(P)):
            done[s + j] = P[j]
    return done, []


def entry(spec: LabelSpec, probs: np.ndarray, version: str) -> dict:
    k = int(probs.argmax())  # the method: np.argmax's dispatch cost more than the work, 60,000 times a batch
    score = float(probs[k])
    return {"result": [spec.result(spec.classes[k], score)], "score": score, "model_version": version}


def llm_entries(spec: LabelSpec, versions: list[str], probs: np.ndarray) -> list[dict]:
    """One prediction per member of the mixture (``versions``: :meth:`Mixture.member_versions`, in the order
    of the outputs) from one row ``probs`` (L, K) of ``LLMOutputs.normalized_probs()`` (normalise once per
    batch, not per row)."""
    if len(versions) != len(probs):
        raise ValueError(f"{len(versions)} member versions for {len(probs)} members")
    return [entry(spec, probs[j], v) for j, v in enumerate(versions)]


def mean_probs(outputs) -> np.ndarray:
    """The mixture's mean probability over LLMs (what serves before MoLAM is trained)."""
    return outputs.normalized_probs().mean(axis=1)


def queue_pending(svc: Runtime, state: ProjectState, texts: list[str], spec: LabelSpec) -> Future | None:
    """Queue the ``annotate`` job of ``texts``, which /predict could not annotate within its budget; a future
    of the job. The job stores its texts: up to :data:`QUEUE_INLINE_CHARS` characters that costs
    milliseconds and is done here; more (up to 32 MB) can take seconds on a busy disk, and is done in the
    service's queue thread (:meth:`Runtime.queue_later`) while the request goes on — or not at all (None)
    when that thread has a backlog: the tasks stay pending, and Label Studio's next retrieval queues them."""

    def submit() -> dict:
        job, _ = svc.submit(state.id, "annotate", {"texts": texts, "classes": list(spec.classes)},
                            source="predict deadline")
        log.info("project %s: %d text(s) not annotated within the budget; background job %s annotates them "
                 "(retrieve predictions again later)", state.id, len(texts), job["id"])
        return job

    if sum(map(len, texts)) > QUEUE_INLINE_CHARS:
        fut = svc.queue_later(submit)
        if fut is None:
            log.warning("project %s: %d text(s) not annotated within the budget and not queued (the queue thread "
                        "is busy storing earlier ones); Label Studio's next retrieval asks for them again",
                        state.id, len(texts))
        return fut
    done: Future = Future()
    done.set_result(submit())
    return done


def read_texts(svc: Runtime, state: ProjectState, texts: list[str | None], errors: dict[int, str],
               deadline: float) -> tuple[list[str | None], list[int]]:
    """:func:`~molal.service.taskdata.resolve_texts` (Label Studio-hosted .txt files → their text) one task at
    a time until ``deadline``, each read's timeout capped by the time left: (texts, rows not read in time). A
    file over ``MOLAL_MAX_TEXT_CHARS`` is dropped as soon as it is read (files may hold up to
    ``MOLAL_TASK_FILE_MAX_BYTES`` each: 10,000 of them must not be held at once)."""
    if not any(isinstance(t, str) and "/data/" in t for t in texts):  # resolve_texts' own test: no file
        return texts, []
    out: list[str | None] = list(texts)
    unread: list[int] = []
    settings = svc.settings
    for i, t in enumerate(texts):
        if t is None:
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            out[i] = None
            unread.append(i)
            continue
        capped = left < svc.settings.task_file_timeout_s
        if capped:
            settings = svc.settings.model_copy(update={"task_file_timeout_s": left})
        err: dict[int, str] = {}
        out[i] = resolve_texts(settings, state, [t], err)[0]
        if err and capped and time.monotonic() >= deadline:  # cut short by this request's deadline: pending
            unread.append(i)
        elif err:
            errors[i] = err[0]
        elif out[i] is not None and len(out[i]) > svc.settings.max_text_chars:
            errors[i] = too_long(len(out[i]), svc.settings.max_text_chars)
            out[i] = None
    return out, unread


def predict_tasks(svc: Runtime, state: ProjectState, spec: LabelSpec, tasks: list, clock: Clock) -> dict[str, Any]:
    """The answer to a ``/predict`` of ``tasks`` (checked by :func:`check_tasks`) by ``clock.end``."""
    ps = svc.project_settings(state)
    max_chars = svc.settings.max_text_chars
    texts, errors = check_tasks(tasks, spec, max_chars)
    # Label Studio-hosted files: read in the first half of the model work's time (the other is annotating's)
    texts, unread = read_texts(svc, state, texts, errors, (time.monotonic() + clock.work) / 2)
    if tasks and not unread and all(t is None for t in texts):
        raise Unprocessable(f"no task has a text to annotate: {'; '.join(sorted(set(errors.values())))[:300]}")
    if not tasks:
        return {"results": [], "model_version": svc.serving(state, spec).version, "pending": 0}
    good = [i for i, t in enumerate(texts) if t is not None]
    good_texts = [texts[i] for i in good]
    srv = svc.serving(state, spec, good_texts)
    mixture = srv.mixture
    results: list[Any] = [[] for _ in tasks]
    pending: list[int] = list(unread)
    main_probs: dict[int, np.ndarray] = {}
    per_llm: dict[int, list[dict]] = {}
    votes: dict[int, np.ndarray] = {}  # task position -> (L, K) each member's probabilities (the review line)

    if not good:
        pass  # every task with a text is a file not read in time: all pending
    elif not srv.needs_llms:  # the student serves
        student = svc.student_of(state, srv.model)
        got, late = student_probs(student, good_texts, clock.work)
        for j, p in got.items():
            main_probs[good[j]] = p
        pending += [good[j] for j in late]
        if ps.per_llm_predictions and mixture is not None:
            # cache only (no LLM call): a deadline already passed returns what is cached
            res = _annotate(mixture, good_texts, spec, svc, deadline=time.monotonic())
            llm_p = res.outputs.normalized_probs() if len(res.done_idx) else None
            for r, jj in enumerate(res.done_idx.tolist()):
                per_llm[good[jj]] = llm_entries(spec, mixture.member_versions(), llm_p[r])
                votes[good[jj]] = llm_p[r]
    else:
        res = annotate_by(mixture, good_texts, spec, svc, clock)
        done = res.done_idx.tolist()
        if done:
            P = srv.probs_from_outputs(res.outputs)
            llm_p = res.outputs.normalized_probs()
            for r, jj in enumerate(done):
                main_probs[good[jj]] = np.asarray(P[r], dtype=np.float64)
                votes[good[jj]] = llm_p[r]
                if ps.per_llm_predictions:
                    per_llm[good[jj]] = llm_entries(spec, mixture.member_versions(), llm_p[r])
        for jj, why in res.failed.items():
            errors[good[jj]] = f"annotation failed: {why}"
        pending += [good[jj] for jj in res.pending_idx.tolist()]

    queued = [i for i in pending if texts[i] is not None]  # not the files left unread
    job = None
    if queued and srv.needs_llms:  # the student needs no LLM call: Label Studio asks again later
        job = queue_pending(svc, state, list(dict.fromkeys(texts[i] for i in queued)), spec)
    # the entries until the answer's deadline, less the JSON of what is built (the first ENTRY_CHUNK always);
    # the rest are pending (what the mixture said of them is cached: the next retrieval answers them at once)
    stop = clock.end - FINISH_S_PER_TASK / 3 * len(tasks)
    order = sorted(main_probs)
    for n, i in enumerate(order):
        if n and n % ENTRY_CHUNK == 0 and time.monotonic() >= stop:
            pending += order[n:]
            break
        results[i] = [entry(spec, main_probs[i], srv.version), *per_llm.get(i, [])]
    out: dict[str, Any] = {"results": results, "model_version": srv.version, "pending": len(pending)}
    if job is not None:
        try:
            out["background_job"] = job.result(timeout=max(0.0, stop - time.monotonic()))["id"]
        except FutureTimeout:  # queued all the same, once its texts are stored
            out["background_job"] = "queued"
    if errors:
        out["errors"] = {str(tasks[i].get("id", i)): why for i, why in sorted(errors.items())}
    refresh_lines(svc, state, spec, tasks, main_probs, votes, srv, mixture)
    return out


def refresh_lines(svc: Runtime, state: ProjectState, spec: LabelSpec, tasks: list, main_probs: dict[int, np.ndarray],
                  votes: dict[int, np.ndarray], srv, mixture) -> int:
    """A person opened a task (Label Studio asks ``/predict`` for one that holds no prediction): give it the
    serving model's review line where its own is from an older model (:func:`molal.service.queue.refresh_on_open`).
    Nothing for a batch, without a Label Studio molal may talk to, or when it cannot be reached."""
    from molal.service.queue import REFRESH_MAX_TASKS, refresh_on_open
    from molal.service.review import review_fields, voters_of

    if not main_probs or len(tasks) > REFRESH_MAX_TASKS:
        return 0
    try:
        from molal.service.lsclient import client_for

        client = client_for(svc.settings, state)
    except Exception:  # noqa: BLE001 - no Label Studio molal may talk to for this project: nothing to refresh
        return 0
    at = sorted(main_probs)
    members = [votes.get(i) for i in at]
    llm = np.stack(members) if all(m is not None for m in members) else None
    voters = voters_of(mixture.member_versions()) if mixture is not None else "LLM"
    made = review_fields(np.stack([main_probs[i] for i in at]), llm, spec.classes, None, voters)
    return refresh_on_open(client, state, tasks, dict(zip(at, made, strict=True)), srv.version,
                           svc.project_settings(state).priority_field)
