"""Label Studio unreachable, answering 401 or 500 during a sync job — injected by a real HTTP server on
127.0.0.1 (or a closed port), never a patched SDK. Expected: the job fails with a clear reason, the SDK's
retries (429/5xx, exponential backoff) stay bounded in time, nothing is lost (annotation cache, project
state, serving model, the job record), and a later job — once Label Studio is back — succeeds without
re-annotating anything."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import parse_qs

import pytest

from molal.config import get_settings
from tests.conftest import TREC_CLASSES, TREC_CONFIG, free_port
from tests.harness import JSONServer

TREC = TREC_CLASSES
CONFIG = TREC_CONFIG
KEY = "ls-fault-key-0123456789"
MIXTURE_TOML = "".join(f'[[annotator]]\ntype = "replay"\nname = "{m}"\nsource = "bundled:trec"\n\n'
                       for m in ("qwen", "yi"))


class FakeLS(JSONServer):
    """A minimal Label Studio API (the calls a sync job makes) with a switchable fault ``mode``:
    ``ok``, or an HTTP status to answer every request with."""

    def __init__(self, texts: list[str]) -> None:
        self.mode: str | int = "ok"
        self.hits: list[tuple[str, str, int]] = []
        self.imported: list[dict] = []
        self.deleted: set[int] = set()
        self.import_requests = 0
        self.task_queries: list[dict] = []
        self.tasks = [{"id": i + 1, "data": {"text": t}, "annotations": [], "predictions": []}
                      for i, t in enumerate(texts)]
        super().__init__()

    def respond(self, method, u, raw):
        status = 200 if self.mode == "ok" else int(self.mode)
        self.hits.append((method, u.path, status))
        if status != 200:
            return status, {"detail": "Authentication credentials were not provided."
                            if status == 401 else "Server Error (500)"}
        if method in ("GET", "PATCH") and re.fullmatch(r"/api/projects/7/?", u.path):
            return 200, {"id": 7, "title": "p", "label_config": CONFIG}
        if method == "GET" and re.fullmatch(r"/api/tasks/?", u.path):
            self.task_queries.append(parse_qs(u.query))
            page = int(parse_qs(u.query).get("page", ["1"])[0])
            return 200, {"tasks": self.tasks if page == 1 else [], "total": len(self.tasks)}
        if method == "POST" and u.path.rstrip("/") == "/api/projects/7/import/predictions":
            preds = json.loads(raw or b"[]")
            for p in preds:
                self.imported.append({**p, "id": len(self.imported) + 1})
            self.import_requests += 1
            return 201, {"created": len(preds)}
        if method == "GET" and u.path.rstrip("/") == "/api/projects/7/model-versions":
            held = [p["model_version"] for p in self.imported if p["id"] not in self.deleted]
            return 200, {v: held.count(v) for v in set(held)}
        if method == "GET" and u.path.rstrip("/") == "/api/predictions":
            return 200, [{"id": p["id"], "model_version": p["model_version"]} for p in self.imported
                         if p["id"] not in self.deleted]
        if method == "DELETE" and (m := re.fullmatch(r"/api/predictions/(\d+)/?", u.path)):
            self.deleted.add(int(m[1]))
            return 200, {}
        return 404, {"detail": f"not in the fake: {method} {u.path}"}


@pytest.fixture(scope="module")
def texts():
    from molal.resources import asset_path

    with open(asset_path("trec.jsonl")) as fh:
        return [json.loads(line)["text"] for _, line in zip(range(20), fh, strict=False)]


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there now


def service(tmp_path, url):
    from molal.service.pipeline import Service

    mix = tmp_path / "mixture.toml"
    mix.write_text(MIXTURE_TOML)
    return Service(get_settings(model_dir=tmp_path / "state", label_studio_url=url, label_studio_api_key=KEY,
                                mixture=mix))


def state_snapshot(svc) -> tuple:
    st = svc.store.project(7)
    kv = sorted(tuple(r) for r in st.db.execute("SELECT * FROM project_kv"))
    return kv, st.current(), svc.cache.count()


@pytest.mark.parametrize("fault", ["closed-port", 401, 500])
def test_sync_fails_clearly_loses_nothing_and_the_next_job_succeeds(tmp_path, texts, fault):
    from molal.service.jobs import execute

    fake = FakeLS(texts)
    try:
        url = closed_port_url() if fault == "closed-port" else fake.url
        svc = service(tmp_path, url)
        st = svc.store.project(7)
        st.put("label_config", CONFIG)
        st.put("new_annotations", 3)
        # half of the texts were annotated before (e.g. by /predict): they are in the cache
        mixture = svc.mixture_for(st, TREC, texts)
        res = mixture.annotate(texts[:10], TREC, cache=svc.cache)
        assert len(res.done_idx) == 10
        before = state_snapshot(svc)
        assert before[2] == 20  # 2 annotators x 10 texts

        fake.mode = "ok" if fault == "closed-port" else fault
        job, created = svc.submit(7, "sync", source="test")
        t0 = time.monotonic()
        row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
        elapsed = time.monotonic() - t0
        assert row["status"] == "failed"
        msg = row["message"]
        # what failed and an error id; the address only in the log (a job's message is public: GET /jobs)
        assert "reading project 7" in msg and "error id " in msg and url not in msg, msg
        if fault == "closed-port":
            assert "is unreachable" in msg and "Connection refused" in msg, msg
        else:
            assert f"answered HTTP {fault}" in msg, msg  # the status Label Studio answered is named
            if fault == 401:
                assert "check LABEL_STUDIO_API_KEY" in msg
            if fault == 500:  # 5xx: the SDK retried with backoff (1 + 2 retries of the first call)
                assert [h for h in fake.hits if h[2] == 500][:3] == [("GET", "/api/projects/7/", 500)] * 3
            else:  # 401 is not retried
                assert len(fake.hits) == 1
        assert elapsed < 60, elapsed  # bounded total time (generous for a loaded machine)
        assert KEY not in json.dumps(row)
        assert state_snapshot(svc) == before  # nothing lost, nothing half-written
        assert svc.jobs.get(job["id"])["status"] == "failed"

        # Label Studio is back: the next request creates a new job (not merged into the failed one) that
        # succeeds and re-annotates nothing that was cached
        fake.mode = "ok"
        if fault == "closed-port":
            svc.settings.label_studio_url = fake.url
        job2, created2 = svc.submit(7, "sync", source="retry")
        assert created2 and job2["id"] != job["id"]
        row2 = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
        assert row2["status"] == "succeeded", row2["error"]
        assert row2["result"]["n_tasks"] == 20 and row2["result"]["annotated"] == 20
        assert {p["task"] for p in fake.imported} == {t["id"] for t in fake.tasks}
        assert fake.import_requests == 1  # every prediction of the job in one request (LS recounts per request)
        # the pull: every task light (include=...), then the annotated ones in full (a Data Manager filter)
        firsts = [q for q in fake.task_queries if q.get("page", ["1"]) == ["1"]]
        assert [q.get("include") for q in firsts[-2:]] == [["id,data,predictions_model_versions"], None]
        assert "filter:tasks:annotations_ids" in firsts[-1]["query"][0]  # the annotations, not a counter
        assert svc.cache.count() == 40  # only the 10 new texts were annotated (x2 annotators)
        # nothing else changed; the superseded versions' predictions go after the grace (molal.service.queue)
        assert [r for r in state_snapshot(svc)[0] if r[1] != "queue_retire"] == before[0]
        assert svc.store.project(7).get("queue_retire")["keep"] == row2["result"]["version"]
    finally:
        fake.close()


def test_a_synced_project_s_superseded_predictions_go_only_after_the_grace(tmp_path, texts):
    """A sync job publishes its version's predictions; those of an earlier version stay for the grace (a task
    open in Label Studio is submitted against them), the writer says how long, and the first label after it
    has them deleted by a queue job, one by one, though the project has no queue plan yet."""
    from molal.service.jobs import execute

    fake = FakeLS(texts)
    try:
        fake.imported = [{"id": i + 1, "task": t["id"], "model_version": "mixture-mean-0old"}
                         for i, t in enumerate(fake.tasks)]
        svc = service(tmp_path, fake.url)
        st = svc.store.project(7)
        st.put("label_config", CONFIG)
        svc.submit(7, "sync", source="test")
        row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
        assert row["status"] == "succeeded", row["error"]
        new = row["result"]["version"]
        assert not fake.deleted and st.get("queue_retire")["keep"] == new
        svc.submit(7, "queue", source="test")
        row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
        assert row["status"] == "succeeded" and 800 < row["result"]["retire_in_s"] <= 900, row
        assert not fake.deleted
        label = {"action": "ANNOTATION_CREATED", "project": {"id": 7},
                 "annotation": {"id": 1, "project": 7, "was_cancelled": False, "result": []}}
        svc.webhook(label)
        assert svc.jobs.claim() is None  # within the grace a label queues nothing
        st.set_setting("retire_grace_s", 0)
        svc.webhook(label)
        row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
        assert row["source"] == "delete the superseded versions' predictions"
        assert row["status"] == "succeeded" and row["result"]["predictions_retired"] == len(texts), row["result"]
        assert fake.deleted == set(range(1, len(texts) + 1))  # the old version's, none of the new
        assert st.get("queue_retire") is None
        assert [h[0] for h in fake.hits].count("DELETE") == len(texts)
    finally:
        fake.close()


def test_per_llm_predictions_stop_above_the_project_size_limit(tmp_path, texts):
    """MOLAL_PER_LLM_MAX_TASKS: a project above it gets the served model's prediction per task only, and the
    job says why; at or below it, every member's too."""
    from molal.service.jobs import execute

    fake = FakeLS(texts)
    try:
        for limit, want_members in ((20, True), (19, False)):
            fake.imported.clear()
            (tmp_path / str(limit)).mkdir()
            svc = service(tmp_path / str(limit), fake.url)
            svc.settings.per_llm_max_tasks = limit
            svc.store.project(7).put("label_config", CONFIG)
            svc.submit(7, "sync", source="test")
            row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
            assert row["status"] == "succeeded", row["error"]
            members = [p for p in fake.imported if p["model_version"].startswith("llm:")]
            assert bool(members) == want_members and len(members) in (0, 40)
            assert len(fake.imported) - len(members) == 20  # the served model's, always
    finally:
        fake.close()


def test_a_project_above_predictions_top_gets_predictions_for_the_head_of_the_queue(tmp_path, texts):
    """predictions_top: a sync of a project with more unlabeled tasks than that imports the served model's
    prediction for the head of the queue only (the highest ``data.priority``, then the lowest task id) and no
    per-LLM ones (a task holding any prediction is never sent to /predict); at or above the project's size,
    every task gets all of them."""
    from molal.service.jobs import execute

    fake = FakeLS(texts)
    for t in fake.tasks[:10]:
        t["data"]["priority"] = t["id"]  # tasks 10, 9, 8 ... head the queue; the other 10 have none
    fake.tasks[11]["data"]["priority"] = "high"  # a person's own non-numeric value counts as none
    try:
        for top, want in ((5, {10, 9, 8, 7, 6}), (12, {*range(1, 11), 11, 12}), (20, set(range(1, 21)))):
            fake.imported.clear()
            (tmp_path / str(top)).mkdir()
            svc = service(tmp_path / str(top), fake.url)
            svc.store.project(7).put("label_config", CONFIG)
            svc.store.project(7).set_setting("predictions_top", top)
            svc.submit(7, "sync", source="test")
            row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
            assert row["status"] == "succeeded", row["error"]
            served = {p["task"] for p in fake.imported if not p["model_version"].startswith("llm:")}
            members = [p for p in fake.imported if p["model_version"].startswith("llm:")]
            assert served == want and row["result"]["predictions_pushed"] == len(fake.imported)
            assert (not members) == (top < 20), top
    finally:
        fake.close()


def test_predictions_are_built_one_import_request_at_a_time(texts):
    """A generator of predictions is consumed one request's worth at a time (at 100k tasks with per-LLM
    predictions the whole list would hold 500k dicts), and a failed request says how far it got."""
    from molal.demo import choice_result
    from molal.service.lsclient import LSClient, LSConnectionError

    fake = FakeLS(texts)
    try:
        made: list[int] = []  # how many were imported when each prediction was built

        def gen():
            for t in fake.tasks:
                made.append(len(fake.imported))
                yield {"task": t["id"], "result": choice_result("human"), "model_version": "m"}

        lsc = LSClient(fake.url, KEY)
        assert lsc.import_predictions(7, gen(), chunk=7, total=20) == 20
        assert fake.import_requests == 3 and [p["task"] for p in fake.imported] == [t["id"] for t in fake.tasks]
        assert made == [0] * 7 + [7] * 7 + [14] * 6  # built after the previous request was sent, not before
        fake.mode = 500
        with pytest.raises(LSConnectionError, match=r"importing predictions into project 7 \(0 of 20 done\)"):
            lsc.import_predictions(7, gen(), chunk=7, total=20)
    finally:
        fake.close()


def test_train_job_without_label_studio_credentials_fails_with_the_fix_named(tmp_path):
    from molal.service.jobs import execute
    from molal.service.pipeline import Service

    svc = Service(get_settings(model_dir=tmp_path / "state"))
    svc.submit(7, "train")
    row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
    assert row["status"] == "failed"
    assert "LABEL_STUDIO_URL" in row["message"] and "LABEL_STUDIO_API_KEY" in row["message"]


def _import_cost(total: int, chunk: int, a: float, b: float, rule) -> tuple[int, float, float]:
    """Requests, seconds in all and the longest request of importing ``total`` predictions when Label Studio
    takes ``a + b * size`` seconds a request (its fixed part: the counters' recount), sized by ``rule``."""
    history: list[tuple[int, float]] = []
    size, done, seconds, longest = min(chunk, 500), 0, 0.0, 0.0
    while done < total:
        part = min(size, total - done)
        dt = a + b * part
        history.append((part, dt))
        done, seconds, longest = done + part, seconds + dt, max(longest, dt)
        size = rule(history, chunk)
    return len(history), seconds, longest


def test_import_requests_are_sized_by_label_studio_s_fixed_cost_not_shrunk_under_it():
    """Where Label Studio's cost per import request is mostly per prediction, requests take about
    WRITE_SLICE_S (a person's write waits for one); where most of it is a fixed part that grows with the
    project (at 20,000 tasks: seconds a request, however small), requests are not shrunk to the floor,
    which repeated that part hundreds of times (the first job at 20,000 tasks did not finish in 68 min)."""
    from molal.service.lsclient import WRITE_SLICE_S, next_import_size

    def old_rule(history, chunk):
        size, dt = history[-1]
        return min(chunk, max(50, int(size * min(4.0, max(0.25, WRITE_SLICE_S / max(dt, 1e-3))))))

    # small project: per-prediction cost dominates -> ~1 s requests, as before
    n, secs, longest = _import_cost(20_000, 10_000, a=0.05, b=0.002, rule=next_import_size)
    assert longest <= 2.5 * WRITE_SLICE_S and secs <= 1.3 * (20_000 * 0.002 + n * 0.05)
    # big project: a fixed part of 7 s a request
    n_old, secs_old, _ = _import_cost(100_000, 10_000, a=7.0, b=0.002, rule=old_rule)
    n_new, secs_new, longest_new = _import_cost(100_000, 10_000, a=7.0, b=0.002, rule=next_import_size)
    assert n_old >= 1500 and secs_old > 3 * 3600  # the old rule: the floor of 50, hours
    fewest = 10 * 7.0 + 100_000 * 0.002  # requests of 10,000
    assert secs_new <= 2.2 * fewest and longest_new <= 2 * 7.0 + 0.1, (n_new, secs_new, longest_new)
    # a bigger request that took no longer: the cost is fixed, so the fewest requests
    assert next_import_size([(500, 7.0), (125, 7.0)], 10_000) == 10_000
    assert 50 <= next_import_size([(500, 30.0)], 10_000) <= 500  # one request seen: scaled, within bounds


def test_stale_counters_are_read_from_the_task_s_own_annotations():
    """What :meth:`LSClient.update_task_data` and the pull set back: the counters a task's annotations and
    predictions call for, where Label Studio's differ (a write saved them as read before a new annotation)."""
    from molal.service.lsclient import stale_counters

    done = {"id": 1, "completed_by": 3, "was_cancelled": False, "result": [{"value": {"choices": ["a"]}}]}
    skip = {"id": 2, "completed_by": 4, "was_cancelled": True, "result": []}
    task = {"annotations": [done], "predictions": [{"id": 9}], "total_annotations": 1, "cancelled_annotations": 0,
            "total_predictions": 1, "is_labeled": True, "overlap": 1}
    assert stale_counters(task) == {}
    # a crossing write saved the counters of before the annotation
    assert stale_counters({**task, "total_annotations": 0, "is_labeled": False}) == {
        "total_annotations": 1, "is_labeled": True}
    assert stale_counters({**task, "annotations": [done, skip]}) == {"cancelled_annotations": 1}
    assert stale_counters({**task, "total_predictions": 0}) == {"total_predictions": 1}
    assert stale_counters({**task, "total_predictions": 0}, predictions=False) == {}
    # overlap 2: one annotator does not label the task; a second (distinct) one does
    two = {**task, "overlap": 2, "total_annotations": 0, "is_labeled": False}
    assert stale_counters(two) == {"total_annotations": 1}
    other = {**done, "id": 5, "completed_by": {"id": 6}}
    assert stale_counters({**two, "annotations": [done, other]}) == {"total_annotations": 2, "is_labeled": True}
    # an annotation removed under the write: counted down, and the task is no longer labelled
    assert stale_counters({**task, "annotations": []}) == {"total_annotations": 0, "is_labeled": False}
    # an answer without the lists (another Label Studio, or an error body) is left alone
    assert stale_counters({"total_annotations": 0}) == {}
    assert stale_counters({**task, "annotations": "x", "total_annotations": 5}) == {}
