"""The queue a person meets in Label Studio: which unlabeled task comes next, and why molal pre-filled what it
did — for every task of the "molal queue" tab, at any position, not only the first ones.

A training (or query) job makes a :class:`QueuePlan`: every unlabeled task in queue order (the strategy's
ranking over the new student; without a student, MoLAM's least sure first), each with its priority (the tab's
sort key), its rank, and the review fields of :mod:`molal.service.review` from the model that now serves.
Label Studio updates task data one task at a time (one PATCH each, tens of milliseconds on its side), so the
plan is written in two parts:

* the **head** (``head`` tasks, :data:`molal.config.QUEUE_HEAD`) by the job itself, before it reports done;
* the **rest** by a background job (kind ``queue``, :func:`queue_job`), in queue order, only the tasks whose
  values changed. It gives way to any other job of the project (a new training job makes a new plan: the
  writer of the old one stops), and a training job with nothing new to learn resumes an unfinished one.

Priorities grow with each plan (``epoch x EPOCH_SPAN + n - rank``), so a task the writer has not reached
yet — still holding a value of an older plan — never sorts above a task of the new plan: a person labelling
from the tab meets the new order from its first task on, and the old order only after it. Every line says
its rank and which model wrote it; a task whose line is from an older model gets a fresh one when a person
opens it (:func:`refresh_on_open`, from ``/predict``: Label Studio asks ``/predict`` for a task that holds no
prediction, and reads the task again afterwards). Tasks molal has not ranked (imported after the last job)
say so, and what happens next.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import TYPE_CHECKING

import numpy as np

from molal.lru import LRU

if TYPE_CHECKING:
    from molal.service.jobs import JobContext
    from molal.service.labelconfig import LabelSpec
    from molal.service.lsclient import LSClient
    from molal.service.pool import Pool
    from molal.service.runtime import Runtime
    from molal.service.store import ProjectState

log = logging.getLogger("molal.queue")

#: priorities of plan ``e`` lie in ``[e * EPOCH_SPAN, (e + 1) * EPOCH_SPAN)``: projects up to 10M tasks
EPOCH_SPAN = 10_000_000
PLAN_KEY, EPOCH_KEY, WRITTEN_KEY, RETIRE_KEY = "queue_plan", "queue_epoch", "queue_written", "queue_retire"
RANK_FIELD, MODEL_FIELD = "molal_rank", "molal_model"
#: tasks per request batch of the background writer (between two checks for a job that needs the project)
WRITE_BATCH = 32
#: concurrent PATCHes of the background writer: Label Studio serves the people labelling meanwhile too
WRITER_THREADS = 2
#: ``/predict`` refreshes the review fields of at most this many tasks a request (a person opening a task)
REFRESH_MAX_TASKS = 3


# -- ranking ----------------------------------------------------------------------------------------------
def rank_rows(student, texts: list[str], strategy: str, budget: int | None = None, seed: int = 0,
              labeled_texts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Order ``texts`` most useful first with the query strategy (molal.query) over the student: (order,
    the student's probabilities (n, K) on ``texts``). With a ``budget``, the strategy picks the first
    ``budget`` (coreset and BADGE cost grows with it) and the rest follows by the student's entropy."""
    from molal.query import build_pool, get_strategy

    if not texts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0))
    st = get_strategy(strategy)
    pool = build_pool(st, student, texts, labeled_texts=labeled_texts)
    b = len(texts) if budget is None else min(int(budget), len(texts))
    order = np.asarray(st.select(pool, b, np.random.default_rng(seed)), dtype=np.int64)
    probs = np.asarray(pool.probs, dtype=np.float64)
    if len(order) < len(texts):  # the rest after the strategy's ``budget``: the student's least sure first
        seen = np.zeros(len(texts), dtype=bool)
        seen[order] = True
        p = np.clip(probs, 1e-12, 1.0)
        ent = -(p * np.log(p)).sum(axis=1)
        rest = np.flatnonzero(~seen)
        order = np.concatenate([order, rest[np.argsort(-ent[rest], kind="stable")]])
    return order, probs


def priorities(order: np.ndarray) -> np.ndarray:
    """Priority per row from a ranking: the first gets ``n``, the last 1 (higher = label sooner)."""
    n = len(order)
    pr = np.zeros(n, dtype=np.int64)
    pr[order] = np.arange(n, 0, -1)
    return pr


def for_humans_first(pool: Pool, rows: list[int], prio: np.ndarray, task_ids: list[int]) -> np.ndarray:
    """``prio`` with the rows of ``task_ids`` (the last round's tasks sent to people, in that order) moved
    above every other row: they head the "next to label" tab whatever the strategy ranks first."""
    out = np.asarray(prio, dtype=np.int64).copy()
    at = {pool.task_ids[r]: i for i, r in enumerate(rows)}
    mine = [at[t] for t in task_ids if t in at]  # still unlabeled
    top = int(out.max()) if len(out) else 0
    for j, i in enumerate(mine):
        out[i] = top + len(mine) - j
    return out


@dataclass
class Ranking:
    """Unlabeled pool rows in queue order (first = label first), and the student's probabilities on them."""

    rows: list[int]
    student_probs: dict[int, np.ndarray] = dc_field(default_factory=dict)
    by: str = ""  # what ordered them, for messages: the strategy, or "MoLAM's confidence"


def rank_queue(state: ProjectState, student, pool: Pool, rows: Iterable[int], strategy: str, top: int = 0,
               on_rows: Callable[[int], None] | None = None) -> Ranking:
    """The unlabeled, not auto-labelled rows of ``rows`` ranked by ``strategy`` over ``student`` (the strategy
    choosing the first ``top``, 0 = all; the rest by its scores' pool order), the tasks last sent to people
    first. ``on_rows(n)`` hears how many before the ranking."""
    from molal.service.store import FOR_HUMANS_KEY

    auto = state.auto_labels()
    unl = [r for r in rows if r not in pool.human and r not in pool.machine and pool.task_ids[r] not in auto]
    if on_rows is not None:
        on_rows(len(unl))
    order, probs = rank_rows(student, [pool.texts[r] for r in unl], strategy,
                             labeled_texts=[pool.texts[r] for r in pool.human], budget=top or None)
    prio = for_humans_first(pool, unl, priorities(order), state.get(FOR_HUMANS_KEY, []))
    ranked = [unl[i] for i in sorted(range(len(unl)), key=lambda i: (-int(prio[i]), pool.task_ids[unl[i]]))]
    sp = {r: probs[i] for i, r in enumerate(unl)} if len(probs) == len(unl) else {}
    return Ranking(rows=ranked, student_probs=sp, by=strategy)


def rank_by_confidence(pool: Pool, rows: Iterable[int], served: dict[int, np.ndarray], state: ProjectState) -> Ranking:
    """Without a student: the unlabeled rows with MoLAM's least sure label first (rows it could not score
    last, by task id)."""
    auto = state.auto_labels()
    unl = [r for r in rows if r not in pool.human and r not in pool.machine and pool.task_ids[r] not in auto]

    def key(r: int) -> tuple[int, float, int]:
        p = served.get(r)
        return (1, 0.0, pool.task_ids[r]) if p is None else (0, float(np.max(p)), pool.task_ids[r])

    return Ranking(rows=sorted(unl, key=key), by="MoLAM's confidence (least sure first)")


def head_limit(ps, pool: Pool) -> int:
    """How many unlabeled tasks get the served model's prediction in a job: ``predictions_top`` when the
    project has more unlabeled tasks than that, else 0 (every task)."""
    top = int(ps.predictions_top or 0)
    return top if top and len(pool) - len(pool.human) > top else 0


def queue_head(pool: Pool, rows: list[int], top: int, prio: np.ndarray | None = None,
               field: str = "priority", keep: Iterable[int] = ()) -> set[int]:
    """The unlabeled ``rows`` a person meets first, at most ``top`` (0 = all), plus the rows of ``keep``:
    by ``prio`` (aligned with ``rows``, higher first) or, without it, by the priority already in the task
    data (``data.<field>``), then by task id, as Label Studio's sequential sampling serves them."""
    unl = [(i, r) for i, r in enumerate(rows) if r not in pool.human]
    keep = set(keep) - set(pool.human)
    if not top or len(unl) <= top:
        return {r for _, r in unl} | keep

    def rank(item: tuple[int, int]) -> tuple[float, int]:
        i, r = item
        if prio is not None:
            p = float(prio[i])
        else:
            try:
                p = float(pool.data[r].get(field) or 0)
            except (TypeError, ValueError):  # a person's own non-numeric value
                p = 0.0
        return -p, int(pool.task_ids[r])

    return {r for _, r in sorted(unl, key=rank)[:top]} | keep


# -- the plan -------------------------------------------------------------------------------------------------
@dataclass
class QueuePlan:
    """Every unlabeled task of a project in queue order, with what the tab and the review panel show."""

    epoch: int
    version: str  # the model that serves (and wrote the review lines)
    field: str  # the priority field (``data.<field>``)
    task_ids: list[int]
    fields: list[dict]  # aligned with task_ids: review fields, molal_rank, molal_model, <field>
    head: int  # how many the job writes itself
    made: float = dc_field(default_factory=time.time)
    digests: list[str] = dc_field(default_factory=list)  # aligned: data_digest of each task's data when planned

    def __len__(self) -> int:
        return len(self.task_ids)

    def to_state(self) -> dict:
        keys = sorted({k for f in self.fields for k in f})
        return {"epoch": self.epoch, "version": self.version, "field": self.field, "head": self.head,
                "made": self.made, "task_ids": self.task_ids, "digests": self.digests, "keys": keys,
                "values": [[f.get(k) for k in keys] for f in self.fields]}

    @classmethod
    def from_state(cls, d: dict) -> QueuePlan:
        keys = d["keys"]
        fields = [{k: v for k, v in zip(keys, row, strict=True) if v is not None} for row in d["values"]]
        return cls(epoch=int(d["epoch"]), version=d["version"], field=d["field"], task_ids=list(d["task_ids"]),
                   fields=fields, head=int(d["head"]), made=float(d.get("made", 0)),
                   digests=list(d.get("digests") or []))

    def index(self) -> dict[int, int]:
        return {t: i for i, t in enumerate(self.task_ids)}


def data_digest(data: dict, skip: Iterable[str] = ()) -> str:
    """A task's data without what molal writes into it (its fields, the priority field ``skip``): what a
    refresh checks a request's copy of the task against before writing it back (16 hex digits of sha256)."""
    import hashlib
    import json

    from molal.service.audit import AUDIT_FIELD
    from molal.service.lsclient import AUTO_FLAG, CERTIFIED_FLAG
    from molal.service.review import FIELDS

    mine = {*FIELDS, RANK_FIELD, MODEL_FIELD, AUTO_FLAG, AUDIT_FIELD, CERTIFIED_FLAG, *skip}
    body = json.dumps({k: v for k, v in data.items() if k not in mine}, sort_keys=True, ensure_ascii=False,
                      default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def version_number(version: str) -> str:
    """``molam-5-1a2b3c4d`` -> ``5`` (what a line shows); anything else as it is."""
    parts = version.split("-")
    return parts[1] if len(parts) >= 3 and parts[1].isdigit() else version


def plan_queue(state: ProjectState, pool: Pool, spec: LabelSpec, ranking: Ranking, *, version: str, field: str,
               head: int, served: dict[int, np.ndarray], llm: dict[int, np.ndarray] | None = None,
               voters: str = "LLM", failed: dict[int, str] | None = None,
               auto: dict[int, str] | None = None, audit_every: int = 0) -> QueuePlan:
    """The plan of ``ranking``: a new epoch (stored in the project's state: :func:`current_epoch`), and per
    task the review fields (``served``: row -> the serving model's probabilities; ``llm``: row -> (L, K) each
    member's; the student's from the ranking), its rank, the model and the priority. ``auto`` (row -> class):
    tasks molal labelled itself (the human-free loop), listed after the ranked ones for an audit.
    ``audit_every`` > 0: the audit slice (:mod:`molal.service.audit`) takes one place at random in each block
    of ``audit_every``, marked by ``data.molal_audit`` only (its line reads like any other)."""
    from molal.service.audit import AUDIT_FIELD, draw, interleave
    from molal.service.review import review_fields
    from molal.service.store import FOR_HUMANS_KEY

    epoch = state.incr(EPOCH_KEY)
    audit: set[int] = set()
    if audit_every:
        pending = draw(state, pool, ranking.rows, audit_every)
        first = set(state.get(FOR_HUMANS_KEY) or [])
        keep = sum(1 for r in ranking.rows[:len(first)] if pool.task_ids[r] in first)
        ranking = Ranking(rows=interleave(ranking.rows, pending, audit_every, keep, seed=[int(state.id), epoch]),
                          student_probs=ranking.student_probs, by=ranking.by)
        audit = set(pending)
    auto = {r: c for r, c in (auto or {}).items()
            if r not in pool.human and r not in pool.machine and r not in set(ranking.rows)}
    ranking = Ranking(rows=[*ranking.rows, *sorted(auto, key=lambda r: pool.task_ids[r])],
                      student_probs=ranking.student_probs, by=ranking.by)
    n = len(ranking.rows)
    model = version_number(version)
    failed = failed or {}
    fields: list[dict] = []
    made: dict[int, dict] = {}
    scored = [r for r in ranking.rows if r in served]
    for has_student in (True, False):  # with the student's uncertainty where the ranking had it
        group = [r for r in scored if (r in ranking.student_probs) == has_student]
        if not group:
            continue
        members = [llm.get(r) for r in group] if llm is not None else []
        llm_arr = np.stack(members) if members and all(m is not None for m in members) else None
        student = np.stack([ranking.student_probs[r] for r in group]) if has_student else None
        made.update(zip(group, review_fields(np.stack([served[r] for r in group]), llm_arr, spec.classes,
                                             student, voters), strict=True))
    for i, r in enumerate(ranking.rows):
        f = dict(made.get(r) or {})
        rank = i + 1
        if f:
            f["molal_review"] = f"#{rank} · {f['molal_review']} · model {model}"
            if r in auto:
                f["molal_review"] += f" · labelled {auto[r]} by molal (human-free loop): check it"
        else:
            why = failed.get(r, "no answer from the mixture")
            f["molal_review"] = (f"#{rank} · molal could not score this task ({why[:120]}); "
                                 "the next training job tries again")
        f[RANK_FIELD] = rank
        f[MODEL_FIELD] = version
        if r in audit:
            f[AUDIT_FIELD] = 1
        f[field] = epoch * EPOCH_SPAN + (n - i)
        fields.append(f)
    return QueuePlan(epoch=epoch, version=version, field=field, task_ids=[pool.task_ids[r] for r in ranking.rows],
                     fields=fields, head=min(int(head), n) if head else n,
                     digests=[data_digest(pool.data[r], (field,)) for r in ranking.rows])


def current_epoch(state: ProjectState) -> int:
    return int(state.get(EPOCH_KEY, 0) or 0)


def save_plan(state: ProjectState, plan: QueuePlan) -> None:
    state.put(PLAN_KEY, plan.to_state())
    state.put(WRITTEN_KEY, {"epoch": plan.epoch, "upto": 0, "total": len(plan), "done": False})


_PLANS: LRU[tuple[str, int, int], QueuePlan] = LRU(8)  # (model dir, project, epoch) -> plan (/predict reads it)


def load_plan(state: ProjectState) -> QueuePlan | None:
    """The project's current plan (None: none yet, or a newer epoch than the stored plan, being made)."""
    epoch = current_epoch(state)
    key = (str(state.dir), state.id, epoch)
    plan = _PLANS.get(key)
    if plan is None:
        d = state.get(PLAN_KEY)
        if not d or int(d.get("epoch", -1)) != epoch:
            return None
        plan = QueuePlan.from_state(d)
        _PLANS.put(key, plan)
    return plan


def progress(state: ProjectState) -> dict:
    """How far the current plan is written: ``{"epoch", "upto", "total", "done"}`` (``GET /projects/N``)."""
    return dict(state.get(WRITTEN_KEY) or {"epoch": 0, "upto": 0, "total": 0, "done": True})


# -- writing -------------------------------------------------------------------------------------------------
def updates(plan: QueuePlan, data_of: Callable[[int], dict | None], start: int, stop: int) -> list[tuple[int, dict]]:
    """(task id, full new data) for the plan's tasks ``[start, stop)`` whose data lacks the plan's values;
    ``data_of(task id)`` is the task's current data (None: labelled since, or gone: skipped)."""
    out = []
    for i in range(start, min(stop, len(plan))):
        t = plan.task_ids[i]
        cur = data_of(t)
        if cur is None:
            continue
        want = plan.fields[i]
        if all(cur.get(k) == v for k, v in want.items()):
            continue
        d = {k: v for k, v in cur.items() if k not in want}
        d.update({k: v for k, v in want.items() if k != plan.field})
        d[plan.field] = want[plan.field]  # the last data key: the Data Manager lists molal's fields before it
        out.append((t, d))
    return out


def write_plan(client: LSClient, plan: QueuePlan, data_of: Callable[[int], dict | None], start: int, stop: int,
               on_batch: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> tuple[int, int]:
    """Write the plan's tasks ``[start, stop)`` that need it, in queue order, :data:`WRITE_BATCH` at a time;
    ``on_batch(position, written)`` after each batch, ``should_stop()`` before each. Returns (tasks written,
    the position reached)."""
    written, i = 0, start
    stop = min(stop, len(plan))
    while i < stop:
        if should_stop is not None and should_stop():
            break
        j = min(i + WRITE_BATCH, stop)
        ups = updates(plan, data_of, i, j)
        if ups:
            written += client.update_task_data(ups)
        i = j
        if on_batch is not None:
            on_batch(i, written)
    return written, i


#: the head's first tasks, written before the new model version is published (:func:`write_head`)
PUBLISH_AFTER = 8


def write_head(svc: Runtime, client: LSClient, state: ProjectState, plan: QueuePlan, pool: Pool,
               ctx: JobContext | None = None, value_key: str = "text", retire: dict | None = None,
               publish: Callable[[], None] | None = None) -> dict:
    """The job's part: the plan's head (priorities, ranks and review lines) and the tab; then the rest is
    queued for the background writer, with ``retire`` (:func:`retire_superseded`'s ``keep`` version,
    ``members``, ``members_too``) for it to do after. The pool's data is updated in place with what was
    written.

    ``publish()`` makes the plan's model the one Label Studio pre-fills from (the project's model_version:
    its stream shows only that version's prediction). It is called once the head's first
    :data:`PUBLISH_AFTER` tasks are written, the new model's predictions being imported already: a person
    labelling meets the new order from its first task on, each line beside the prediction it describes —
    but for the fraction of a second between those first lines and the switch (writing the whole head first
    would leave them side by side with the previous model's pre-fill for seconds; switching first, the old
    lines beside the new pre-fill)."""
    from molal.service.lsclient import VIEW_TITLE

    save_plan(state, plan)
    if retire is not None:
        state.put(RETIRE_KEY, {**retire, "since": time.time()})
    row_of = pool.row_of()

    def data_of(t: int) -> dict | None:
        r = row_of.get(t)
        return None if r is None or r in pool.human else pool.data[r]

    if ctx is not None:
        ctx.progress(None, f"writing the head of the queue: ranks and review lines of the first {plan.head} of "
                           f"{len(plan)} tasks")
    t0 = time.perf_counter()
    n, upto = write_plan(client, plan, data_of, 0, min(plan.head, PUBLISH_AFTER) if publish else plan.head)
    if publish is not None:
        publish()
        if retire is not None:  # the grace before the superseded versions go counts from here
            state.put(RETIRE_KEY, {**retire, "since": time.time()})
        m, upto = write_plan(client, plan, data_of, upto, plan.head)
        n += m
    for i in range(upto):  # the pool's copy of the data, as Label Studio now holds it
        r = row_of.get(plan.task_ids[i])
        if r is not None and r not in pool.human:
            pool.data[r] = {**pool.data[r], **plan.fields[i]}
    view = client.ensure_view(state.id, plan.field, title=VIEW_TITLE, value_key=value_key)
    state.put(WRITTEN_KEY, {"epoch": plan.epoch, "upto": upto, "total": len(plan), "done": upto >= len(plan)})
    out = {"priorities_written": n, "view": view, "queue_head": plan.head, "queue_total": len(plan),
           "queue_head_s": round(time.perf_counter() - t0, 2)}
    if upto < len(plan) or retire is not None:
        job, _ = svc.submit(state.id, "queue", source=f"the rest of the queue after {plan.version}")
        out["queue_job"] = job["id"]
        if ctx is not None:
            ctx.progress(None, f"the other {len(plan) - upto} tasks' ranks and review lines are written in the "
                               f"background (job {job['id']})")
    return out


def others_waiting(svc: Runtime, project: int) -> bool:
    """Whether a job other than the queue writer waits for this project (the writer then gives way)."""
    return any(j.get("kind") != "queue" for j in svc.jobs.list(project=project, status="queued", limit=20))


def queue_job(svc: Runtime, state: ProjectState, ctx: JobContext) -> dict:
    """The ``queue`` job: write the rest of the project's current plan, in queue order (see the module
    docstring). Stops when the plan is superseded or another job of the project waits; resumable."""
    from molal.service.lsclient import client_for

    plan = load_plan(state)
    if plan is None:  # no queue to write (a project only synced): the superseded versions' clean-up only
        out: dict = {"written": 0, "superseded": True}
        if state.get(RETIRE_KEY):
            _retire_step(svc, state, client_for(svc.settings, state), ctx, out, lambda: others_waiting(svc, state.id))
        return out
    done = progress(state)
    start = int(done.get("upto", 0)) if int(done.get("epoch", -1)) == plan.epoch else 0
    client = client_for(svc.settings, state)
    client.threads = WRITER_THREADS
    tasks: dict[int, dict] = {}
    if start < len(plan):
        ctx.progress(0.02, f"reading the project's tasks to write ranks {start + 1}-{len(plan)} of plan {plan.epoch}")
        tasks = {t["id"]: t for t in client.tasks(state.id)}

    def data_of(t: int) -> dict | None:
        task = tasks.get(t)
        if task is None or any(isinstance(a, dict) and not a.get("was_cancelled") for a in task["annotations"]):
            return None
        return task["data"]

    def on_batch(i: int, written: int) -> None:
        state.put(WRITTEN_KEY, {"epoch": plan.epoch, "upto": i, "total": len(plan), "done": i >= len(plan)})
        ctx.progress(i / max(1, len(plan)), f"queue: {i} of {len(plan)} tasks ranked and explained in Label Studio "
                                            f"({written} written by this job)")

    def should_stop() -> bool:
        return current_epoch(state) != plan.epoch or others_waiting(svc, state.id)

    t0 = time.perf_counter()
    written, upto = write_plan(client, plan, data_of, start, len(plan), on_batch, should_stop)
    dt = time.perf_counter() - t0
    out = {"written": written, "upto": upto, "total": len(plan), "seconds": round(dt, 1),
           "tasks_per_s": round((upto - start) / dt, 1) if dt > 0 else None}
    if upto < len(plan):
        out["stopped"] = "superseded by a newer plan" if current_epoch(state) != plan.epoch else \
            "gave way to another job of the project (a training job resumes it)"
    if "stopped" not in out:
        _retire_step(svc, state, client, ctx, out, should_stop)
    ctx.progress(1.0, f"queue: {upto} of {len(plan)} tasks ranked and explained" +
                 (f" ({out['stopped']})" if "stopped" in out else ""))
    return out


def _retire_step(svc: Runtime, state: ProjectState, client: LSClient, ctx: JobContext, out: dict,
                 should_stop: Callable[[], bool]) -> None:
    """The writer's last step: delete the superseded versions' predictions, a few at a time, once their grace
    is over (:func:`retire_wait`); ``out`` gets what was done or how long they stay."""
    retire = state.get(RETIRE_KEY)
    if not retire:
        return
    wait = retire_wait(svc, state)
    if wait > 0:
        out["retire_in_s"] = round(wait)
        ctx.progress(None, f"the superseded versions' predictions stay {wait / 60:.0f} min more: a task opened "
                           "before the new model was published is submitted against them")
        return
    ctx.progress(None, "removing the predictions of superseded model versions")
    gone = retire_superseded(client, state.id, retire["keep"], ctx, retire.get("members"),
                             bool(retire.get("members_too")), should_stop)
    out["predictions_retired"] = sum(gone.values())
    if not should_stop():
        state.put(RETIRE_KEY, None)


def retire_wait(svc: Runtime, state: ProjectState, now: float | None = None) -> float:
    """Seconds before the superseded versions' predictions may be deleted (0: now, or nothing to delete).

    A person who opened a task while the previous version was published has an annotation pre-filled from
    that version's prediction; Label Studio's submit names it (``parent_prediction``) and is refused with HTTP
    400 once it is deleted: the person's label is lost. So superseded predictions stay
    ``MOLAL_RETIRE_GRACE_S`` after the new version is published (Label Studio's stream pre-fills from the
    published version only meanwhile)."""
    retire = state.get(RETIRE_KEY)
    if not retire:
        return 0.0
    since = retire.get("since") if isinstance(retire, dict) else None
    if not isinstance(since, (int, float)):  # written before the grace existed
        return 0.0
    now = time.time() if now is None else now
    return max(0.0, float(since) + float(svc.project_settings(state).retire_grace_s) - now)


def retire_later(state: ProjectState, retire: dict) -> None:
    """Plan :func:`retire_superseded` (``keep``, ``members``, ``members_too``) for after the grace, counted from
    now; a plan that keeps the same version already waits and is left as it is."""
    pending = state.get(RETIRE_KEY)
    if not (isinstance(pending, dict) and pending.get("keep") == retire.get("keep")):
        state.put(RETIRE_KEY, {**retire, "since": time.time()})


def retire_when_due(svc: Runtime, state: ProjectState) -> str | None:
    """Queue the writer to delete the superseded versions' predictions once their grace is over and no job of
    the project is queued or running (a label arriving is the trigger: only a person labelling needs the
    grace); returns the job id, or None."""
    if not state.get(RETIRE_KEY) or retire_wait(svc, state) > 0:
        return None
    if svc.jobs.list(project=state.id, status="queued", limit=1) or svc.jobs.list(project=state.id,
                                                                                  status="running", limit=1):
        return None
    job, _ = svc.submit(state.id, "queue", source="delete the superseded versions' predictions")
    return job["id"]


def resume(svc: Runtime, state: ProjectState) -> str | None:
    """Queue the background writer again when the current plan is not all written (after a skipped training
    job, or a writer that gave way); returns the job id, or None."""
    plan = load_plan(state)
    done = progress(state)
    written = plan is None or (int(done.get("epoch", -1)) == plan.epoch and int(done.get("upto", 0)) >= len(plan))
    if written and not state.get(RETIRE_KEY):
        return None
    job, _ = svc.submit(state.id, "queue", source="resume the queue")
    return job["id"]


# -- after a job: the superseded versions' predictions -----------------------------------------------------
#: the model versions molal's served models give their predictions (per-LLM ones are ``llm:<name>``)
SERVED_PREFIXES = ("molam-", "student-", "mixture-mean-")


def retire_superseded(client: LSClient, project: int, version: str, ctx: JobContext | None = None,
                      member_versions: list[str] | None = None, members_too: bool = False,
                      should_stop: Callable[[], bool] | None = None) -> dict[str, int]:
    """Delete the predictions of molal's earlier model versions (``molam-*``, ``student-*``,
    ``mixture-mean-*`` other than ``version``), so each task shows one current MoLAM prediction, and those
    an embedding scorer of ``member_versions`` made under its old name ``llm:<name>`` (now
    ``scorer:<name>``). ``members_too`` (only the head of the queue got predictions): the members' own
    predictions (``member_versions``) go as well, so every other task holds none and Label Studio asks
    ``/predict`` when it is opened. Predictions of other models and every annotation stay. Returns version
    -> predictions deleted. They are deleted one by one (:meth:`LSClient.delete_predictions`), never a whole
    version in one write; ``should_stop()`` ends it early (the next call goes on)."""
    from molal.service.lsclient import LSConnectionError

    renamed = {"llm:" + v.split(":", 1)[1] for v in member_versions or [] if v.startswith("scorer:")}
    if members_too:
        renamed |= set(member_versions or [])
    try:
        old = {v for v in client.model_versions(project)
               if (v.startswith(SERVED_PREFIXES) and v != version) or v in renamed}
        out: dict[str, int] = {}
        if old:
            for v, ids in client.prediction_ids(project, old).items():
                out[v] = client.delete_predictions(ids, should_stop)
    except LSConnectionError as exc:  # the new version serves already: a failed clean-up only leaves old ones
        log.warning("project %s: could not remove superseded predictions: %s", project, exc)
        if ctx is not None:
            ctx.progress(None, "could not remove the predictions of superseded versions (see the log)")
        return {}
    if out and ctx is not None:
        ctx.progress(None, f"removed the predictions of {len(out)} superseded version(s): {', '.join(out)}")
    return out


# -- a task opened in Label Studio ---------------------------------------------------------------------------
_REFRESH = threading.BoundedSemaphore(2)


def refresh_fields(plan: QueuePlan | None, task_id: int, line_fields: dict, version: str, field: str) -> dict:
    """The fields to write on a task opened with a line from an older model (or none): ``line_fields`` (the
    serving model's review fields for it), with its rank in ``plan``, or a note that it is not ranked yet."""
    f = dict(line_fields)
    model = version_number(version)
    i = plan.index().get(task_id) if plan is not None else None
    if i is not None:
        f["molal_review"] = f"#{i + 1} · {f['molal_review']} · model {model}"
        f[RANK_FIELD] = i + 1
        f[field] = plan.fields[i][field]
    else:
        f["molal_review"] = (f"not ranked yet · {f['molal_review']} · model {model} · the next training job "
                             "ranks it")
    f[MODEL_FIELD] = version
    return f


def refresh_on_open(client: LSClient, state: ProjectState, tasks: Sequence[dict], fields: dict[int, dict],
                    version: str, field: str, wait_s: float = 2.0) -> int:
    """Give the tasks Label Studio asks ``/predict`` about (a person opening one: at most
    :data:`REFRESH_MAX_TASKS`) the serving model's review line (``fields``: request position -> the review
    fields) where theirs is missing or from another model. A caller cannot make molal write data of its own
    into Label Studio: a task of the current plan is written back only when its data, as the request carries
    it, is the data molal planned with (:func:`data_digest`); a task molal has not ranked (imported after the
    last job) only when Label Studio, asked for it, holds that same data in this project and no person's label
    — it then says "not ranked yet" and what happens next. Waits up to ``wait_s`` so that Label Studio, which reads the task again
    after ``/predict``, shows the new line; the rest finishes in the background. Returns the tasks it started
    to refresh."""
    from molal.service.review import FIELDS

    if len(tasks) > REFRESH_MAX_TASKS:
        return 0
    plan = load_plan(state)
    at = plan.index() if plan is not None else {}
    todo: list[tuple[int, dict]] = []
    unplanned: list[tuple[int, dict, str]] = []  # checked against Label Studio's copy before writing
    for i, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, dict) else None
        tid = task.get("id") if isinstance(task, dict) else None
        if i not in fields or not isinstance(data, dict) or not isinstance(tid, int) or isinstance(tid, bool):
            continue
        if data.get(MODEL_FIELD) == version and data.get("molal_review"):
            continue
        j, digest = at.get(tid), data_digest(data, (field,))
        if j is not None and (j >= len(plan.digests) or plan.digests[j] != digest):
            continue  # not the data molal planned with: nothing is written
        f = refresh_fields(plan, tid, fields[i], version, field)
        d = {k: v for k, v in data.items() if k not in f and k not in FIELDS}  # no field of the old model stays
        d.update(f)
        if j is None:
            unplanned.append((tid, d, digest))
        else:
            todo.append((tid, d))
    if not (todo or unplanned) or not _REFRESH.acquire(blocking=False):
        return 0

    def run() -> None:
        try:
            ups = list(todo)
            for tid, d, digest in unplanned:
                held = client.task(tid)  # a labelled task is no queue task: "not ranked yet" would be untrue
                if (held.get("project") == state.id and not held.get("labelled")
                        and data_digest(held["data"], (field,)) == digest):
                    ups.append((tid, d))
            if ups:
                client.update_task_data(ups)
        except Exception as exc:  # noqa: BLE001 - a line not refreshed is no reason to fail /predict
            log.info("project %s: could not refresh the review line of opened tasks: %s", state.id, exc)
        finally:
            _REFRESH.release()

    th = threading.Thread(target=run, daemon=True, name=f"molal-refresh-{state.id}")
    th.start()
    th.join(wait_s)
    return len(todo) + len(unplanned)


__all__ = ["EPOCH_SPAN", "QueuePlan", "Ranking", "for_humans_first", "load_plan", "plan_queue", "priorities",
           "progress", "queue_job", "rank_by_confidence", "rank_queue", "rank_rows", "refresh_on_open", "resume",
           "retire_later", "retire_superseded", "retire_wait", "retire_when_due", "save_plan", "write_head",
           "write_plan"]
