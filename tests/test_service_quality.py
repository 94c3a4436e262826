"""The audit slice, the quality report and certified labels of the served path (molal.service.audit,
molal.service.quality), without Label Studio: a real project state, pools built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from molal.service.audit import AUDIT_FIELD, audit_tasks, draw, held_out, interleave
from molal.service.labelconfig import LabelSpec
from molal.service.pool import Pool
from molal.service.quality import (
    CertifyRefused,
    certifiable,
    certificate,
    label_certified,
    measure,
    summary_line,
)
from molal.service.store import ProjectSettings, ProjectState, coerce_setting

CLASSES = ("a", "b", "c")
SPEC = LabelSpec(from_name="label", to_name="text", value_key="text", classes=CLASSES)


def _pool(n: int) -> Pool:
    return Pool(task_ids=list(range(100, 100 + n)), texts=[f"t{i}" for i in range(n)], data=[{} for _ in range(n)])


def test_draw_is_uniform_kept_and_topped_up(tmp_path):
    state = ProjectState(tmp_path, 1)
    pool = _pool(1000)
    unl = list(range(1000))
    pending = draw(state, pool, unl, every=10)
    assert len(pending) == 100 == len(set(pending)) and audit_tasks(state) == [pool.task_ids[r] for r in pending]
    # kept: the same tasks, in draw order, while unlabeled; nothing new drawn while people label 1 in 10
    mine = set(pending)
    for r in pending[:30] + [r for r in unl if r not in mine][:270]:
        pool.human[r] = 0
    rest = [r for r in unl if r not in pool.human]
    again = draw(state, pool, rest, every=10)
    assert again == pending[30:] and len(audit_tasks(state)) == 100
    # a bigger share (or new tasks): topped up from the tasks not drawn yet
    more = draw(state, pool, rest, every=5)
    assert len(more) == len(rest) // 5 and more[:70] == pending[30:] and len(audit_tasks(state)) == 170
    assert held_out(state, pool) == set(pending[:30])
    assert draw(state, pool, rest, every=0) == []
    # uniform: over many projects, every row is drawn about equally often (chi-square-ish bound)
    counts = np.zeros(200)
    for pid in range(2, 402):
        counts[draw(ProjectState(tmp_path, pid), _pool(200), list(range(200)), every=10)] += 1
    assert counts.sum() == 400 * 20 and counts.min() > 15 and counts.max() < 70


def test_interleave_one_random_place_per_block_and_keeps_the_head():
    rows = list(range(30))
    seen = set()
    for seed in range(40):
        out = interleave(rows, [100, 101, 102, 103], every=10, seed=seed)
        places = [out.index(a) + 1 for a in (100, 101, 102, 103)]  # 34 places: blocks 1-10, 11-20, 21-30, 31-34
        assert [(p - 1) // 10 for p in places] == [0, 1, 2, 3] and [r for r in out if r < 100] == rows
        assert out == interleave(rows, [100, 101, 102, 103], every=10, seed=seed)  # the seed decides
        seen.update(p - 10 * i for i, p in enumerate(places))
    assert len(seen) >= 8  # no place of a block is the audit's by rule (the rank line would tell)
    # audit rows beyond the blocks go last
    out = interleave(list(range(8)), [100, 101, 102, 103], every=5, seed=0)
    assert [(out.index(a)) // 5 for a in (100, 101)] == [0, 1] and set(out[-2:]) == {102, 103}
    # audit rows that were ranked somewhere move to their places; the hybrid loop's first tasks stay first
    out = interleave([7, 8, 1, 2, 3, 4, 5, 6, 9, 10, 11], [1, 5], every=3, keep_first=2)
    assert out[:2] == [7, 8] and out[2] == 1 and 3 <= out.index(5) <= 5
    assert sorted(out) == sorted([7, 8, 1, 2, 3, 4, 5, 6, 9, 10, 11])
    # an audit row among the hybrid loop's first tasks stays there (people label it first), the others move
    for seed in range(20):
        out = interleave([7, 8, 1, 2, 3, 4, 5, 6, 9, 10, 11], [8, 5], every=3, keep_first=2, seed=seed)
        assert out[:2] == [7, 8] and 3 <= out.index(5) <= 5 and sorted(out) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert interleave(rows, [], 10) == rows and interleave(rows, [1], 0) == rows


def test_plan_marks_audit_tasks_without_changing_their_line(tmp_path):
    from molal.service.queue import Ranking, plan_queue

    state = ProjectState(tmp_path, 1)
    pool = _pool(40)
    rng = np.random.default_rng(0)
    served = {r: rng.dirichlet(np.ones(3)) for r in range(40)}
    plan = plan_queue(state, pool, SPEC, Ranking(rows=list(range(40))), version="molam-2-abcd", field="priority",
                      head=10, served=served, audit_every=10)
    marked = [i for i, f in enumerate(plan.fields) if f.get(AUDIT_FIELD)]
    assert [i // 10 for i in marked] == [0, 1, 2, 3]  # one in each block of 10 places
    assert {plan.task_ids[i] for i in marked} == set(audit_tasks(state))
    for i in marked:  # the line reads like any other: rank, pre-fill, model
        line = plan.fields[i]["molal_review"]
        assert line.startswith(f"#{i + 1} · molal pre-filled ") and line.endswith(" · model 2")
        assert "audit" not in line.lower()
    prios = [f["priority"] for f in plan.fields]
    assert prios == sorted(prios, reverse=True)


def _labelled_project(tmp_path, n=600, acc_top=0.99, seed=0):
    """A pool whose MoLAM is right ~acc_top on confident items and ~60% elsewhere; the audit labelled."""
    rng = np.random.default_rng(seed)
    state = ProjectState(tmp_path, 7)
    pool = _pool(n)
    truth = rng.integers(0, 3, n)
    conf = np.where(rng.random(n) < 0.6, rng.uniform(0.9, 1.0, n), rng.uniform(0.4, 0.9, n))
    right = rng.random(n) < np.where(conf >= 0.9, acc_top, 0.6)
    pred = np.where(right, truth, (truth + 1) % 3)
    probs = np.zeros((n, 3))
    probs[np.arange(n), pred] = conf
    probs[np.arange(n), (pred + 1) % 3] = 1 - conf
    pending = draw(state, pool, list(range(n)), every=3)
    for r in pending:  # people label the audit: the pre-fill they saw is molam-1's label
        pool.human[r] = int(truth[r])
        pool.data[r] = {"molal_label": CLASSES[pred[r]], "molal_model": "molam-1-aaaa"}
    for r in [r for r in range(n) if r not in pool.human][:50]:  # and 50 queue tasks
        pool.human[r] = int(truth[r])
        pool.data[r] = {"molal_label": CLASSES[pred[r]], "molal_model": "molam-2-bbbb"}
    return state, pool, truth, probs, pred


def test_measure_reports_audit_and_queue_side_by_side(tmp_path):
    state, pool, truth, probs, pred = _labelled_project(tmp_path)
    ps = ProjectSettings(audit_every=3)
    L = np.stack([np.eye(3)[truth], np.eye(3)[pred]], axis=1).astype(float)  # an oracle LLM and a copy of MoLAM
    rep = measure(state, pool, SPEC, list(range(len(pool))), probs, L, ["llm:oracle", "llm:copy"], "molam-2-bbbb", ps)
    audit = sorted(held_out(state, pool))
    a = rep["audit"]["prefill"]
    assert rep["audit"]["labelled"] == len(audit) == 200 and rep["queue"]["labelled"] == 50
    assert a["llm:oracle"]["overall"]["rate"] == 1.0 and a["llm:oracle"]["overall"]["n"] == 200
    k = int(sum(pred[r] == truth[r] for r in audit))
    assert a["molam"]["overall"]["k"] == k == a["llm:copy"]["overall"]["k"]
    assert 0 < a["molam"]["overall"]["low"] < k / 200 < a["molam"]["overall"]["high"] < 1
    assert np.asarray(a["molam"]["confusion"]["counts"]).sum() == 200
    assert sum(v["n"] for v in a["molam"]["per_class"].values()) == 200
    assert [v["version"] for v in rep["by_version"]] == ["molam-1-aaaa", "molam-2-bbbb"]
    assert rep["by_version"][0]["audit"]["n"] == 200 and rep["by_version"][1]["queue"]["n"] == 50
    assert rep["certificate"]["method"] == "ltt-hypergeometric" and rep["certificate"]["n_audit"] == 200
    assert state.get("audited")[str(pool.task_ids[audit[0]])]["version"] == "molam-1-aaaa"
    assert summary_line(rep).startswith("Quality: on the random audit (1 task in 3)")
    from molal.cli.report import write_pages

    png, page = write_pages(rep, tmp_path / "out", 7)  # the report's page: its plots in a PNG, the tables as text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "llm:oracle" in page.read_text()


def test_certificate_holds_by_simulation_and_refuses_without_audit(tmp_path):
    """Over many random audits of one fixed pool, the certified tasks' error exceeds ε at most a share δ of
    the time (plus noise); without audit labels nothing is certified and the write refuses, saying why."""
    fails, certified, eps = 0, 0, 0.1
    for seed in range(60):
        state, pool, truth, probs, pred = _labelled_project(tmp_path / str(seed), n=1500, acc_top=0.97, seed=seed)
        held = held_out(state, pool)
        rows = list(range(len(pool)))
        cert = certificate(pool, rows, probs, held, eps, 0.1)
        if cert.threshold is None:
            continue
        certified += 1
        acc = [r for r in certifiable(pool, rows, probs, cert, state)]
        frame = [r for r in rows if (r not in pool.human or r in held) and probs[r].max() >= cert.threshold]
        final_wrong = sum(1 for r in frame if r not in pool.human and pred[r] != truth[r])
        fails += final_wrong > eps * len(frame)
        assert set(acc) <= set(frame)
    assert certified >= 50 and fails <= 0.1 * certified + 3
    state = ProjectState(tmp_path / "none", 3)
    pool = _pool(50)
    probs = np.full((50, 3), 1 / 3)
    probs[:, 0] = 0.9
    cert = certificate(pool, list(range(50)), probs, set(), 0.05, 0.1)
    assert cert.threshold is None and "no audit label yet" in cert.reason
    with pytest.raises(CertifyRefused, match="no audit label yet"):
        label_certified(state, None, SPEC, pool, list(range(50)), probs, "molam-1-aaaa", cert)


def test_project_settings_of_the_audit_and_certificate():
    assert ProjectSettings().audit_every == 10 and ProjectSettings().auto_label is False
    assert coerce_setting("certify_epsilon", "0.02") == 0.02
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        coerce_setting("certify_delta", "1.5")
    with pytest.raises(ValueError, match="must be a number"):
        coerce_setting("certify_epsilon", "x")
    assert coerce_setting("audit_every", "0") == 0


def test_a_task_labelled_only_by_molal_is_no_human_label():
    from molal.service.train import pool_from_tasks

    res = [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["b"]}}]
    tasks = [{"id": 1, "data": {"text": "x"}, "annotations": [{"id": 11, "result": res}]},
             {"id": 2, "data": {"text": "y"}, "annotations": [{"id": 12, "result": res},
                                                               {"id": 13, "result": res, "created_at": "2030"}]}]
    pool = pool_from_tasks(tasks, SPEC, molal_annotations={11: "b", 12: "b"})
    assert pool.machine == {0: 1} and pool.human == {1: 1}
    # a person who changed molal's label made it theirs
    fixed = [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["c"]}}]
    pool = pool_from_tasks([{"id": 1, "data": {"text": "x"}, "annotations": [{"id": 11, "result": fixed}]}], SPEC,
                           molal_annotations={11: "b"})
    assert pool.human == {0: 2} and pool.machine == {}
    # written but not recorded (a certify job stopped in between): the task's mark and Label Studio's
    # "Created from prediction" say it is molal's; a person's annotation beside it is theirs
    mark = {"text": "x", "molal_certified": "labelled by molal: molam-1-aaaa, ..."}
    unrecorded = {"id": 14, "result": res, "last_action": "prediction"}
    pool = pool_from_tasks([{"id": 1, "data": mark, "annotations": [unrecorded]},
                            {"id": 2, "data": {"text": "y"}, "annotations": [{**unrecorded, "id": 15}]},
                            {"id": 3, "data": mark, "annotations": [{**unrecorded, "id": 16},
                                                                    {"id": 17, "result": fixed, "created_at": "2030"}]}],
                           SPEC)
    assert pool.machine == {0: 1} and pool.human == {1: 1, 2: 2}


def test_learner_sends_uncertified_rows_to_people():
    from molal.learner import Learner, TrainingSet

    class Flat:
        class_names = list(CLASSES)

        def predict_proba(self, texts):
            return np.full((len(texts), 3), 1 / 3)

        def predict(self, texts):
            return np.zeros(len(texts), dtype=np.int64)

    probs = np.tile([0.8, 0.1, 0.1], (20, 1))
    ok = np.zeros(20, dtype=bool)
    ok[:10] = True
    q = Learner("random", budget=20).query(Flat(), [str(i) for i in range(20)], TrainingSet(), probs,
                                          np.random.default_rng(0), certified=ok)
    assert sorted(q.to_machine) == list(range(10)) and sorted(q.to_human) == list(range(10, 20))
