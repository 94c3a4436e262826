"""MOLAL_TRUST_SETUP_HOSTNAME=true lets any caller who can send /setup choose the address molal connects to
(issue 25, C). What a caller then reads about a failure there must not be a port or content oracle: an open
port answering 404, a closed port, a redirect away, a body that is not UTF-8, an empty one, one that never
comes — every task error and every job message reads the same, byte for byte, but for a random error id;
the log has the details under that id. Job messages name no Label Studio address in any mode.

Real HTTP servers on loopback stand in for the ports an attacker would probe."""

from __future__ import annotations

import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import TREC_CONFIG, free_port
from tests.test_security_network import _no_ls_env, make_app, run_next_job  # noqa: F401 - the fixture

CONFIG = TREC_CONFIG
SETUP_TOKEN = "token-from-setup-fedcba9876543210"
TEXT = "Who wrote The Night of the Iguana ?"
ID = re.compile(r"error id ([0-9a-f]{12})")


class _Probe(BaseHTTPRequestHandler):
    """Answers every GET as its ``mode`` says: 404, a redirect to another host, a body that is not UTF-8, an
    empty body, or nothing at all (holds the connection)."""

    mode = "404"
    hold: threading.Event

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.mode == "silent":
            self.hold.wait(30)
            return
        if self.mode == "redirect":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1:8080/data/upload/7/x.txt")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = {"404": b'{"detail": "Not found."}', "latin1": b"\xff\xfeGeheimnis caf\xe9",
                "empty": b""}[self.mode]
        self.send_response(404 if self.mode == "404" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def _servers():
    """name -> (base URL, server or None): the probes, and a port where nothing listens."""
    out = {}
    hold = threading.Event()
    for mode in ("404", "redirect", "latin1", "empty", "silent"):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Probe,), {"mode": mode, "hold": hold}))
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        out[mode] = (f"http://127.0.0.1:{srv.server_address[1]}", srv)
    out["closed"] = (f"http://127.0.0.1:{free_port()}", None)
    return out, hold


@pytest.fixture()
def probes():
    servers, hold = _servers()
    for name, (url, _) in servers.items():  # the stand-ins are what they claim: only 'closed' refuses
        with socket.socket() as s:
            s.settimeout(2)
            assert (s.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) == 0) == (name != "closed"), name
    yield servers
    hold.set()
    for _, srv in servers.values():
        if srv is not None:
            srv.shutdown()
            srv.server_close()


def _same(texts: dict[str, str]) -> None:
    """All texts equal once their error ids are masked; each has one id, all ids differ."""
    ids = {k: ID.findall(v) for k, v in texts.items()}
    assert all(len(i) == 1 for i in ids.values()), texts
    assert len({i[0] for i in ids.values()}) == len(ids), ids
    masked = {k: ID.sub("error id <id>", v).encode() for k, v in texts.items()}
    assert len(set(masked.values())) == 1, masked


def test_task_file_failures_read_the_same_whatever_listens(tmp_path, probes, caplog):
    """/predict of a Label Studio file path after a /setup that names each probe: byte-identical errors but
    for the id; none names the address, the status, the exception or a byte of the body. The log has them."""
    app = make_app(tmp_path, trust_setup_hostname=True, task_file_timeout_s=1.0)
    c = app.test_client()
    errors = {}
    with caplog.at_level(logging.INFO):
        for pid, (name, (url, _)) in enumerate(probes.items(), start=20):
            assert c.post("/setup", json={"project": f"{pid}.1", "schema": CONFIG, "hostname": url,
                                          "access_token": SETUP_TOKEN}).status_code == 200
            r = c.post("/predict", json={"project": f"{pid}.1", "label_config": CONFIG,
                                         "tasks": [{"id": 1, "data": {"text": f"/data/upload/{pid}/a.txt"}},
                                                   {"id": 2, "data": {"text": TEXT}}]})
            assert r.status_code == 200, r.json
            errors[name] = r.json["errors"]["1"]
    _same(errors)
    one = errors["404"]
    assert "could not be read from the Label Studio named in /setup" in one and "backend's log" in one
    bare = ID.sub("", one)  # the random error id may hold any digits (e.g. "…404…")
    for word in ("127.0.0.1", "404", "Connect", "redirect", "UTF-8", "0xff", "empty", "Timeout", "a.txt"):
        assert word not in bare, (word, one)
    log = caplog.text
    for name, (url, _) in probes.items():  # the operator finds each reason, and the address, by its id
        line = next(r.getMessage() for r in caplog.records if ID.findall(errors[name])[0] in r.getMessage())
        assert url in line, line
    assert "HTTP 404" in log and "ConnectError" in log and "elsewhere" in log and "not UTF-8" in log


def test_job_messages_read_the_same_whatever_listens(tmp_path, probes, caplog):
    """A training job against each probe fails with the same message (GET /jobs/<id>, GET /jobs) but for the
    id; no address, status or exception in it."""
    app = make_app(tmp_path, trust_setup_hostname=True)
    c = app.test_client()
    messages, listed = {}, {}
    with caplog.at_level(logging.INFO):
        for pid, (name, (url, _)) in enumerate(probes.items(), start=40):
            if name == "silent":
                continue  # the SDK's own timeout (60 s, retried): the same path as a closed port, too slow here
            c.post("/setup", json={"project": f"{pid}.1", "schema": CONFIG, "hostname": url,
                                   "access_token": SETUP_TOKEN})
            assert c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": pid}}).status_code == 201
            row = run_next_job(app)
            assert row["status"] == "failed", row
            messages[name] = c.get(f"/jobs/{row['id']}").json["message"]
            listed[name] = c.get(f"/jobs?project={pid}").json["jobs"][0]["message"]
    assert messages == listed
    _same(messages)
    one = messages["404"]
    assert "the Label Studio named in /setup could not be used" in one, one
    for word in ("127.0.0.1", "404", "ConnectError", "JSON", "reading project", "http"):
        assert word not in one, (word, one)
    assert probes["404"][0] in caplog.text and "ConnectError" in caplog.text


def test_job_messages_name_no_address_with_a_configured_label_studio(tmp_path, probes, caplog):
    """LABEL_STUDIO_URL set (no oracle: the operator chose the address): the message keeps the status and what
    to do, with an error id, but not the address; the log has it."""
    url = probes["404"][0]
    app = make_app(tmp_path, label_studio_url=url, label_studio_api_key="configured-key-0123456789")
    c = app.test_client()
    c.post("/setup", json={"project": "7.1", "schema": CONFIG})
    c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    with caplog.at_level(logging.INFO):
        row = run_next_job(app)
    msg = c.get(f"/jobs/{row['id']}").json["message"]
    assert "answered HTTP 404 to reading project 7" in msg and ID.search(msg), msg
    assert url not in msg and "127.0.0.1" not in msg, msg
    assert url in caplog.text and ID.search(msg).group(1) in caplog.text
    closed = probes["closed"][0]
    (tmp_path / "b").mkdir()
    app2 = make_app(tmp_path / "b", label_studio_url=closed, label_studio_api_key="configured-key-0123456789")
    c2 = app2.test_client()
    c2.post("/setup", json={"project": "7.1", "schema": CONFIG})
    c2.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    msg = run_next_job(app2)["message"]
    assert "unreachable during reading project 7" in msg and "Connection refused" in msg, msg
    assert closed not in msg and "127.0.0.1" not in msg, msg
