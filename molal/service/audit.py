"""The audit slice: a share of the queue drawn uniformly at random from the unlabeled pool, so that the labels
people give there measure how far molal can be trusted on the *whole* pool (the rest of the queue is what
the strategy picks, not a random sample: accuracy measured there is biased, usually low).

* **Drawn** — when a job plans the queue (:func:`molal.service.queue.plan_queue`), the project keeps one
  audit task for every ``audit_every`` unlabeled tasks (project setting, default 10: 1 task in 10). Missing
  ones are drawn uniformly at random, without replacement, from the unlabeled tasks that are not audit tasks
  yet (all at once the first time: later plans draw only when new tasks came in). A drawn task stays an
  audit task (:data:`AUDIT_KEY`, in draw order) until a person labels it.
* **Interleaved** — the queue is cut into blocks of ``audit_every`` places (1–10, 11–20, ...) and each block
  holds one pending audit task, in draw order, at a place drawn at random within it (afresh for each plan);
  the strategy's ranking fills the other places. Their review line, rank and priority are made like every
  other task's, and no rank is an audit place by rule, so the stream looks the same to the person labelling:
  the mark (``data.molal_audit``) is a task data field the "molal queue" tab hides, never in the line.
* **Held out** — a person's label on an audit task is a measurement: it never enters MoLAM's fit, the
  student's training set, the few-shot examples (``examples = "seeds"``) or the human-free loop's query
  (:func:`held_out`). So the model that serves has never seen them, and its agreement with them is an
  unbiased estimate of its accuracy on the pool (:mod:`molal.service.quality`), and a valid audit for
  :func:`molal.trust.certify`. Nor does the human-free loop label a pending audit task itself
  (:func:`audit_rows`). Which model version pre-annotated each audited task is read from the task's
  ``data.molal_model`` (the version that wrote its line and whose prediction was pre-ticked) and kept in the
  quality report.

The cost: one label in ``audit_every`` does not train the model (``audit_every=0`` turns the slice off).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from molal.service.pool import Pool
    from molal.service.store import ProjectState

#: project state key: the audit task ids in draw order
AUDIT_KEY = "audit_tasks"
#: the task data field marking an audit task (hidden in the "molal queue" tab, never in the review line)
AUDIT_FIELD = "molal_audit"


def audit_tasks(state: ProjectState) -> list[int]:
    """Every task ever drawn into the project's audit, in draw order (labelled ones included)."""
    return [int(t) for t in state.get(AUDIT_KEY) or []]


def audit_rows(state: ProjectState, pool: Pool) -> set[int]:
    """The pool rows of the audit's tasks, labelled or pending: they are for people (the human-free loop
    never labels one itself: an audit thinned by the machine's surest picks would no longer be random)."""
    audit = set(audit_tasks(state))
    return {r for r, t in enumerate(pool.task_ids) if t in audit} if audit else set()


def held_out(state: ProjectState, pool: Pool) -> set[int]:
    """The pool rows whose human label is an audit measurement (never trained on)."""
    return audit_rows(state, pool) & set(pool.human)


def draw(state: ProjectState, pool: Pool, unlabeled: Sequence[int], every: int, seed: int | None = None) -> list[int]:
    """Top up the project's audit to one task per ``every`` of the ``unlabeled`` rows, drawing the missing
    ones uniformly at random (without replacement) among the unlabeled rows not drawn yet; returns the
    pending audit rows (unlabeled, drawn) in draw order. ``every`` 0: no audit (returns [])."""
    if every <= 0 or not unlabeled:
        return []
    drawn = audit_tasks(state)
    at = {pool.task_ids[r]: r for r in unlabeled}
    pending = [at[t] for t in drawn if t in at]
    need = math.ceil(len(unlabeled) / every) - len(pending)
    if need > 0:
        taken = set(drawn)
        free = np.array([r for r in unlabeled if pool.task_ids[r] not in taken], dtype=np.int64)
        rng = np.random.default_rng([int(state.id), len(drawn)] if seed is None else seed)
        new = rng.choice(free, size=min(need, len(free)), replace=False).tolist() if len(free) else []
        state.put(AUDIT_KEY, [*drawn, *(pool.task_ids[r] for r in new)])
        pending += [int(r) for r in new]
    return pending


def interleave(rows: Sequence[int], audit: Sequence[int], every: int, keep_first: int = 0,
               seed: int | Sequence[int] = 0) -> list[int]:
    """``rows`` (queue order) with the ``audit`` rows moved, in their order, one into each block of ``every``
    places (1..``every``, ``every`` + 1..2 x ``every``, ... counted from 1; the last block may be shorter), at a
    place drawn uniformly within the block (``seed``); audit rows beyond the blocks go last. The first
    ``keep_first`` rows of ``rows`` (tasks sent to people by the hybrid loop) stay where they are, audit rows
    among them too (a person labels them there: they stay audit tasks, and their block takes no other one),
    and hold no other audit place."""
    if every <= 0 or not audit:
        return list(rows)
    head, drawn = list(rows[:keep_first]), set(audit)
    held = {i // every for i, r in enumerate(head) if r in drawn}  # blocks that hold an audit task already
    mine = drawn - set(head)
    audit = [r for r in audit if r in mine]
    rest = [r for r in rows[keep_first:] if r not in mine]
    n = len(head) + len(rest) + len(audit)
    rng = np.random.default_rng(seed)
    places: set[int] = set()
    for start in range(1, n + 1, every):
        lo, hi = max(start, len(head) + 1), min(start + every - 1, n)
        if lo <= hi and len(places) < len(audit) and (start - 1) // every not in held:
            places.add(int(rng.integers(lo, hi + 1)))
    out, queue, others = list(head), list(audit), iter(rest)
    for place in range(len(head) + 1, n + 1):
        r = next(others, None) if place not in places else None
        out.append(queue.pop(0) if r is None else r)
    return out


__all__ = ["AUDIT_FIELD", "AUDIT_KEY", "audit_rows", "audit_tasks", "draw", "held_out", "interleave"]
