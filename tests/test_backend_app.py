"""Flask test-client tests of the Label Studio ML backend: every endpoint and malformed payloads.

The mixture is the real offline default (replay of the 5 recorded TREC LLMs) with the real SQLite cache."""

from __future__ import annotations

import base64
import json

import pytest

from molal.config import get_settings
from tests.conftest import TREC_CLASSES, TREC_CONFIG

TREC = TREC_CLASSES
CONFIG = TREC_CONFIG
PROJECT = "7.1700000000"


@pytest.fixture(scope="module")
def trec_rows():
    from molal.resources import asset_path

    with open(asset_path("trec.jsonl")) as fh:
        return [json.loads(line) for _, line in zip(range(40), fh, strict=False)]


def make_app(tmp_path, **overrides):
    from backend.app import create_app

    settings = get_settings(model_dir=tmp_path / "state", **overrides)
    return create_app(settings, start_worker=False)


@pytest.fixture()
def app(tmp_path):
    return make_app(tmp_path)


@pytest.fixture()
def client(app):
    return app.test_client()


def tasks_of(rows, start=0):
    return [{"id": start + i, "data": {"text": r["text"]}, "annotations": [], "predictions": []} for i, r in enumerate(rows)]


# -- /health, /metrics, /versions ------------------------------------------------------------------------------
def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json["status"] == "UP"


def test_metrics_and_versions_are_json(client, trec_rows):
    client.post("/predict", json={"project": PROJECT, "tasks": tasks_of(trec_rows[:3]), "label_config": CONFIG})
    m = client.get("/metrics")
    assert m.status_code == 200
    assert m.json["predict_requests"] == 1 and m.json["predict_tasks"] == 3
    v = client.get("/versions")  # what Label Studio asks (no project): never a list of projects
    assert v.status_code == 200 and v.json == {"versions": []}
    v = client.get("/versions?project=7.123")
    assert v.status_code == 200 and v.json["current"] is None
    assert client.get("/versions?project=../etc").status_code == 400


# -- /setup --------------------------------------------------------------------------------------------------
def test_setup_returns_version_and_stores_connection_privately(tmp_path, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    setup = {"project": PROJECT, "schema": CONFIG, "hostname": "http://localhost:8080",
             "access_token": "secret-token-123", "extra_params": None}
    # default: no LABEL_STUDIO_URL and no explicit trust -> a hostname from a request is not even stored
    app = make_app(tmp_path / "a")
    r = app.test_client().post("/setup", json=setup)
    assert r.status_code == 200 and r.json["model_version"].startswith("mixture-mean-")
    assert app.config["MOLAL_SERVICE"].store.project(7).connection() == (None, None)
    # the operator allows /setup hostnames: stored, owner-only
    app = make_app(tmp_path / "b", trust_setup_hostname=True)
    assert app.test_client().post("/setup", json=setup).status_code == 200
    state = app.config["MOLAL_SERVICE"].store.project(7)
    assert state.connection() == ("http://localhost:8080", "secret-token-123")
    assert (state.dir / "state.db").stat().st_mode & 0o077 == 0
    assert state.dir.stat().st_mode & 0o077 == 0
    # LABEL_STUDIO_URL set, no key: only a /setup from that same Label Studio is stored
    app = make_app(tmp_path / "c", label_studio_url="http://ls.internal:8080")
    c = app.test_client()
    assert c.post("/setup", json=setup).status_code == 200
    assert app.config["MOLAL_SERVICE"].store.project(7).connection() == (None, None)
    assert c.post("/setup", json={**setup, "hostname": "http://LS.internal:8080/"}).status_code == 200
    assert app.config["MOLAL_SERVICE"].store.project(7).connection()[1] == "secret-token-123"


@pytest.mark.parametrize(
    "payload, status, words",
    [
        ({"project": PROJECT, "schema": '<View><Image name="i" value="$img"/><Choices name="c" toName="i">'
          '<Choice value="A"/><Choice value="B"/></Choices></View>'}, 422, "not a <Text> tag"),
        ({"project": PROJECT, "schema": '<View><Text name="t" value="$text"/><Labels name="l" toName="t">'
          '<Label value="A"/></Labels></View>'}, 422, "no <Choices> tag"),
        ({"project": PROJECT, "schema": '<View><Text name="t" value="$text"/><Choices name="c" toName="t" '
          'choice="multiple"><Choice value="A"/><Choice value="B"/></Choices></View>'}, 422, "multiple"),
        ({"project": PROJECT, "schema": "<View"}, 422, "cannot be parsed"),
        ({"project": PROJECT}, 422, "no label config"),
        ({"project": "../../etc", "schema": CONFIG}, 400, "project"),
        ({"project": "-3.1", "schema": CONFIG}, 400, "project"),
        ({"project": None, "schema": CONFIG}, 400, "project"),
        ({"project": True, "schema": CONFIG}, 400, "project"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_setup_rejects_bad_input(client, tmp_path, payload, status, words):
    r = client.post("/setup", json=payload)
    assert r.status_code == status, r.json
    assert words in r.json["error"]
    if status == 422 and words != "no label config":
        assert "<Choices>" in r.json["error"]  # names what is supported
    assert not (tmp_path / "state" / "projects" / "..").resolve().joinpath("etc").exists()


def test_not_json_bodies_are_400_and_other_media_types_415(client):
    for path in ("/setup", "/predict", "/webhook", "/train"):
        assert client.post(path, data="not json", content_type="application/json").status_code == 400
        assert client.post(path, data="", content_type="application/json").status_code == 400
        # what a cross-site HTML form (or fetch without a preflight) can send: refused before it is read
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            r = client.post(path, data='{"project": 7, "action": "START_TRAINING"}', content_type=ctype)
            assert r.status_code == 415 and "application/json" in r.json["error"], (path, ctype)


# -- /predict ------------------------------------------------------------------------------------------------
def test_predict_one_entry_per_task_in_order_with_per_llm(client, trec_rows):
    tasks = tasks_of(trec_rows[:10])
    r = client.post("/predict", json={"project": PROJECT, "tasks": tasks, "label_config": CONFIG,
                                      "params": {"login": None, "password": None, "context": None}})
    assert r.status_code == 200
    res = r.json["results"]
    assert len(res) == 10
    version = r.json["model_version"]
    assert version.startswith("mixture-mean-")
    for entry in res:
        assert isinstance(entry, list) and len(entry) == 1 + 5
        main = entry[0]
        assert main["model_version"] == version
        item = main["result"][0]
        assert item["from_name"] == "label" and item["to_name"] == "text" and item["type"] == "choices"
        assert item["value"]["choices"][0] in TREC
        assert 0 < main["score"] <= 1
        assert sorted(e["model_version"] for e in entry[1:]) == [f"llm:{m}" for m in ("gemma", "llama", "mistral", "qwen", "yi")]
    # the majority of the bundled LLMs are right on TREC: the mixture mean agrees with gold most of the time
    hits = sum(e[0]["result"][0]["value"]["choices"][0] == row["label"] for e, row in zip(res, trec_rows[:10], strict=True))
    assert hits >= 7
    # the same version is announced by /setup afterwards (LS skips tasks holding it)
    s = client.post("/setup", json={"project": PROJECT, "schema": CONFIG})
    assert s.json["model_version"] == version


def test_predict_retry_is_served_from_cache(app, client, trec_rows):
    tasks = tasks_of(trec_rows[:8])
    first = client.post("/predict", json={"project": PROJECT, "tasks": tasks, "label_config": CONFIG}).json
    svc = app.config["MOLAL_SERVICE"]
    spec_classes = list(TREC)
    mixture = svc.mixture_for(svc.store.project(7), spec_classes)
    res = mixture.annotate([t["data"]["text"] for t in tasks], spec_classes, cache=svc.cache)
    assert res.stats["cache_misses"] == 0 and res.stats["cache_hits"] == 8 * 5
    again = client.post("/predict", json={"project": PROJECT, "tasks": tasks, "label_config": CONFIG}).json
    assert again["results"] == first["results"]


def test_predict_per_llm_predictions_can_be_turned_off(app, client, trec_rows):
    app.config["MOLAL_SERVICE"].store.project(7).set_setting("per_llm_predictions", "false")
    r = client.post("/predict", json={"project": PROJECT, "tasks": tasks_of(trec_rows[:2]), "label_config": CONFIG})
    assert [len(e) for e in r.json["results"]] == [1, 1]


def test_predict_empty_task_list(client):
    r = client.post("/predict", json={"project": PROJECT, "tasks": [], "label_config": CONFIG})
    assert r.status_code == 200 and r.json["results"] == []


def test_predict_tasks_without_text_field(client, trec_rows):
    r = client.post("/predict", json={"project": PROJECT, "label_config": CONFIG,
                                      "tasks": [{"id": 1, "data": {"body": "x"}}, {"id": 2, "data": {}}]})
    assert r.status_code == 422
    assert "'text'" in r.json["error"]
    # mixed: the bad task gets an empty entry (no prediction stored by LS), the others are served
    tasks = [{"id": 1, "data": {"body": "x"}}, *tasks_of(trec_rows[:2], start=2), {"id": 9, "data": {"text": "  "}}]
    r = client.post("/predict", json={"project": PROJECT, "tasks": tasks, "label_config": CONFIG})
    assert r.status_code == 200
    res = r.json["results"]
    assert len(res) == 4 and res[0] == [] and res[3] == []
    assert res[1] and res[2]
    assert set(r.json["errors"]) == {"1", "9"}


@pytest.mark.parametrize(
    "payload, status",
    [
        ({"project": PROJECT, "label_config": CONFIG}, 400),
        ({"project": PROJECT, "tasks": {"id": 1}, "label_config": CONFIG}, 400),
        ({"project": PROJECT, "tasks": [1, 2], "label_config": CONFIG}, 400),
        ({"tasks": [], "label_config": CONFIG}, 400),
        ({"project": "abc", "tasks": [], "label_config": CONFIG}, 400),
        ({"project": PROJECT, "tasks": [{"id": 1, "data": {"text": "x"}}],
          "label_config": '<View><Text name="t" value="$text"/></View>'}, 422),
    ],
)
def test_predict_rejects_malformed(client, payload, status):
    r = client.post("/predict", json=payload)
    assert r.status_code == status, r.json
    assert r.json["error"]


def test_predict_uses_label_config_from_setup(client, trec_rows):
    client.post("/setup", json={"project": PROJECT, "schema": CONFIG})
    r = client.post("/predict", json={"project": PROJECT, "tasks": tasks_of(trec_rows[:1])})
    assert r.status_code == 200 and len(r.json["results"]) == 1 and r.json["results"][0]


def test_predict_over_budget_answers_ready_part_and_annotates_rest_in_background(app, client, trec_rows):
    """Budget 0: only cached rows are served; the others get [] (LS stores no prediction, so a later
    retrieval asks again) and an annotate job fills the cache; the retry then serves everything."""
    svc = app.config["MOLAL_SERVICE"]
    warm = tasks_of(trec_rows[:3])
    client.post("/predict", json={"project": PROJECT, "tasks": warm, "label_config": CONFIG})
    tasks = tasks_of(trec_rows[:12])
    out = svc.predict({"project": PROJECT, "tasks": tasks, "label_config": CONFIG}, budget_s=0.0)
    assert len(out["results"]) == 12
    assert all(out["results"][i] for i in range(3))
    assert all(out["results"][i] == [] for i in range(3, 12))
    assert out["pending"] == 9
    job = svc.jobs.get(out["background_job"])
    assert job["kind"] == "annotate" and job["status"] == "queued" and len(job["payload"]["texts"]) == 9
    # a second over-budget batch is merged into the queued job
    svc.predict({"project": PROJECT, "tasks": tasks_of(trec_rows[12:14]), "label_config": CONFIG}, budget_s=0.0)
    job = svc.jobs.get(out["background_job"])
    assert job["coalesced"] == 1 and len(job["payload"]["texts"]) == 11
    # run the background job with the real in-process worker thread
    svc.start_worker()
    try:
        import time

        t0 = time.monotonic()
        while svc.jobs.get(job["id"])["status"] in ("queued", "running") and time.monotonic() - t0 < 60:
            time.sleep(0.05)
    finally:
        svc.stop_worker()
    done = svc.jobs.get(job["id"])
    assert done["status"] == "succeeded", done
    assert done["result"]["done"] == 11
    again = svc.predict({"project": PROJECT, "tasks": tasks, "label_config": CONFIG}, budget_s=0.0)
    assert again["pending"] == 0 and all(again["results"])


# -- /webhook ------------------------------------------------------------------------------------------------
def test_start_training_without_annotation_queues_one_job_and_coalesces(app, client):
    assert client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).status_code == 200
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7, "title": "x"}})
    assert r.status_code == 201 and r.json["status"] == "queued"
    job_id = r.json["job"]
    r2 = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert r2.status_code == 200 and r2.json["status"] == "coalesced" and r2.json["job"] == job_id
    j = client.get(f"/jobs/{job_id}")
    assert j.status_code == 200 and j.json["kind"] == "train" and j.json["coalesced"] == 1
    assert client.get("/jobs?project=7").json["jobs"][0]["id"] == job_id
    # Label Studio keeps the training response's "job" and asks POST /job_status {"job": id} for its state
    s = client.post("/job_status", json={"job": job_id})
    assert s.status_code == 200 and s.json["job_status"] in ("queued", "started", "finished", "failed")
    assert s.json["id"] == job_id and "payload" not in s.json


def test_start_training_without_project_is_400(client):
    r = client.post("/webhook", json={"action": "START_TRAINING"})
    assert r.status_code == 400 and "project" in r.json["error"]


@pytest.mark.parametrize(
    "payload, words",
    [
        ({"action": "ANNOTATION_CREATED", "project": {"id": 7}}, "annotation"),
        ({"action": "ANNOTATION_UPDATED", "project": {"id": 7}, "annotation": "x"}, "annotation"),
        ({"action": "MAKE_COFFEE", "project": {"id": 7}}, "unknown action"),
        ({"project": {"id": 7}}, "action"),
        ({"action": 3}, "action"),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}, "project"),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"id": "x/../1"}}, "project"),
    ],
)
def test_webhook_rejects_malformed(client, payload, words):
    r = client.post("/webhook", json=payload)
    assert r.status_code == 400, r.json
    assert words in r.json["error"]


def test_webhook_other_ls_actions_are_ignored(client):
    r = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})
    assert r.status_code == 200 and r.json["status"] == "ignored"


def test_every_n_annotations_queues_training(app, client):
    """train_every retrains: it counts labels from the start, but the first model is the person's Start
    Training (seeds labelled before any model serves queue nothing)."""
    svc = app.config["MOLAL_SERVICE"]
    state = svc.store.project(7)
    state.set_setting("train_every", 3)
    ann = {"id": 1, "result": [], "task": 1, "project": 7, "was_cancelled": False}

    def annotate(i: int) -> str:
        return client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {**ann, "id": i},
                                             "project": {"id": 7}}).json["status"]

    assert [annotate(i) for i in range(4)] == ["counted"] * 4  # no model yet: nothing to retrain
    assert svc.jobs.list(project=7) == []
    staging = state.staging_dir("t")
    (staging / "molam").write_text("{}")
    state.publish(staging, state.next_version_number(), {"n_human": 4})
    state.put("new_annotations", 0)
    statuses = [annotate(i) for i in range(3)]
    assert statuses == ["counted", "counted", "queued"]
    # cancelled (skipped) annotations do not count
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {**ann, "was_cancelled": True},
                                      "project": {"id": 7}})
    assert r.json["new_annotations"] == 0
    assert [j["kind"] for j in svc.jobs.list(project=7)] == ["train"]


# -- /jobs ---------------------------------------------------------------------------------------------------
def test_jobs_errors(client):
    assert client.get("/jobs/0123456789abcdef").status_code == 404
    assert client.get("/jobs/..%2f..").status_code in (400, 404)
    assert client.get("/jobs?project=x").status_code == 400
    assert client.get("/jobs?limit=x").status_code == 400
    assert client.get("/nope").status_code == 404
    assert client.get("/predict").status_code == 405
    gone = client.post("/job_status", json={"job": "0123456789abcdef"})
    assert gone.status_code == 410 and "no job" in gone.json["error"]  # Label Studio reads 410 as "removed"
    assert client.post("/job_status", json={"job": 3}).status_code == 400
    assert client.post("/job_status", json={"job": "../x"}).status_code == 400
    assert client.post("/job_status", json=[1]).status_code == 400


# -- basic auth ----------------------------------------------------------------------------------------------
def test_basic_auth(tmp_path, trec_rows):
    app = make_app(tmp_path, basic_auth_user="ls", basic_auth_pass="pa55word")
    c = app.test_client()
    assert c.get("/health").status_code == 200  # liveness stays open
    assert c.post("/setup", json={"project": PROJECT, "schema": CONFIG}).status_code == 401
    bad = base64.b64encode(b"ls:wrong").decode()
    assert c.get("/metrics", headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"ls:pa55word").decode()
    r = c.post("/setup", json={"project": PROJECT, "schema": CONFIG}, headers={"Authorization": f"Basic {good}"})
    assert r.status_code == 200


def test_train_endpoint_of_older_label_studio_flow_queues_training(client):
    assert client.post("/train", json={"project": PROJECT, "annotations": []}).status_code == 404  # unknown yet
    assert client.post("/setup", json={"project": PROJECT, "schema": CONFIG}).status_code == 200
    r = client.post("/train", json={"annotations": [], "project": "7.1700000000", "label_config": CONFIG})
    assert r.status_code == 201 and r.json["status"] == "queued"
    r2 = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert r2.json["status"] == "coalesced" and r2.json["job"] == r.json["job"]
    assert client.post("/train", json={"annotations": []}).status_code == 400
    assert client.post("/train", json={"project": "x.y"}).status_code == 400


def test_warm_start_imports_the_training_stack_and_health_reports_it(tmp_path):
    import sys
    import time

    from backend.app import create_app

    off = create_app(get_settings(model_dir=tmp_path / "off"), start_worker=True)
    try:
        assert off.test_client().get("/health").get_json()["warm"] == "off"  # the default
    finally:
        off.config["MOLAL_SERVICE"].stop_worker()
    app = create_app(get_settings(model_dir=tmp_path / "on", warm_start=True), start_worker=True)
    try:
        c = app.test_client()
        t0 = time.monotonic()
        states = [c.get("/health").get_json()["warm"]]
        while states[-1] == "warming" and time.monotonic() - t0 < 120:
            time.sleep(0.1)
            states.append(c.get("/health").get_json()["warm"])
        assert states[-1] == "done" and set(states) <= {"warming", "done"}, states[-5:]
        assert {"torch", "xgboost", "sklearn.linear_model", "transformers.models.bert.modeling_bert"} <= set(sys.modules)
    finally:
        app.config["MOLAL_SERVICE"].stop_worker()
