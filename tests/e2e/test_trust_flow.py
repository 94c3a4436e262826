"""How far to trust molal, served (issue 27), against a REAL Label Studio and the real backend under gunicorn,
on TREC with the 5 real LLMs' recorded answers:

the audit slice (1 task in each block of ``audit_every`` places of the "molal queue" tab, drawn at random, at a
random place in the block, marked in the data only, held out of training) → the quality report
(``GET /projects/N``, ``molal project report``, the status block in Label Studio's instructions) → certified
labels written as molal's annotations (the ``auto_label`` setting in a training job, ``molal project certify``)
and the command's refusal without audit labels.
People are simulated by gold labels through Label Studio's API. The project is an easy one (TREC questions
most of the LLMs get right), so that the certificate is expected at ε = 0.2 (see EPS).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from molal.demo import (
    all_tasks,
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

N_TASKS = 260
N_SEEDS = 50
EVERY = 4  # 1 task in 4 of the queue is an audit task (a bigger share than the default 10: a small project)
N_QUEUE = 16  # tasks people label from the rest of the queue
# The certificate's level. The project is an easy one on purpose: TREC questions where most of the 5 recorded
# LLMs are right (MoLAM then errs on about 1 task in 100, and an audit of 53 certifies at ε = 0.2 in 30 of 30
# simulated draws). On TREC as a whole, a 260-task project's MoLAM errs on about 1 task in 5 (50 seeds) and
# ε = 0.15 is rightly refused in most draws: a test that expects a certificate there fails at random.
EPS = 0.2


def _easy_rows() -> tuple[list[dict], list[str]]:
    """N_TASKS bundled TREC rows (a fixed draw) among those where at least 3 of the 5 recorded LLMs are right."""
    import random

    import numpy as np

    from molal.data import LLMOutputs
    from molal.resources import asset_path

    rows, classes = load_rows(None, None)
    out = LLMOutputs.load(asset_path("trec_recorded.npz"))
    assert out.texts == [r["text"] for r in rows]
    gold = np.array([out.class_names.index(r["label"]) for r in rows])
    right = (out.normalized_probs().argmax(2) == gold[:, None]).sum(1)
    easy = np.flatnonzero(right >= 3).tolist()
    return [rows[i] for i in sorted(random.Random(3).sample(easy, N_TASKS))], classes


def _molal(backend, label_studio, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The ``molal`` command line as a person runs it, on the backend's MODEL_DIR and Label Studio."""
    env = {**os.environ, "MODEL_DIR": str(backend.model_dir), "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": label_studio.token, "HF_HUB_OFFLINE": "1", "MOLAL_STUDENT_EPOCHS": "1",
           "MOLAL_STUDENT_FREEZE_ENCODER": "true", "MOLAL_STUDENT_MAX_LENGTH": "32"}
    return subprocess.run([sys.executable, "-m", "molal.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _tab(ls_client, pid: int) -> list[dict]:
    view = find_view(ls_client, pid)
    out = [t.model_dump() if hasattr(t, "model_dump") else t
           for t in ls_client.tasks.list(project=pid, view=view, fields="all", page_size=500)]
    return [t for t in out if not t.get("annotations")]


@pytest.fixture(scope="module")
def project(ls_client, backend):
    from molal.service.store import ProjectState

    rows, classes = _easy_rows()
    pid, ids = create_project(ls_client, "e2e trust", classes, rows)
    gold = {t: r["label"] for t, r in zip(ids, rows, strict=True)}
    state = ProjectState(backend.model_dir, pid)
    for k, v in {"priority_top": 40, "audit_every": EVERY, "train_every": 0, "review_panel": True,
                 "certify_epsilon": EPS, "per_llm_predictions": False}.items():
        state.set_setting(k, v)
    ml_id = connect_backend(ls_client, pid, backend.url)
    seeds = pick_seeds(gold, N_SEEDS, seed=0)
    label_seeds(ls_client, seeds, gold)
    job = wait_job(backend.url, start_training(ls_client, ml_id, backend.url, pid), 900)
    assert job["status"] == "succeeded", job
    wait_queue(backend.url, pid, timeout=900)
    return {"id": pid, "ids": ids, "gold": gold, "ml": ml_id, "seeds": set(seeds), "job": job, "state": state}


def test_audit_slice_one_place_per_block_marked_in_the_data_only(ls_client, project, backend):
    pid = project["id"]
    unl = _tab(ls_client, pid)
    assert len(unl) == N_TASKS - N_SEEDS
    audit = [i for i, t in enumerate(unl) if t["data"].get("molal_audit")]
    assert len(audit) == math.ceil((N_TASKS - N_SEEDS) / EVERY)
    assert [i // EVERY for i in audit] == list(range(len(audit)))  # one in each block of EVERY places, at random
    assert len({i % EVERY for i in audit}) > 1  # not a fixed place: the rank does not tell
    for i, t in enumerate(unl):  # the stream's line reads the same on an audit task as on any other
        line = t["data"]["molal_review"]
        assert line.startswith(f"#{i + 1} · molal pre-filled ") and " · model " in line, line
        assert "audit" not in line.lower()
    prios = [float(t["data"]["priority"]) for t in unl]
    assert prios == sorted(prios, reverse=True)
    # the tab hides the mark; the backend knows the same tasks
    view = ls_client.views.get(id=find_view(ls_client, pid))
    data = view.data if not isinstance(view, dict) else view["data"]
    assert "tasks:data.molal_audit" in data["hiddenColumns"]["explore"]
    assert {unl[i]["id"] for i in audit} == set(project["state"].get("audit_tasks"))


def test_certify_refuses_without_audit_labels(ls_client, project, backend, label_studio):
    r = _molal(backend, label_studio, "project", "certify", "--project", str(project["id"]))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no audit label yet" in r.stdout + r.stderr
    assert not any(a.get("last_action") == "prediction" for t in all_tasks(ls_client, project["id"])
                   for a in t["annotations"])
    q = backend.get(f"/projects/{project['id']}")["quality"]
    assert q["audit"]["labelled"] == 0 and q["certificate"]["threshold"] is None


@pytest.fixture(scope="module")
def audited(ls_client, project, backend):
    """People label every audit task and the first non-audit tasks of the tab; a training job with
    auto_label on follows."""
    pid = project["id"]
    unl = _tab(ls_client, pid)
    audit = [t for t in unl if t["data"].get("molal_audit")]
    queue = [t for t in unl if not t["data"].get("molal_audit")][:N_QUEUE]
    seen = {t["id"]: (t["data"]["molal_label"], t["data"]["molal_model"]) for t in audit + queue}
    label_seeds(ls_client, [t["id"] for t in audit + queue], project["gold"])
    project["state"].set_setting("auto_label", True)
    t0 = time.monotonic()
    job = wait_job(backend.url, start_training(ls_client, project["ml"], backend.url, pid), 900)
    assert job["status"] == "succeeded", job
    wait_queue(backend.url, pid, timeout=900)
    return {"audit": [t["id"] for t in audit], "queue": [t["id"] for t in queue], "seen": seen, "job": job,
            "train_s": time.monotonic() - t0}


def test_audit_labels_are_held_out_of_training(project, audited):
    res = audited["job"]["result"]
    assert res["n_human"] == N_SEEDS + N_QUEUE  # MoLAM and the student: seeds + queue, never the audit
    assert res["version"] != project["job"]["result"]["version"]


def test_report_in_the_api(project, audited, backend):
    q = backend.get(f"/projects/{project['id']}")["quality"]
    gold, seen = project["gold"], audited["seen"]
    assert q["audit"]["labelled"] == len(audited["audit"]) and q["queue"]["labelled"] == N_QUEUE
    a = q["audit"]["prefill"]
    k = sum(seen[t][0] == gold[t] for t in audited["audit"])
    assert a["molam"]["overall"]["k"] == k and a["molam"]["overall"]["n"] == len(audited["audit"])
    assert a["molam"]["overall"]["low"] <= k / len(audited["audit"]) <= a["molam"]["overall"]["high"]
    assert {f"llm:{n}" for n in ("gemma", "llama", "mistral", "qwen", "yi")} <= set(a)
    assert all(v["overall"]["n"] > 0 for v in a.values())
    kq = sum(seen[t][0] == gold[t] for t in audited["queue"])
    assert q["queue"]["prefill"]["molam"]["overall"]["k"] == kq
    assert sum(map(sum, a["molam"]["confusion"]["counts"])) == len(audited["audit"])
    v1 = project["job"]["result"]["version"]
    by = {v["version"]: v for v in q["by_version"]}
    assert by[v1]["audit"]["n"] == len(audited["audit"]) and by[v1]["queue"]["n"] == N_QUEUE
    assert q["audit"]["current"]["overall"]["n"] == len(audited["audit"])  # the new model, on held-out labels
    # which version pre-annotated each audited task is kept
    rec = project["state"].get("audited")
    assert {rec[str(t)]["version"] for t in audited["audit"]} == {v1}


def test_report_on_the_command_line(project, audited, backend, label_studio, tmp_path):
    r = _molal(backend, label_studio, "project", "report", "--project", str(project["id"]), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"audit: random 1 in {EVERY}" in r.stdout and "molal's pre-fill" in r.stdout
    png, page = tmp_path / f"report-{project['id']}.png", tmp_path / f"report-{project['id']}.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "data:image/png;base64," in page.read_text()


def test_status_line_in_label_studio(ls_client, project, audited):
    deadline = time.time() + 30
    while "Quality: on the random audit" not in (text := ls_client.projects.get(id=project["id"]).expert_instruction
                                                  or ""):
        assert time.time() < deadline, text
        time.sleep(0.5)
    assert f"(1 task in {EVERY})" in text


def test_certified_labels_written_as_molal_annotations(ls_client, project, audited, backend, label_studio):
    pid, gold = project["id"], project["gold"]
    res = audited["job"]["result"]
    cert = res["certified"]
    assert cert.get("written", 0) > 0, cert  # 53 audit labels, δ = 0.1
    tasks = {t["id"]: t for t in all_tasks(ls_client, pid)}
    mine = {tid: t for tid, t in tasks.items() if any(a.get("last_action") == "prediction" for a in t["annotations"])}
    assert len(mine) == cert["written"]
    assert not set(mine) & (set(audited["audit"]) | set(audited["queue"]) | project["seeds"])
    wrong = 0
    for t in mine.values():
        (ann,) = t["annotations"]
        label = ann["result"][0]["value"]["choices"][0]
        assert t["data"]["molal_certified"].startswith(f"labelled by molal: {res['version']}, confidence >= ")
        wrong += label != gold[t["id"]]
    frame = backend.get(f"/projects/{pid}")["quality"]["certificate"]["pool_certified"]
    print(f"\ncertified {len(mine)} of {len(tasks)} tasks at {cert['threshold']:.3f}: {wrong} wrong against gold "
          f"({wrong / len(mine):.1%} of molal's labels; {wrong / frame:.1%} of the {frame} final labels at or above "
          f"the threshold, audit included; ε = {EPS}); training job {audited['train_s']:.0f} s")
    assert wrong <= min(2 * EPS, EPS + 0.1) * len(mine)  # the certificate: <= ε with 90% probability
    # molal's own annotations are not people's labels: no retrain counted, not in the report, out of the tab
    assert backend.get(f"/projects/{pid}")["new_annotations"] == 0  # the job took the people's; molal's never count
    assert not set(mine) & {t["id"] for t in _tab(ls_client, pid)}
    # the command: the same certificate, nothing left to write; --refresh measures again without them
    r = _molal(backend, label_studio, "project", "certify", "--project", str(pid))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["result"]
    assert out["certified"]["written"] == 0 and out["certified"]["total_certified_by_molal"] == len(mine)
    r = _molal(backend, label_studio, "project", "report", "--project", str(pid), "--refresh", "--json")
    assert r.returncode == 0, r.stderr
    q = json.loads(r.stdout)
    assert q["audit"]["labelled"] == len(audited["audit"]) and q["queue"]["labelled"] == N_QUEUE
    # a person who corrects one of molal's labels makes it theirs: from then on it counts as a person's label
    (ann,) = next(iter(mine.values()))["annotations"]
    was = ann["result"][0]["value"]["choices"][0]
    fixed = {**ann["result"][0], "value": {"choices": [next(c for c in sorted(set(gold.values())) if c != was)]}}
    ls_client.annotations.update(id=ann["id"], result=[fixed])
    r = _molal(backend, label_studio, "project", "report", "--project", str(pid), "--refresh", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["queue"]["labelled"] == N_QUEUE + 1
