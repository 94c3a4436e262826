"""The queue a person meets (molal.service.queue): every unlabeled task ranked and explained, plans that
supersede each other without an old priority ever sorting above a new one, only changed tasks written, and
a task opened with an old line refreshed — from Label Studio's own copy of its data only. The real Label
Studio and the browser check the same in tests/e2e/test_browser_review.py."""

from __future__ import annotations

import numpy as np
import pytest

from molal.service.labelconfig import parse_label_config
from molal.service.pool import Pool
from molal.service.queue import (
    EPOCH_SPAN,
    QueuePlan,
    Ranking,
    data_digest,
    for_humans_first,
    head_limit,
    load_plan,
    plan_queue,
    priorities,
    queue_head,
    rank_by_confidence,
    refresh_on_open,
    save_plan,
    updates,
    write_plan,
)
from tests.conftest import TREC_CLASSES, TREC_CONFIG

SPEC = parse_label_config(TREC_CONFIG)
K = len(TREC_CLASSES)


class Recorder:
    """Stands in for the Label Studio client's task-data writes only: records what would be PATCHed, and
    answers reads of single tasks from ``held`` (what Label Studio holds)."""

    def __init__(self, held: dict[int, dict] | None = None) -> None:
        self.calls: list[list[tuple[int, dict]]] = []
        self.held = held or {}

    def task(self, tid):
        if tid not in self.held:
            raise LookupError(f"no task {tid}")
        return self.held[tid]

    def update_task_data(self, ups):
        ups = list(ups)
        self.calls.append(ups)
        return len(ups)

    @property
    def written(self) -> dict[int, dict]:
        return {t: d for call in self.calls for t, d in call}


def onehot(c: int, p: float = 0.9) -> np.ndarray:
    v = np.full(K, (1 - p) / (K - 1))
    v[c] = p
    return v


@pytest.fixture
def state(tmp_path):
    from molal.service.store import ProjectState

    return ProjectState(tmp_path, 7)


def pool_of(n: int, human: dict[int, int] | None = None) -> Pool:
    texts = [f"question {i} ?" for i in range(n)]
    return Pool(task_ids=[100 + i for i in range(n)], texts=texts, data=[{"text": t} for t in texts],
                human=human or {}, prediction_versions=[[] for _ in texts])


def a_plan(state, pool, rows, version="molam-3-ab12", head=2, **kw) -> QueuePlan:
    served = {r: onehot(r % K) for r in rows}
    llm = {r: np.stack([onehot(r % K), onehot(r % K), onehot((r + 1) % K)]) for r in rows}
    return plan_queue(state, pool, SPEC, Ranking(rows=list(rows)), version=version, field="priority", head=head,
                      served=served, llm=llm, **kw)


def test_every_task_gets_a_rank_a_line_and_a_priority_above_every_older_plan(state):
    pool = pool_of(6, human={0: 1})
    old = a_plan(state, pool, [5, 4, 3, 2, 1], version="molam-2-aaaa")
    new = a_plan(state, pool, [1, 2, 3, 4, 5], version="molam-3-ab12")
    assert new.epoch == old.epoch + 1
    pri_old = [f["priority"] for f in old.fields]
    pri_new = [f["priority"] for f in new.fields]
    assert pri_new == sorted(pri_new, reverse=True) and len(set(pri_new)) == 5  # queue order, no ties
    assert min(pri_new) > max(pri_old)  # a task the writer has not reached yet never comes first
    assert min(pri_new) >= new.epoch * EPOCH_SPAN
    assert [f["molal_rank"] for f in new.fields] == [1, 2, 3, 4, 5]
    first = new.fields[0]
    assert first["molal_review"].startswith("#1 · molal pre-filled ")
    assert first["molal_review"].endswith(" · model 3") and first["molal_model"] == "molam-3-ab12"
    assert "LLM votes:" in first["molal_review"] and first["molal_votes"]
    assert new.task_ids == [101, 102, 103, 104, 105] and new.head == 2


def test_tasks_molal_could_not_score_and_auto_labels_are_said_so(state):
    pool = pool_of(5)
    plan = plan_queue(state, pool, SPEC, Ranking(rows=[0, 1, 2]), version="molam-1-aaaa", field="priority",
                      head=0, served={0: onehot(1), 2: onehot(2)}, llm=None,
                      failed={1: "the LLM server answered 500"}, auto={4: "human"})
    lines = [f["molal_review"] for f in plan.fields]
    assert lines[1] == ("#2 · molal could not score this task (the LLM server answered 500); the next training "
                        "job tries again")
    assert plan.task_ids[-1] == 104 and lines[-1] is not None  # the auto-labelled task: last, for an audit
    assert len(plan) == 4 and plan.head == 4  # head 0: the job writes them all
    plan2 = plan_queue(state, pool, SPEC, Ranking(rows=[0, 2]), version="molam-1-aaaa", field="priority",
                       head=0, served={0: onehot(1), 2: onehot(2), 4: onehot(3)}, auto={4: "human"})
    assert plan2.task_ids == [100, 102, 104]
    assert "labelled human by molal (human-free loop): check it" in plan2.fields[-1]["molal_review"]
    assert all(f["molal_review"] for f in plan2.fields)  # never an empty line


def test_only_tasks_whose_values_changed_are_written_with_their_whole_data(state):
    pool = pool_of(5)
    pool.data[2]["meta"] = "kept"
    plan = a_plan(state, pool, [1, 2, 3, 4], head=2)
    rec = Recorder()
    data = {t: dict(d) for t, d in zip(pool.task_ids, pool.data, strict=True)}
    n, upto = write_plan(rec, plan, data.get, 0, len(plan))
    assert (n, upto) == (4, 4)
    w = rec.written[102]
    assert w["meta"] == "kept" and w["text"] == "question 2 ?" and list(w)[-1] == "priority"
    data.update(rec.written)
    rec2 = Recorder()
    assert write_plan(rec2, plan, data.get, 0, len(plan)) == (0, 4) and rec2.calls == []  # nothing changed
    # a task labelled since (data_of gives None) is skipped; an old line is overwritten
    data[103] = {**data[103], "molal_review": "#9 · an old model's line"}
    assert [t for t, _ in updates(plan, lambda t: None if t == 104 else data.get(t), 0, 4)] == [103]


def test_the_writer_stops_when_asked_and_reports_where(state):
    pool = pool_of(80)
    plan = a_plan(state, pool, list(range(80)), head=0)
    rec = Recorder()
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2  # two batches, then a training job needs the project

    data = {t: dict(d) for t, d in zip(pool.task_ids, pool.data, strict=True)}
    n, upto = write_plan(rec, plan, data.get, 0, len(plan), should_stop=stop)
    assert upto == n == 64 and len(rec.calls) == 2
    assert [t for t, _ in rec.calls[0]] == plan.task_ids[:32]  # in queue order


def test_a_plan_survives_the_state_and_the_newest_wins(state):
    pool = pool_of(4)
    plan = a_plan(state, pool, [3, 2, 1, 0])
    save_plan(state, plan)
    got = load_plan(state)
    assert got is not None and got.task_ids == plan.task_ids and got.fields == plan.fields
    assert got.digests == plan.digests
    a_plan(state, pool, [0, 1, 2, 3])  # a newer plan being made: the stored one is no longer current
    assert load_plan(state) is None


def test_an_opened_task_gets_a_fresh_line_from_its_own_data_only(state):
    pool = pool_of(4)
    plan = a_plan(state, pool, [2, 0, 1, 3], version="molam-3-ab12")
    save_plan(state, plan)
    rec = Recorder()
    fields = {0: {"molal_label": "entity", "molal_confidence": 0.7, "molal_review": "molal pre-filled entity (70%)"}}
    # the task as Label Studio sends it in /predict: its data with an older model's line
    task = {"id": 100, "data": {**pool.data[0], "molal_review": "#5 · old", "molal_model": "molam-2-aaaa",
                                "molal_uncertainty": 0.4, "priority": 7}}
    assert refresh_on_open(rec, state, [task], fields, "molam-4-cd34", "priority") == 1
    (tid, d), = rec.calls[0]
    assert tid == 100 and d["text"] == "question 0 ?"
    assert d["molal_review"] == "#2 · molal pre-filled entity (70%) · model 4" and d["molal_rank"] == 2
    assert d["molal_model"] == "molam-4-cd34" and "molal_uncertainty" not in d  # nothing of the old model stays
    assert d["priority"] == plan.fields[1]["priority"]
    # a caller's own data (another text) for a planned task: nothing is written
    rec2 = Recorder()
    forged = {"id": 100, "data": {"text": "something else entirely"}}
    assert refresh_on_open(rec2, state, [forged], fields, "molam-4-cd34", "priority") == 0
    # a task molal never planned that Label Studio does not hold: nothing either
    refresh_on_open(rec2, state, [{"id": 999, "data": {"text": "x"}}], fields, "molam-4-cd34", "priority")
    # a line already from this model, a batch: nothing
    fresh = {"id": 100, "data": {**pool.data[0], "molal_review": "x", "molal_model": "molam-4-cd34"}}
    assert refresh_on_open(rec2, state, [fresh], fields, "molam-4-cd34", "priority") == 0
    assert refresh_on_open(rec2, state, [task] * 4, {i: fields[0] for i in range(4)}, "molam-4-cd34",
                           "priority") == 0
    assert rec2.calls == []


def test_a_task_imported_after_the_plan_says_it_is_not_ranked_yet_when_label_studio_holds_it(state):
    pool = pool_of(3)
    save_plan(state, a_plan(state, pool, [0, 1, 2]))
    fields = {0: {"molal_label": "entity", "molal_confidence": 0.7, "molal_review": "molal pre-filled entity (70%)"}}
    new = {"id": 500, "data": {"text": "a new question ?"}}
    rec = Recorder(held={500: {"id": 500, "project": state.id, "data": {"text": "a new question ?"}}})
    assert refresh_on_open(rec, state, [new], fields, "molam-4-cd34", "priority") == 1
    (tid, d), = rec.calls[0]
    assert tid == 500 and d["text"] == "a new question ?" and "molal_rank" not in d
    assert d["molal_review"].startswith("not ranked yet · molal pre-filled entity (70%) · model 4")
    assert "next training job" in d["molal_review"]
    # the caller's data differs from Label Studio's copy, the task is another project's, or a person labelled
    # it (a seed: labelled tasks hold no prediction, so opening one asks /predict too)
    for held in ({"id": 500, "project": state.id, "data": {"text": "what Label Studio holds"}},
                 {"id": 500, "project": state.id + 1, "data": {"text": "a new question ?"}},
                 {"id": 500, "project": state.id, "data": {"text": "a new question ?"}, "labelled": True}):
        rec = Recorder(held={500: held})
        refresh_on_open(rec, state, [new], fields, "molam-4-cd34", "priority")
        assert rec.calls == []


def test_the_digest_ignores_what_molal_writes():
    d = {"text": "q", "meta": 1}
    assert data_digest(d, ("priority",)) == data_digest({**d, "priority": 3, "molal_review": "x", "molal_rank": 2,
                                                         "molal_model": "m", "molal_auto_label": "a"}, ("priority",))
    assert data_digest(d) != data_digest({**d, "text": "q2"})


def test_without_a_student_the_least_sure_come_first(state):
    pool = pool_of(5, human={4: 0})
    served = {0: onehot(1, 0.9), 1: onehot(1, 0.4), 2: onehot(2, 0.6)}
    assert rank_by_confidence(pool, range(5), served, state).rows == [1, 2, 0, 3]  # 3: not scored, last


def test_tasks_for_people_head_the_priorities():
    texts = [f"t{i}" for i in range(6)]
    pool = Pool(task_ids=[10, 11, 12, 13, 14, 15], texts=texts, data=[{"text": t} for t in texts], human={})
    rows = [1, 2, 3, 4]
    prio = np.array([3, 1, 4, 2])
    # tasks 12 and 14 were sent to people (in that order); 99 is labelled since, so not among the rows
    assert for_humans_first(pool, rows, prio, [12, 99, 14]).tolist() == [3, 6, 4, 5]
    assert for_humans_first(pool, rows, prio, []).tolist() == [3, 1, 4, 2]
    assert prio.tolist() == [3, 1, 4, 2]  # not modified in place
    assert priorities(np.array([2, 0, 3, 1])).tolist() == [3, 1, 4, 2]


def test_queue_head_is_what_a_person_meets_first():
    """The rows that get predictions beyond predictions_top: the highest priority (the job's ranking, else
    data.priority), ties and unranked tasks by task id (Label Studio's sequential order); labelled rows never;
    the rows of ``keep`` (this round's auto-labels) always."""
    texts = [f"t{i}" for i in range(8)]
    data = [{"text": t, "priority": p} for t, p in zip(texts, [0, 5, None, 7, "x", 5, 1, 9], strict=True)]
    pool = Pool(task_ids=[17, 11, 12, 13, 14, 15, 16, 10], texts=texts, data=data, human={7: 0})
    rows = list(range(8))
    assert queue_head(pool, rows, 3) == {3, 1, 5}
    prio = np.array([2, 0, 2, 0, 0, 0, 3, 0])
    assert queue_head(pool, rows, 2, prio) == {6, 2}
    assert queue_head(pool, rows, 2, prio, keep=[4, 7]) == {6, 2, 4}  # 7 is labelled
    assert queue_head(pool, rows, 10, keep=[4]) == set(range(7))  # top above the unlabeled: every one
    ps = type("PS", (), {"predictions_top": 7})()
    assert head_limit(ps, pool) == 0  # 7 unlabeled tasks: no limit
    ps.predictions_top = 6
    assert head_limit(ps, pool) == 6
