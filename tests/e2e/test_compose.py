"""docker/docker-compose.yml run for real: podman + podman-compose, no Docker engine and no image registry.

The images are built here (tests/compose/stack.py): molal's own two (docker/Dockerfile, docker/llamacpp.Dockerfile)
as a user builds them, and stand-ins for Label Studio 1.23.2, Redis and PostgreSQL made from Debian and PyPI
packages, tagged with the compose file's names. Then the stack runs with the CPU LLM profile (llama.cpp's
OpenAI-compatible server with SmolLM2-135M) and a person's flow is driven through Label Studio's own API:
project, backend connected by its service URL with basic auth, tasks, seeds, Start Training, the job on the RQ
worker, predictions and priorities in Label Studio. Faults: the worker killed in the middle of a job, and the
whole stack restarted (state in PostgreSQL and the volumes).

CI (MOLAL_REQUIRE_COMPOSE=1) fails these tests where podman, runc, debootstrap or podman-compose is missing;
elsewhere they are skipped. MOLAL_COMPOSE_REPORT=path writes the build and start-up times as JSON
(bench/compose.py prints them).
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from molal.demo import (
    TREC_CLASSES,
    all_tasks,
    backend_get,
    connect_backend,
    create_project,
    find_view,
    label_seeds,
    load_rows,
    pick_seeds,
    start_training,
    wait_job,
    wait_queue,
)
from tests.compose.stack import Images, Podman, Stack, StackError, new_workdir, tools_missing

pytestmark = [pytest.mark.compose, pytest.mark.timeout(3600)]

N_TASKS = 80
N_SEEDS = 50
SERVICES = ["postgres", "redis", "label-studio", "molal", "molal-worker", "llamacpp"]
HEALTHCHECKED = ["postgres", "redis", "label-studio", "molal", "llamacpp"]
REPORT: dict = {}


def _write_report() -> None:
    path = os.environ.get("MOLAL_COMPOSE_REPORT")
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(REPORT, f, indent=2)
        os.replace(tmp, path)


@pytest.fixture(scope="module")
def stack():
    missing = tools_missing()
    if missing:
        msg = f"compose test needs {', '.join(missing)} (apt-get install podman runc debootstrap; pip install podman-compose)"
        if os.environ.get("MOLAL_REQUIRE_COMPOSE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    if os.geteuid() != 0:
        msg = "the compose test builds a Debian base image with debootstrap, which needs root"
        if os.environ.get("MOLAL_REQUIRE_COMPOSE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    work = new_workdir()
    pm = Podman(work / "podman.log")
    wheels = [w for w in os.environ.get("MOLAL_COMPOSE_WHEELS", "").split(os.pathsep) if w]
    images = Images(pm, work, wheels=wheels)
    t0 = time.monotonic()
    try:
        REPORT["build_s"] = images.build_all()
    except StackError as exc:
        pytest.fail(f"{exc}\n(full log: {pm.log})")
    REPORT["build_total_s"] = round(time.monotonic() - t0, 1)
    s = Stack(pm, work)
    s.remove_all()  # what an interrupted earlier run left
    try:
        t0 = time.monotonic()
        s.up()
        REPORT["up_s"] = round(time.monotonic() - t0, 1)
        s.wait_healthy(HEALTHCHECKED, timeout=600)
        REPORT["up_to_healthy_s"] = round(time.monotonic() - t0, 1)
        _write_report()
        yield s
    finally:
        _write_report()
        s.remove_all()


@pytest.fixture(scope="module")
def ls(stack):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=stack.ls_url, api_key=stack.env["LABEL_STUDIO_USER_TOKEN"], timeout=120)


def _auth(stack) -> tuple[str, str]:
    return stack.env["BASIC_AUTH_USER"], stack.env["BASIC_AUTH_PASS"]


def test_every_service_runs_and_its_healthcheck_passes(stack):
    states = {s: stack.state(s) for s in SERVICES}
    assert all(v == "running" for v in states.values()), f"{states}\n{stack.logs(*SERVICES)}"
    assert all(stack.healthcheck(s) for s in HEALTHCHECKED)
    # the vLLM servers belong to the "gpu" profile: not started on this CPU stack
    names = stack.pm.podman("ps", "-a", "--format", "{{.Names}}").stdout.decode().split()
    assert not [n for n in names if "vllm" in n and n.startswith(stack.project)], names


def test_backend_needs_basic_auth_on_the_network(stack):
    port = stack.env["MOLAL_PORT"]
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 401, r.text
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", auth=("labelstudio", "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", auth=_auth(stack), timeout=10).status_code == 200
    # the LLM server requires its key too (only the compose network reaches it): no key, no answer
    probe = ("import urllib.request, urllib.error\n"
             "try:\n urllib.request.urlopen('http://llamacpp:8000/v1/models', timeout=5); print('open')\n"
             "except urllib.error.HTTPError as e: print(e.code)\n")
    out = stack.pm.podman("exec", stack.container("molal"), "python", "-c", probe).stdout.decode().strip()
    assert out in ("401", "403"), out


@pytest.fixture(scope="module")
def project(stack, ls):
    rows, classes = load_rows(None, None, n=N_TASKS, seed=3)
    assert classes == list(TREC_CLASSES)
    pid, ids = create_project(ls, "compose TREC", classes, rows)
    gold = {t: r["label"] for t, r in zip(ids, rows, strict=True)}
    # Label Studio reaches the backend by its service name, with basic auth (what a user enters in the UI)
    ml_id = connect_backend(ls, pid, "http://molal:9090", auth=_auth(stack), deadline_s=300)
    return {"id": pid, "ids": ids, "gold": gold, "ml": ml_id}


@pytest.fixture(scope="module")
def trained(stack, ls, project):
    seeds = pick_seeds(project["gold"], N_SEEDS, seed=0)
    label_seeds(ls, seeds, project["gold"])
    t0 = time.monotonic()
    job_id = start_training(ls, project["ml"], stack.backend_url, project["id"])
    job = wait_job(stack.backend_url, job_id, timeout=1200)
    REPORT["first_training_job_s"] = round(time.monotonic() - t0, 1)
    assert job["status"] == "succeeded", f"{job}\n{stack.logs('molal-worker', 'molal', 'llamacpp')}"
    q = wait_queue(stack.backend_url, project["id"], timeout=600)
    return {"seeds": set(seeds), "job": job, "version": job["result"]["version"], "queue": q}


def test_start_training_runs_on_the_worker_and_lands_in_label_studio(stack, ls, project, trained):
    job = trained["job"]
    # the job ran in the molal-worker container (RQ), not in the server: its host is the worker's hostname
    worker_host = stack.pm.podman("exec", stack.container("molal-worker"), "hostname").stdout.decode().strip()
    server_host = stack.pm.podman("exec", stack.container("molal"), "hostname").stdout.decode().strip()
    row = stack.psql(f"SELECT host FROM jobs WHERE id = '{job['id']}'")
    assert row == worker_host != server_host, (row, worker_host, server_host)
    assert trained["version"].startswith("molam-")
    tasks = all_tasks(ls, project["id"])
    unlabeled = [t for t in tasks if not t.get("annotations")]
    assert len(tasks) == N_TASKS and len(unlabeled) == N_TASKS - N_SEEDS
    for t in unlabeled:
        preds = {p["model_version"]: p for p in t["predictions"]}
        assert trained["version"] in preds, (t["id"], list(preds))
        assert preds[trained["version"]]["result"][0]["value"]["choices"][0] in TREC_CLASSES
    # the LLM behind llama.cpp answered: its votes are in the annotation cache, in PostgreSQL
    assert int(stack.psql("SELECT count(*) FROM annotations")) >= N_TASKS
    # priorities landed: the "molal queue" tab orders the unlabeled tasks by data.priority
    view = find_view(ls, project["id"])
    assert view is not None
    ordered = [t.model_dump() if hasattr(t, "model_dump") else t
               for t in ls.tasks.list(project=project["id"], view=view, fields="all", page_size=100)]
    prios = [float((t["data"] or {}).get("priority") or 0) for t in ordered if not t.get("annotations")]
    assert len(prios) == N_TASKS - N_SEEDS and prios == sorted(prios, reverse=True) and prios[0] > 0, prios[:10]
    assert trained["queue"]["upto"] == trained["queue"]["total"] == N_TASKS - N_SEEDS


def test_worker_killed_mid_job_fails_clearly_and_loses_nothing(stack, ls, project, trained):
    pid = project["id"]
    versions = backend_get(stack.backend_url, f"/versions?project={pid}")["versions"]
    cached = int(stack.psql("SELECT count(*) FROM annotations"))
    more = [t for t in project["ids"] if t not in trained["seeds"]][:10]
    label_seeds(ls, more, project["gold"])
    job_id = start_training(ls, project["ml"], stack.backend_url, pid)
    deadline = time.monotonic() + 300
    while (job := backend_get(stack.backend_url, f"/jobs/{job_id}"))["status"] != "running":
        assert job["status"] == "queued" and time.monotonic() < deadline, job
        time.sleep(0.5)
    time.sleep(1)  # in the middle of it (the job takes tens of seconds: the student is trained in it)
    assert backend_get(stack.backend_url, f"/jobs/{job_id}")["status"] == "running"
    t_kill = time.monotonic()
    stack.pm.podman("kill", stack.container("molal-worker"))
    stack.pm.podman("start", stack.container("molal-worker"))
    job = wait_job(stack.backend_url, job_id, timeout=600)
    REPORT["killed_job_settled_s"] = round(time.monotonic() - t_kill, 1)
    # it fails clearly (the restarted worker notices; no other job is needed for that): it says what happened,
    # the model it would have replaced keeps serving, and a new press trains again
    assert job["status"] == "failed", job
    text = (job.get("message") or "").lower()
    assert "worker died" in text and ("heartbeat" in text or "process" in text), job
    assert backend_get(stack.backend_url, f"/versions?project={pid}")["versions"] == versions
    job = wait_job(stack.backend_url, start_training(ls, project["ml"], stack.backend_url, pid), timeout=1200)
    assert job["status"] == "succeeded", f"{job}\n{stack.logs('molal-worker')}"
    # nothing lost: the annotation cache only grew, the earlier versions are still listed, the seeds are there
    assert int(stack.psql("SELECT count(*) FROM annotations")) >= cached
    after = backend_get(stack.backend_url, f"/versions?project={pid}")["versions"]
    assert set(versions) <= set(after) and len(after) > len(versions), (versions, after)
    labeled = [t for t in all_tasks(ls, pid) if t.get("annotations")]
    assert len(labeled) == N_SEEDS + len(more)
    project["version"] = job["result"]["version"]


def test_whole_stack_restart_keeps_projects_models_and_cache(stack, ls, project, trained):
    pid = project["id"]
    version = project.get("version", trained["version"])
    cached = int(stack.psql("SELECT count(*) FROM annotations"))
    versions = backend_get(stack.backend_url, f"/versions?project={pid}")["versions"]
    t0 = time.monotonic()
    stack.down()  # containers and network go; the named volumes stay
    assert stack.state("molal") == "missing"
    stack.up()
    stack.wait_healthy(HEALTHCHECKED, timeout=600)
    REPORT["restart_to_healthy_s"] = round(time.monotonic() - t0, 1)  # down + up + every healthcheck passing
    # Label Studio's project, tasks and labels (its PostgreSQL database)
    tasks = all_tasks(ls, pid)
    assert len(tasks) == N_TASKS and sum(1 for t in tasks if t.get("annotations")) >= N_SEEDS
    # molal's models (molal-data volume), project state and annotation cache (PostgreSQL)
    assert backend_get(stack.backend_url, f"/versions?project={pid}")["versions"] == versions
    assert int(stack.psql("SELECT count(*) FROM annotations")) == cached
    # and the backend serves the same model: Label Studio's "Retrieve predictions" gets that version
    task = next(t["id"] for t in tasks if not t.get("annotations"))
    for p in ls.predictions.list(task=task):
        ls.predictions.delete(id=p.id)
    for _ in range(5):  # Label Studio checks the backend (1 s /health) before a batch; a cold start may miss it
        ls.actions.create(id="retrieve_tasks_predictions", project=pid, selected_items={"all": False, "included": [task]})
        got = {p.model_version for p in ls.predictions.list(task=task)}
        if got:
            break
        time.sleep(3)
    assert version in got, (version, got)
