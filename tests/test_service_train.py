"""A training round without Label Studio I/O (molal.service.train.fit_round) with the real MoLAM, the real
student and the real query strategies, then serving the published model through the Flask app."""

from __future__ import annotations

import json

import numpy as np
import pytest

from molal.config import get_settings
from molal.service.labelconfig import parse_label_config
from molal.service.train import Pool, TrainingError, fit_round, human_label, pool_from_tasks
from tests.conftest import TREC_CLASSES, TREC_CONFIG

TREC = TREC_CLASSES
CONFIG = TREC_CONFIG
SPEC = parse_label_config(CONFIG)


@pytest.fixture(scope="module")
def rows():
    from molal.resources import asset_path

    with open(asset_path("trec.jsonl")) as fh:
        return [json.loads(line) for _, line in zip(range(300), fh, strict=False)]


def make_pool(rows, n, n_labels, seed=0):
    rng = np.random.default_rng(seed)
    texts = [r["text"] for r in rows[:n]]
    lab = rng.choice(n, n_labels, replace=False)
    human = {int(i): TREC.index(rows[i]["label"]) for i in lab}
    return Pool(task_ids=list(range(100, 100 + n)), texts=texts, data=[{"text": t} for t in texts], human=human,
                prediction_versions=[[] for _ in texts])


def service(tmp_path, **kw):
    from molal.service.pipeline import Service

    s = get_settings(model_dir=tmp_path / "state", student_epochs=1, student_max_length=32, device="cpu", **kw)
    return Service(s)


def project(svc, pid):
    """A project whose MoLAM picks among the fast candidates (full model selection takes ~1 min on CPU)."""
    state = svc.store.project(pid)
    state.set_setting("molam_candidates", "ds,best_single")
    return state


def test_human_label_latest_non_cancelled_wins():
    def ann(i, label, cancelled=False, when="2026-01-01T00:00:0%d"):
        return {"id": i, "was_cancelled": cancelled, "updated_at": when % i,
                "result": [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]}

    assert human_label([ann(1, "human"), ann(2, "entity")], SPEC) == TREC.index("entity")
    assert human_label([ann(1, "human"), ann(2, "entity", cancelled=True)], SPEC) == TREC.index("human")
    assert human_label([ann(1, "not-a-class")], SPEC) is None
    assert human_label([], SPEC) is None
    pool = pool_from_tasks([{"id": 5, "data": {"text": "Who?"}, "annotations": [ann(1, "human")]},
                            {"id": 6, "data": {"other": "x"}, "annotations": []}], SPEC)
    assert pool.task_ids == [5] and pool.human == {0: TREC.index("human")} and pool.skipped == 1


def test_molam_round_publishes_and_serves(tmp_path, rows):
    svc = service(tmp_path)
    state = project(svc, 1)
    state.set_setting("student", False)
    pool = make_pool(rows, 300, 50)
    rr = fit_round(svc, state, SPEC, pool, None, job_id="t1")
    assert rr.version.startswith("molam-1-") and rr.student is None
    assert state.current()["molam"] == rr.version
    # MoLAM's labels on the unlabeled rows agree with gold (the recorded LLMs are good on TREC)
    gold = np.array([TREC.index(r["label"]) for r in rows[:300]])
    unl = [i for i, r in enumerate(rr.rows.tolist()) if r not in pool.human]
    acc = float((rr.probs[unl].argmax(1) == gold[rr.rows[unl]]).mean())
    assert acc > 0.75, acc

    from backend.app import create_app

    app = create_app(svc.settings, start_worker=False)
    c = app.test_client()
    assert c.post("/setup", json={"project": "1.1", "schema": CONFIG}).json["model_version"] == rr.version
    tasks = [{"id": i, "data": {"text": rows[i]["text"]}} for i in range(5)]
    r = c.post("/predict", json={"project": "1.1", "tasks": tasks, "label_config": CONFIG})
    assert r.status_code == 200
    assert [e[0]["model_version"] for e in r.json["results"]] == [rr.version] * 5
    assert c.get("/versions?project=1").json["versions"] == [rr.version]

    # a corrupted published model is refused: the service falls back to the mixture mean, never a 5xx
    ptr = state.current()
    (state.model_dir(ptr["dir"]) / "manifest.json").write_text("{}")
    app2 = create_app(svc.settings, start_worker=False)  # a fresh process would load it again
    r = app2.test_client().post("/predict", json={"project": "1.1", "tasks": tasks, "label_config": CONFIG})
    assert r.status_code == 200 and r.json["model_version"].startswith("mixture-mean-")


def test_too_few_labels_fail_clearly_and_publish_nothing(tmp_path, rows):
    svc = service(tmp_path)
    state = project(svc, 1)
    pool = make_pool(rows, 50, 1)
    with pytest.raises(TrainingError, match="at least 2 classes"):
        fit_round(svc, state, SPEC, pool, None, job_id="t0")
    assert state.current() is None


def test_human_free_rounds_with_student_and_query(tmp_path, rows):
    """Two AL rounds of the paper's loop: student on seeds (+ MoLAM batch), query b, label with MoLAM."""
    svc = service(tmp_path)
    state = project(svc, 2)
    for k, v in {"loop_mode": "human_free", "strategy": "entropy", "query_batch": 8, "serve_model": "student"}.items():
        state.set_setting(k, v)
    pool = make_pool(rows[:80], 80, 20, seed=1)
    r1 = fit_round(svc, state, SPEC, pool, None, job_id="r1")
    assert r1.version.startswith("student-1-") and r1.student is not None
    assert len(r1.new_auto) == 8 and not set(r1.new_auto) & set(pool.human)
    auto = state.auto_labels()
    assert len(auto) == 8 and all(a["round"] == 0 for a in auto.values())
    assert all(0 < a["weight"] <= 1 for a in auto.values())
    # a human correction overrides MoLAM: label one auto-labelled task by hand
    t0 = pool.task_ids[r1.new_auto[0]]
    pool.human[r1.new_auto[0]] = (auto[t0]["label"] + 1) % len(TREC)
    r2 = fit_round(svc, state, SPEC, pool, None, job_id="r2")
    assert r2.info["round"] == 1
    assert r2.info["student_train"] == {"human": 21, "molam": 7}
    assert len(state.auto_labels()) == 16
    assert state.current()["n"] == 2 and r2.version.startswith("student-2-")


def test_human_budget_sends_least_confident_labels_to_people(tmp_path, rows):
    """human_per_round = k (the hybrid loop of ``molal simulate``): of the b queried tasks, the k with
    MoLAM's least confident labels are not auto-labelled but remembered for people."""
    from molal.service.store import FOR_HUMANS_KEY

    svc = service(tmp_path)
    state = project(svc, 5)
    for k, v in {"loop_mode": "human_free", "strategy": "entropy", "query_batch": 8, "human_per_round": 3}.items():
        state.set_setting(k, v)
    pool = make_pool(rows[:80], 80, 20, seed=1)
    r = fit_round(svc, state, SPEC, pool, None, job_id="h1")
    assert len(r.to_human) == 3 and len(r.new_auto) == 5 and not set(r.to_human) & set(r.new_auto)
    assert r.info["to_human"] == 3
    assert set(state.auto_labels()) == {pool.task_ids[x] for x in r.new_auto}
    assert state.get(FOR_HUMANS_KEY) == [pool.task_ids[x] for x in r.to_human]
    conf = {int(row): float(p.max()) for row, p in zip(r.rows, r.probs, strict=True)}  # MoLAM serves
    assert max(conf[x] for x in r.to_human) <= min(conf[x] for x in r.new_auto)
    assert [conf[x] for x in r.to_human] == sorted(conf[x] for x in r.to_human)  # least confident first


def test_human_free_query_leaves_the_audit_to_people(tmp_path, rows):
    """A pending audit task (drawn at random, not labelled yet) is never labelled by molal nor picked by the
    query: an audit thinned by the machine's picks would no longer be a random sample of the pool."""
    from molal.service.audit import AUDIT_KEY

    svc = service(tmp_path)
    state = project(svc, 6)
    for k, v in {"loop_mode": "human_free", "strategy": "entropy", "query_batch": 20, "human_per_round": 4}.items():
        state.set_setting(k, v)
    pool = make_pool(rows[:80], 80, 20, seed=1)
    unl = [r for r in range(len(pool)) if r not in pool.human]
    state.put(AUDIT_KEY, [pool.task_ids[r] for r in unl[::2]])  # half the unlabeled pool: any query meets some
    r = fit_round(svc, state, SPEC, pool, None, job_id="a1")
    picked = set(r.new_auto) | set(r.to_human)
    assert len(r.new_auto) == 16 and len(r.to_human) == 4
    assert not picked & set(unl[::2]) and picked <= set(unl[1::2])


def test_student_serves_without_llm_calls(tmp_path, rows):
    """serve_model=student: /predict answers with the student's version; per-LLM predictions only where
    the cache already has them (no model call)."""
    svc = service(tmp_path)
    state = project(svc, 3)
    state.set_setting("serve_model", "student")
    pool = make_pool(rows[:40], 40, 20, seed=2)
    rr = fit_round(svc, state, SPEC, pool, None, job_id="s1")
    assert rr.version.startswith("student-1-")
    from backend.app import create_app

    c = create_app(svc.settings, start_worker=False).test_client()
    assert c.post("/setup", json={"project": "3.9", "schema": CONFIG}).json["model_version"] == rr.version
    cached = [{"id": 1, "data": {"text": rows[0]["text"]}}]  # in the pool: annotated during training
    fresh = [{"id": 2, "data": {"text": "A question that no LLM was ever asked about ?"}}]
    r = c.post("/predict", json={"project": "3.9", "tasks": cached + fresh, "label_config": CONFIG})
    assert r.status_code == 200
    a, b = r.json["results"]
    assert a[0]["model_version"] == rr.version and len(a) == 1 + 5
    assert b[0]["model_version"] == rr.version and len(b) == 1  # served although no LLM has seen it
    assert r.json["pending"] == 0 and "background_job" not in r.json
    assert svc.jobs.list(project=3) == []


def test_changed_mixture_falls_back_to_mixture_mean(tmp_path, rows):
    """MoLAM is tied to the LLMs it was trained on: after the project's mixture changes, the service serves
    the new mixture's mean (a new version string) until the next training."""
    svc = service(tmp_path)
    state = project(svc, 4)
    state.set_setting("student", False)
    rr = fit_round(svc, state, SPEC, make_pool(rows, 120, 40), None, job_id="m1")
    cfg = tmp_path / "two.toml"
    cfg.write_text('[[annotator]]\ntype = "replay"\nname = "qwen"\nsource = "bundled:trec"\n\n'
                   '[[annotator]]\ntype = "replay"\nname = "yi"\nsource = "bundled:trec"\n')
    state.set_setting("mixture", str(cfg))
    srv = svc.serving(state, SPEC)
    assert srv.kind == "mixture-mean" and srv.version.startswith("mixture-mean-")
    out = svc.predict({"project": 4, "tasks": [{"id": 1, "data": {"text": rows[0]["text"]}}], "label_config": CONFIG})
    assert out["model_version"] == srv.version != rr.version
    assert [e["model_version"] for e in out["results"][0][1:]] == ["llm:qwen", "llm:yi"]
    state.unset_setting("mixture")
    assert svc.serving(state, SPEC).version == rr.version


@pytest.mark.slow
def test_molam_text_features_setting_trains_and_serves(tmp_path, rows):
    """MOLAL_MOLAM_TEXT_FEATURES / the project setting: the job's MoLAM carries its text model, the saved
    model reloads with it, and /predict scores texts that were not in the training pool."""
    svc = service(tmp_path, molam_text_features="minilm")
    state = project(svc, 1)
    state.set_setting("student", False)
    assert svc.project_settings(state).molam_text_features == "minilm"
    pool = make_pool(rows, 200, 50)
    rr = fit_round(svc, state, SPEC, pool, None, job_id="t1")
    loaded = svc.loaded_model(state)
    assert loaded.molam.text_features == "minilm" and loaded.molam.text_model_
    gold = np.array([TREC.index(r["label"]) for r in rows[:200]])
    unl = [i for i, r in enumerate(rr.rows.tolist()) if r not in pool.human]
    assert float((rr.probs[unl].argmax(1) == gold[rr.rows[unl]]).mean()) > 0.7

    from backend.app import create_app

    app = create_app(svc.settings, start_worker=False)
    c = app.test_client()
    tasks = [{"id": 1000 + i, "data": {"text": rows[250 + i]["text"]}} for i in range(3)]
    r = c.post("/predict", json={"project": "1.1", "tasks": tasks, "label_config": CONFIG})
    assert r.status_code == 200, r.json
    assert [e[0]["model_version"] for e in r.json["results"]] == [rr.version] * 3
    # the project setting overrides the environment, and can switch it off again
    state.set_setting("molam_text_features", "none")
    assert svc.project_settings(state).molam_text_features is None


def test_prediction_versions_from_light_and_full_tasks():
    from molal.service.lsclient import _prediction_versions

    # Label Studio's ``include=predictions_model_versions``: one comma-joined string ("" without any)
    assert _prediction_versions({"predictions_model_versions": "llm:yi,molam-1-ab, llm:qwen,"}) == [
        "llm:qwen", "llm:yi", "molam-1-ab"]
    assert _prediction_versions({"predictions_model_versions": ""}) == []
    assert _prediction_versions({"predictions_model_versions": ["b", "a", "b"]}) == ["a", "b"]
    # a Label Studio that ignores ``include`` answers full tasks
    assert _prediction_versions({"predictions": [{"model_version": "v2"}, {"model_version": None}, "x",
                                                 {"model_version": "v1"}]}) == ["v1", "v2"]
    assert _prediction_versions({}) == []


def test_stopping_rule_is_reported_and_optionally_enforced(tmp_path, rows, monkeypatch):
    """Each training job reports κ between its student's and the last student's predictions on a fixed
    sample of tasks (job info, GET /projects/N); with stop_when_stable the human-free loop stops querying
    once the rule is met."""
    from molal.learner import StoppingRule

    svc = service(tmp_path)
    state = project(svc, 6)
    for k, v in {"loop_mode": "human_free", "strategy": "random", "query_batch": 5}.items():
        state.set_setting(k, v)
    pool = make_pool(rows[:60], 60, 20, seed=2)
    r1 = fit_round(svc, state, SPEC, pool, None, job_id="s1")
    assert r1.info["stop"]["kappa"] is None and r1.info["stop"]["met"] is False
    assert r1.info["stop"]["stop_set"] == 60 and len(state.get("stop_set")) == 60
    r2 = fit_round(svc, state, SPEC, pool, None, job_id="s2")
    assert -1.0 <= r2.info["stop"]["kappa"] <= 1.0 and len(r2.new_auto) == 5
    assert state.summary(svc.settings)["stop_kappas"] == [None, r2.info["stop"]["kappa"]]
    monkeypatch.setattr(StoppingRule, "check", lambda self, kappas: True)
    state.set_setting("stop_when_stable", "true")
    n_auto = len(state.auto_labels())
    r3 = fit_round(svc, state, SPEC, pool, None, job_id="s3")
    assert r3.info.get("stopped") is True and r3.new_auto == [] and len(state.auto_labels()) == n_auto


def test_stop_check_kappa_over_the_kept_stop_set(tmp_path):
    from molal.service.train import stop_check

    class Fixed:
        def __init__(self, shift):
            self.shift = shift

        def predict(self, texts):
            return np.array([(int(t[1:]) + self.shift) % 3 for t in texts])

    svc = service(tmp_path)
    state = svc.store.project(9)
    texts = [f"t{i}" for i in range(30)]
    pool = Pool(task_ids=list(range(500, 530)), texts=texts, data=[{"text": t} for t in texts], human={})
    outs = [stop_check(state, Fixed(s), pool, 3) for s in (0, 0, 1, 1, 1, 1)]
    assert [o["kappa"] for o in outs] == [None, 1.0, pytest.approx(-0.5), 1.0, 1.0, 1.0]
    assert [o["met"] for o in outs] == [False, False, False, False, False, True]


def test_embedding_scorers_are_not_named_llms(tmp_path, rows):
    """An embedding scorer's own predictions say what it is (scorer:<name>), an LLM's say llm:<name>; a
    scorer's predictions from before the rename (llm:<name>) are removed with the superseded versions."""
    from molal.annotators import Mixture
    from molal.service.queue import retire_superseded

    cfg = tmp_path / "mixed.toml"
    cfg.write_text('[[annotator]]\ntype = "replay"\nname = "qwen"\nsource = "bundled:trec"\n\n'
                   '[[annotator]]\ntype = "embedding"\nname = "emb-minilm"\n')
    assert Mixture.from_config(cfg).member_versions() == ["llm:qwen", "scorer:emb-minilm"]
    svc = service(tmp_path)
    state = project(svc, 5)
    state.set_setting("mixture", str(cfg))
    out = svc.predict({"project": 5, "tasks": [{"id": 1, "data": {"text": rows[0]["text"]}}], "label_config": CONFIG})
    assert [e["model_version"] for e in out["results"][0][1:]] == ["llm:qwen", "scorer:emb-minilm"]

    class Client:  # records what would be deleted (the LS API itself is covered by tests/e2e)
        deleted: list[str] = []

        def model_versions(self, project):
            return ["molam-1-aa", "molam-2-bb", "llm:qwen", "llm:emb-minilm", "scorer:emb-minilm", "other-model"]

        def prediction_ids(self, project, versions):
            return {v: [f"{v}#{i}" for i in range(3)] for v in versions}

        def delete_predictions(self, ids, should_stop=None):  # one by one, never a whole version at once
            self.deleted.extend(ids)
            return len(ids)

    c = Client()
    out = retire_superseded(c, 5, "molam-2-bb", None, ["llm:qwen", "scorer:emb-minilm"])
    assert out == {"llm:emb-minilm": 3, "molam-1-aa": 3}
    assert sorted({d.split("#")[0] for d in c.deleted}) == ["llm:emb-minilm", "molam-1-aa"]


def test_superseded_predictions_wait_out_the_grace_then_a_label_has_them_deleted(tmp_path):
    """A person's open task was pre-filled from the version a retrain supersedes, and Label Studio refuses the
    submit once that prediction is gone (tests/e2e: measured in the browser). So the superseded versions stay
    ``retire_grace_s`` after the publish; the first label after that queues their deletion, unless a job of
    the project is queued or running (that job's writer does it)."""
    from molal.service.queue import RETIRE_KEY, retire_later, retire_wait, retire_when_due

    svc = service(tmp_path)
    state = project(svc, 5)
    assert svc.project_settings(state).retire_grace_s == 900  # the default
    assert retire_wait(svc, state) == 0 and retire_when_due(svc, state) is None  # nothing to delete
    retire_later(state, {"keep": "molam-2-bb", "members": [], "members_too": False})
    since = state.get(RETIRE_KEY)["since"]
    assert 899 < retire_wait(svc, state) <= 900
    assert retire_wait(svc, state, now=since + 901) == 0
    retire_later(state, {"keep": "molam-2-bb", "members": [], "members_too": False})  # same version: same clock
    assert state.get(RETIRE_KEY)["since"] == since

    def queue_jobs() -> list[dict]:
        return [j for j in svc.jobs.list(project=5) if j["kind"] == "queue"]

    label = {"action": "ANNOTATION_CREATED", "project": {"id": 5},
             "annotation": {"id": 1, "project": 5, "was_cancelled": False, "result": []}}
    assert svc.webhook(label)["status"] == "counted"
    assert queue_jobs() == []  # within the grace: nothing queued
    state.set_setting("retire_grace_s", 0)
    svc.webhook(label)
    (job,) = queue_jobs()
    assert job["source"] == "delete the superseded versions' predictions"
    svc.webhook(label)  # that job is queued (or running): no second one
    assert len(queue_jobs()) == 1
    with pytest.raises(ValueError, match="retire_grace_s must be >= 0"):
        state.set_setting("retire_grace_s", -1)


def test_a_pool_only_partly_recorded_gets_a_mixture_that_covers_it(tmp_path, rows):
    """The default mixture is decided from a probe spread over the pool: a pool whose first texts are in the
    bundled TREC recording and the rest not gets the embedding scorers, not a replay that fails on the rest."""
    svc = service(tmp_path)
    state = project(svc, 3)
    state.set_setting("student", False)
    pool = make_pool(rows, 120, 50)
    for r in range(40, 120):  # from row 40 on, texts the recording does not hold
        pool.texts[r] = pool.data[r]["text"] = pool.texts[r] + " (asked again)"
    rr = fit_round(svc, state, SPEC, pool, None, job_id="p1")
    assert rr.info["n_annotated"] == 120 and rr.info["unannotated"] is None
    assert rr.info["mixture"].startswith("Mixture(embedding:")


def test_tasks_the_mixture_cannot_annotate_are_said_in_the_job(tmp_path, rows):
    """A mixture that fails on part of the pool (here a configured replay of the TREC recording): the round
    trains on the rest, and the job says how many tasks got no prediction, why, and the human labels lost."""
    from molal.service.jobs import JobContext

    mix = tmp_path / "replay.toml"
    mix.write_text("".join(f'[[annotator]]\ntype = "replay"\nname = "{m}"\nsource = "bundled:trec"\n\n'
                           for m in ("qwen", "yi")))
    svc = service(tmp_path)
    state = project(svc, 4)
    state.set_setting("student", False)
    state.set_setting("mixture", str(mix))
    pool = make_pool(rows, 120, 60)
    gone = [r for r in range(90, 120)]
    for r in gone:
        pool.texts[r] = pool.data[r]["text"] = pool.texts[r] + " (not recorded)"
    job, _ = svc.jobs.enqueue(4, "train")
    ctx = JobContext(svc.jobs, svc.jobs.claim())
    rr = fit_round(svc, state, SPEC, pool, ctx, job_id="p2")
    lost = sum(1 for r in gone if r in pool.human)
    assert rr.info["n_annotated"] == 90
    msg = rr.info["unannotated"]
    assert msg.startswith("30 of 120 tasks could not be annotated (most often: ") and "no prediction" in msg
    assert (f"{lost} human label(s) on them are not used by MoLAM" in msg) == (lost > 0)
    assert svc.jobs.get(job["id"])["message"] != "started"  # the progress line said it while the job ran
