"""Security of the ML backend: basic auth on every endpoint but /health (constant-time comparison), secrets
never in logs / error messages / job records / /metrics, no URL from task data is ever fetched, owner-only
files, and request paths validated before they reach the filesystem."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from molal.config import get_settings
from tests.conftest import TREC_CLASSES, TREC_CONFIG

TREC = TREC_CLASSES
CONFIG = TREC_CONFIG
LS_KEY = "lskey-0123456789abcdef-SECRET"
AUTH_PASS = "basic-PASS-w0rd-SECRET"
SETUP_TOKEN = "setup-token-fedcba-SECRET"
OPENAI_KEY = "sk-openai-SECRET-4242"
SECRETS = [LS_KEY, AUTH_PASS, SETUP_TOKEN, OPENAI_KEY]


def basic(user: str, pw: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


class Recorder(BaseHTTPRequestHandler):
    """A real HTTP server on 127.0.0.1 that records every request and answers ``status`` with a body that
    echoes the request's Authorization header (the worst case for secret leaks through error messages)."""

    hits: list
    status = 200

    def _answer(self):
        self.hits.append((self.command, self.path, dict(self.headers)))
        body = json.dumps({"detail": f"no: you sent {self.headers.get('Authorization')}"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_PUT = _answer  # noqa: N815

    def log_message(self, *a):
        pass


def recording_server(status: int = 200):
    handler = type("H", (Recorder,), {"hits": [], "status": status})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler.hits, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture()
def ls_401():
    srv, hits, url = recording_server(401)
    yield url, hits
    srv.shutdown()


def make_app(tmp_path, **kw):
    from backend.app import create_app

    mix = tmp_path / "mixture.toml"
    mix.write_text('[[annotator]]\ntype = "replay"\nname = "qwen"\nsource = "bundled:trec"\n')
    return create_app(get_settings(model_dir=tmp_path / "state", mixture=mix, **kw), start_worker=False)


# -- basic auth ---------------------------------------------------------------------------------------------------
def test_basic_auth_on_every_endpoint_but_health(tmp_path):
    app = make_app(tmp_path, basic_auth_user="ls", basic_auth_pass=AUTH_PASS)
    c = app.test_client()
    rules = [r for r in app.url_map.iter_rules() if r.endpoint != "static"]
    assert len(rules) >= 10
    checked = 0
    for rule in rules:
        path = rule.rule.replace("<job_id>", "0123456789abcdef").replace("<project>", "7")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            kw = {"json": {"project": 7}} if method == "POST" else {}
            open_ = path == "/health"
            for headers in ({}, basic("ls", "wrong"), basic("wrong", AUTH_PASS), basic("", ""),
                            {"Authorization": "Bearer " + AUTH_PASS}, basic("ls", AUTH_PASS + "x"),
                            basic("ls", AUTH_PASS[:-1]), {"Authorization": "Basic !!notbase64"}):
                r = c.open(path, method=method, headers=headers, **kw)
                if open_:  # the liveness probe only
                    assert r.status_code == 200, (path, method)
                else:
                    assert r.status_code == 401, (path, method, headers, r.status_code)
                    assert r.headers["WWW-Authenticate"].startswith("Basic")
                    assert AUTH_PASS not in r.get_data(as_text=True)
                checked += 1
            r = c.open(path, method=method, headers=basic("ls", AUTH_PASS), **kw)
            assert r.status_code != 401, (path, method)
    assert checked >= 80
    # unknown paths are refused before routing too (no probing of what exists)
    assert c.get("/does-not-exist").status_code == 401


def test_basic_auth_compares_user_and_password_in_constant_time(tmp_path, monkeypatch):
    """Both fields always go through hmac.compare_digest (no early exit revealing a right user name)."""
    import backend.app as backend_app

    calls = []
    real = backend_app.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    app = make_app(tmp_path, basic_auth_user="ls", basic_auth_pass=AUTH_PASS)
    monkeypatch.setattr(backend_app.hmac, "compare_digest", spy)
    c = app.test_client()
    for headers in (basic("nobody", "x"), basic("ls", "x"), basic("ls", AUTH_PASS)):
        calls.clear()
        c.get("/metrics", headers=headers)
        assert len(calls) == 2, headers
        assert {b for _, b in calls} == {b"ls", AUTH_PASS.encode()}


# -- secrets ------------------------------------------------------------------------------------------------------
def test_secrets_never_in_logs_errors_job_records_or_metrics(tmp_path, monkeypatch, capfd, ls_401):
    """A real train job against a Label Studio that answers 401 and echoes the Authorization header back
    in its error body; a /setup carrying a token; an OpenAI key in the environment; failing requests."""
    from molal.service.jobs import execute

    url, hits = ls_401
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    grab = Grab(logging.DEBUG)
    from molal.logging import RedactingFilter

    grab.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.addHandler(grab)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        app = make_app(tmp_path, basic_auth_user="ls", basic_auth_pass=AUTH_PASS, label_studio_url=url,
                       label_studio_api_key=LS_KEY)
        c = app.test_client()
        h = basic("ls", AUTH_PASS)
        bodies = []
        r = c.post("/setup", json={"project": "7.1", "schema": CONFIG, "hostname": url, "access_token": SETUP_TOKEN},
                   headers=h)
        assert r.status_code == 200
        bodies.append(r.get_data(as_text=True))
        for payload in ({"project": "7.1", "schema": "<View>" + LS_KEY}, {"project": LS_KEY, "schema": CONFIG},
                        {"project": "7.1", "schema": CONFIG, "access_token": {"x": SETUP_TOKEN}}):
            bodies.append(c.post("/setup", json=payload, headers=h).get_data(as_text=True))
        bodies.append(c.post("/webhook", json={"action": LS_KEY}, headers=h).get_data(as_text=True))
        bodies.append(c.get("/metrics", headers=basic("ls", "wrong")).get_data(as_text=True))
        r = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}, headers=h)
        assert r.status_code == 201
        svc = app.config["MOLAL_SERVICE"]
        row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)  # the real train job, run here
        assert row["status"] == "failed"
        assert hits, "the job did not reach the (fake) Label Studio"
        assert any(LS_KEY in (hd.get("Authorization") or "") for _, _, hd in hits)  # the key was really sent
        assert "401" in row["error"] or "Unauthorized" in row["error"] or "status_code" in row["error"], row
        for ep in ("/metrics", "/jobs?project=7", f"/jobs/{row['id']}", "/projects/7", "/versions?project=7"):
            rr = c.get(ep, headers=h)
            assert rr.status_code == 200
            bodies.append(rr.get_data(as_text=True))
        bodies.append(json.dumps(svc.jobs.list(limit=1000)))
    finally:
        root.removeHandler(grab)
        root.setLevel(old_level)
    out, err = capfd.readouterr()
    everything = "\n".join(bodies + records + [out, err])
    assert len(records) > 5
    for s in SECRETS:
        assert s not in everything, f"secret {s[:6]}... leaked"
    # the job record still names the reason
    assert "Label Studio" in row["message"] or "401" in row["message"] or "ApiError" in row["message"], row


def test_settings_and_config_reprs_hide_secrets():
    s = get_settings(label_studio_api_key=LS_KEY, basic_auth_pass=AUTH_PASS, redis_url="redis://u:pw-SECRET@h:1/0")
    text = repr(s) + str(s) + json.dumps(s.model_dump(mode="json"))
    for secret in (LS_KEY, AUTH_PASS, "pw-SECRET"):
        assert secret not in text


# -- no URL from task data is fetched -------------------------------------------------------------------------------
def test_urls_in_task_data_are_never_fetched(tmp_path):
    evil, evil_hits, evil_url = recording_server(200)
    ls, ls_hits, ls_url = recording_server(200)
    try:
        app = make_app(tmp_path, label_studio_url=ls_url, label_studio_api_key=LS_KEY)
        c = app.test_client()
        texts = [f"{evil_url}/secret.txt", f"{evil_url}/data/upload/1/x.txt", "/data/upload/1/file.txt",
                 f"{ls_url}/data/upload/1/file.txt", "s3://bucket/key", "file:///etc/passwd",
                 f"<img src='{evil_url}/pixel'>", "Who wrote Hamlet ?"]
        tasks = [{"id": i, "data": {"text": t, "image": f"{evil_url}/img{i}.png", "url": evil_url}}
                 for i, t in enumerate(texts)]
        r = c.post("/predict", json={"project": 7, "label_config": CONFIG, "tasks": tasks})
        assert r.status_code == 200 and len(r.json["results"]) == len(tasks)
        assert "root:x" not in r.get_data(as_text=True)
        c.post("/setup", json={"project": 7, "schema": CONFIG, "hostname": evil_url, "access_token": "tok-123456"})
        assert evil_hits == []
        # text classification reads text only; the one exception (issue 7): a task text that is a file on the
        # configured Label Studio (/data/upload/...) is read from there, with the LS token, and nothing else is
        assert [p for _, p, _ in ls_hits] == ["/data/upload/1/file.txt"]  # relative + absolute: one read (cache)
        assert all(h.get("Authorization") == f"Token {LS_KEY}" for _, _, h in ls_hits)
    finally:
        evil.shutdown()
        ls.shutdown()


# -- files and paths ----------------------------------------------------------------------------------------------
def test_model_cache_and_state_files_are_owner_only(tmp_path):
    """Everything under MODEL_DIR after setup, predictions (cache writes), jobs and a published model."""
    from molal.service.store import ServiceStore

    old = os.umask(0o022)
    try:
        app = make_app(tmp_path)
        c = app.test_client()
        assert c.post("/setup", json={"project": 7, "schema": CONFIG}).status_code == 200
        r = c.post("/predict", json={"project": 7, "label_config": CONFIG,
                                     "tasks": [{"id": 1, "data": {"text": "Who wrote The Night of the Iguana ?"}}]})
        assert r.status_code == 200 and r.json["results"][0], r.json
        assert c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}).status_code == 201
        svc = app.config["MOLAL_SERVICE"]
        svc.cache  # noqa: B018 - opened by /predict already; make sure it exists
        st = ServiceStore(svc.store.root).project(7)
        staging = st.staging_dir("job1")
        # written the way third-party savers do (HF save_pretrained, torch.save): plain mkdir/open under umask
        (staging / "student" / "encoder").mkdir(parents=True)
        (staging / "student" / "encoder" / "model.safetensors").write_bytes(b"weights")
        from molal.io import atomic_write_bytes

        atomic_write_bytes(staging / "molam" / "model.json", b"{}")
        st.publish(staging, 1, {"classes": TREC}, job_id="job1")
    finally:
        os.umask(old)
    root = Path(svc.store.root)
    seen = 0
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{p.relative_to(root.parent)} has mode {oct(mode)}"
        seen += 1
    assert seen >= 12
    assert (root / "cache.db").exists() and (root / "jobs.db").exists()


@pytest.mark.parametrize("path", [
    "/projects/..%2F..%2Fetc", "/projects/..", "/projects/7%2F..%2F..%2Fx", "/projects/-1", "/projects/0",
    "/projects/1e3", "/projects/" + "9" * 20, "/versions?project=../../x", "/versions?project=%00",
    "/jobs?project=../x", "/jobs/..%2F..%2Fjobs.db", "/jobs/" + "a" * 40, "/jobs/a%00b",
])
def test_request_paths_never_reach_the_filesystem_unchecked(tmp_path, path):
    app = make_app(tmp_path)
    root = Path(app.config["MOLAL_SERVICE"].store.root)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = app.test_client().get(path)
    assert r.status_code in (400, 404), (path, r.status_code)
    assert r.is_json and r.json["error"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert sorted(p.name for p in (root / "projects").iterdir()) == []
