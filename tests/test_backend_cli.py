"""The backend's CLI commands: project settings, jobs, train/sync without Label Studio (clear failures)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from molal.cli.main import app

runner = CliRunner()


def run(*args, env=None):
    return runner.invoke(app, list(args), env={"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": "", **(env or {})})


def test_project_set_and_show(tmp_path):
    md = str(tmp_path)
    r = run("project", "set", "--project", "4", "--model-dir", md, "loop_mode=human_free", "query_batch=20",
            "per_llm_predictions=false")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["loop_mode"] == "human_free" and s["query_batch"] == 20 and s["per_llm_predictions"] is False
    r = run("project", "set", "--project", "4", "--model-dir", md, "query_batch=default")
    assert json.loads(r.stdout)["query_batch"] == 50
    r = run("project", "show", "--project", "4", "--model-dir", md)
    assert r.exit_code == 0 and json.loads(r.stdout)["settings"]["loop_mode"] == "human_free"
    for bad in ("loop_mode=sometimes", "nope=1", "query_batch", "query_batch=0"):
        r = run("project", "set", "--project", "4", "--model-dir", md, bad)
        assert r.exit_code == 2, (bad, r.output)
        assert "error" in r.output


def test_train_without_label_studio_fails_clearly_and_is_recorded(tmp_path):
    md = str(tmp_path)
    r = run("train", "--project", "3", "--model-dir", md)
    assert r.exit_code == 1
    assert "LABEL_STUDIO_URL" in r.output
    r = run("jobs", "--model-dir", md, "--json")
    rows = json.loads(r.stdout)
    assert [(j["kind"], j["status"]) for j in rows] == [("train", "failed")]
    r = run("jobs", rows[0]["id"], "--model-dir", md)
    assert r.exit_code == 0 and json.loads(r.stdout)["project"] == 3
    r = run("jobs", "--model-dir", md)
    assert r.exit_code == 0 and "failed" in r.stdout
    assert run("jobs", "0000", "--model-dir", md).exit_code == 1


def test_queue_only_and_coalescing(tmp_path):
    md = str(tmp_path)
    r1 = run("sync", "--project", "3", "--model-dir", md, "--queue")
    r2 = run("sync", "--project", "3", "--model-dir", md, "--queue")
    j1, j2 = json.loads(r1.stdout.strip().splitlines()[-1]), json.loads(r2.stdout.strip().splitlines()[-1])
    assert j1["created"] and not j2["created"] and j1["job"] == j2["job"]


def test_bad_project_and_strategy(tmp_path):
    assert run("train", "--project", "0", "--model-dir", str(tmp_path)).exit_code == 2
    r = run("query", "--project", "1", "--strategy", "astrology", "--model-dir", str(tmp_path))
    assert r.exit_code == 2 and "strategy" in r.output
