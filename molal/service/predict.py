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

The budget holds inside a long model call too: the mixture runs in a thread of the service's predict pool
and the request waits for it only until the deadline (+1 s); then it answers with what the annotation cache
holds, and the call still running finishes into the cache (the background job then finds it there). The
student, when it serves, predicts in chunks and stops at the deadline the same way.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import numpy as np

from molal.service.errors import BadRequest, Unprocessable
from molal.service.labelconfig import LabelSpec
from molal.service.taskdata import resolve_texts

if TYPE_CHECKING:
    from molal.service.runtime import Runtime
    from molal.service.store import ProjectState

log = logging.getLogger("molal.predict")


#: how long past its deadline a request waits for a model call already running before answering without it
DEADLINE_GRACE_S = 1.0
#: texts per student forward between two deadline checks
STUDENT_CHUNK = 256


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


def annotate_by(mixture, texts: list[str], spec: LabelSpec, svc: Runtime, deadline: float):
    """:func:`_annotate` that returns by ``deadline`` (+ :data:`DEADLINE_GRACE_S`) even when one model call
    runs longer: the call goes on in the predict pool and lands in the cache; the answer is what the cache
    holds at the deadline."""
    fut = svc.predict_pool().submit(_annotate, mixture, texts, spec, svc, deadline)
    try:
        return fut.result(timeout=max(0.0, deadline - time.monotonic()) + DEADLINE_GRACE_S)
    except FutureTimeout:
        fut.cancel()  # still queued behind other requests' calls: it never starts
        log.warning("a model call outlasted the predict budget; answering from the cache (the call finishes "
                    "into the cache in the background)")
        return _annotate(mixture, texts, spec, svc, deadline=time.monotonic())  # cache only


def student_probs(student, texts: list[str], deadline: float) -> tuple[dict[int, np.ndarray], list[int]]:
    """The student's probabilities for ``texts`` in chunks until ``deadline``: (row -> probs, rows not done)."""
    done: dict[int, np.ndarray] = {}
    for s in range(0, len(texts), STUDENT_CHUNK):
        if done and time.monotonic() >= deadline:
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


def predict_tasks(svc: Runtime, state: ProjectState, spec: LabelSpec, tasks: list, deadline: float) -> dict[str, Any]:
    ps = svc.project_settings(state)
    max_chars = svc.settings.max_text_chars
    texts, errors = check_tasks(tasks, spec, max_chars)
    texts = resolve_texts(svc.settings, state, texts, errors)  # Label Studio-hosted .txt files → their text
    for i, t in enumerate(texts):
        if t is not None and len(t) > max_chars:  # a file's content is held to the same limit
            texts[i] = None
            errors[i] = too_long(len(t), max_chars)
    if tasks and all(t is None for t in texts):
        raise Unprocessable(f"no task has a text to annotate: {'; '.join(sorted(set(errors.values())))[:300]}")
    if not tasks:
        return {"results": [], "model_version": svc.serving(state, spec).version, "pending": 0}
    good = [i for i, t in enumerate(texts) if t is not None]
    good_texts = [texts[i] for i in good]
    srv = svc.serving(state, spec, good_texts)
    mixture = srv.mixture
    results: list[Any] = [[] for _ in tasks]
    pending: list[int] = []
    main_probs: dict[int, np.ndarray] = {}
    per_llm: dict[int, list[dict]] = {}

    if not srv.needs_llms:  # the student serves
        student = svc.student_of(state, srv.model)
        got, late = student_probs(student, good_texts, deadline)
        for j, p in got.items():
            main_probs[good[j]] = p
        pending = [good[j] for j in late]
        if ps.per_llm_predictions and mixture is not None:
            # cache only (no LLM call): a deadline already passed returns what is cached
            res = _annotate(mixture, good_texts, spec, svc, deadline=time.monotonic())
            llm_p = res.outputs.normalized_probs() if len(res.done_idx) else None
            for r, jj in enumerate(res.done_idx.tolist()):
                per_llm[good[jj]] = llm_entries(spec, mixture.member_versions(), llm_p[r])
    else:
        res = annotate_by(mixture, good_texts, spec, svc, deadline)
        done = res.done_idx.tolist()
        if done:
            P = srv.probs_from_outputs(res.outputs)
            llm_p = res.outputs.normalized_probs() if ps.per_llm_predictions else None
            for r, jj in enumerate(done):
                main_probs[good[jj]] = np.asarray(P[r], dtype=np.float64)
                if llm_p is not None:
                    per_llm[good[jj]] = llm_entries(spec, mixture.member_versions(), llm_p[r])
        for jj, why in res.failed.items():
            errors[good[jj]] = f"annotation failed: {why}"
        pending = [good[jj] for jj in res.pending_idx.tolist()]

    for i, p in main_probs.items():
        results[i] = [entry(spec, p, srv.version), *per_llm.get(i, [])]
    out: dict[str, Any] = {"results": results, "model_version": srv.version, "pending": len(pending)}
    if pending and srv.needs_llms:  # the student needs no LLM call: Label Studio asks again later
        ptexts = list(dict.fromkeys(texts[i] for i in pending))
        job, _ = svc.submit(state.id, "annotate", {"texts": ptexts, "classes": list(spec.classes)},
                            source="predict deadline")
        out["background_job"] = job["id"]
        log.info("project %s: %d task(s) not annotated within the budget; background job %s annotates them "
                 "(retrieve predictions again later)", state.id, len(pending), job["id"])
    if errors:
        out["errors"] = {str(tasks[i].get("id", i)): why for i, why in sorted(errors.items())}
    return out
