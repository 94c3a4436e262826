"""Task texts that are Label Studio-hosted files (issue 7): fetched from the configured Label Studio only,
with its token, a size cap, strict UTF-8 and no redirects elsewhere; every other URL is never fetched.

Real HTTP servers on 127.0.0.1: one plays the configured Label Studio, one an "evil" host; both count hits."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from molal.config import get_settings
from molal.service import taskdata
from molal.service.taskdata import FetchError, ls_file_url, resolve_text
from tests.conftest import TREC_CLASSES, TREC_CONFIG

LS_KEY = "lskey-taskdata-0123456789-SECRET"
Q_TEXT = "What is the capital of Peru ?"
TREC = TREC_CLASSES
CONFIG = TREC_CONFIG


class Server:
    """A real HTTP server on 127.0.0.1; ``routes`` maps a path (with query) to (status, headers, body)."""

    def __init__(self, routes: dict | None = None) -> None:
        self.hits: list[tuple[str, dict]] = []
        self.routes = routes or {}
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits.append((self.path, dict(self.headers)))
                status, headers, body = outer.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture()
def servers():
    taskdata.CACHE.clear()
    evil = Server({"/secret.txt": (200, {}, b"evil text"), "/data/upload/1/q.txt": (200, {}, b"evil text")})
    ls = Server({
        "/data/upload/1/q.txt": (200, {"Content-Type": "text/plain"}, Q_TEXT.encode()),
        "/data/upload/1/bom.txt": (200, {}, "\ufeffWhere is Lima ?".encode()),
        "/data/upload/1/big.txt": (200, {}, b"a" * 5000),
        "/data/upload/1/latin1.txt": (200, {}, "Qui a écrit Hamlet ?".encode("latin-1")),
        "/data/upload/1/to-evil.txt": (302, {"Location": None}, b""),
        "/data/upload/1/to-self.txt": (302, {"Location": "/data/upload/1/q.txt"}, b""),
        "/data/local-files/?d=texts/a.txt": (200, {}, b"How far is the moon ?"),
    })
    ls.routes["/data/upload/1/to-evil.txt"] = (302, {"Location": f"{evil.url}/secret.txt"}, b"")
    yield ls, evil
    ls.close()
    evil.close()
    taskdata.CACHE.clear()


def _auth_ok(ls: Server) -> bool:
    return all(h.get("Authorization") == f"Token {LS_KEY}" for _, h in ls.hits)


# -- what is fetched ---------------------------------------------------------------------------------------------
def test_relative_and_absolute_ls_paths_are_fetched_with_the_token_and_cached(servers):
    ls, evil = servers
    assert resolve_text("/data/upload/1/q.txt", ls.url, LS_KEY) == Q_TEXT
    assert [p for p, _ in ls.hits] == ["/data/upload/1/q.txt"] and _auth_ok(ls)
    # the same file again (relative or absolute, trailing slash on the LS URL): served from the cache
    assert resolve_text(f"{ls.url}/data/upload/1/q.txt", ls.url + "/", LS_KEY) == Q_TEXT
    assert resolve_text("/data/upload/1/q.txt", ls.url, LS_KEY) == Q_TEXT
    assert len(ls.hits) == 1
    assert resolve_text(f"http://127.0.0.1:{ls.port}/data/local-files/?d=texts/a.txt", ls.url, LS_KEY) == \
        "How far is the moon ?"
    assert resolve_text("/data/upload/1/bom.txt", ls.url, LS_KEY) == "Where is Lima ?"
    assert _auth_ok(ls) and evil.hits == []


@pytest.mark.parametrize("value", [
    "{evil}/secret.txt",
    "{evil}/data/upload/1/q.txt",
    "http://127.0.0.1:{lsport}@127.0.0.1:{evilport}/data/upload/1/q.txt",  # userinfo trick
    "http://x@127.0.0.1:{lsport}/data/upload/1/q.txt",  # userinfo on the right host: refused too
    "{evil}/?x=127.0.0.1:{lsport}/data/upload/1/q.txt",
    "{evil}/data/upload/1/q.txt#127.0.0.1:{lsport}",
    "//127.0.0.1:{evilport}/data/upload/1/q.txt",  # protocol-relative
    "https://127.0.0.1:{lsport}/data/upload/1/q.txt",  # other scheme on the LS host:port
    "http://localhost:{lsport}/data/upload/1/q.txt",  # other host name
    "http://127.0.0.1:{lsport}\\@127.0.0.1:{evilport}/data/upload/1/q.txt",
    "http://127.0.0.1:{lsport}/api/projects/",  # not a data path: no token sent to the API
    "/data/upload/../../api/projects",
    "/data/upload/%2e%2e/%2e%2e/api/projects",
    "/api/projects/1",
    "file:///etc/passwd",
    "ftp://127.0.0.1:{evilport}/data/upload/1/q.txt",
    "data:text/plain,hello",
    "s3://bucket/data/upload/1/q.txt",
    "http://[::1]:{evilport}/data/upload/1/q.txt",
    "/data/upload/1/q.txt and more words",  # a sentence, not a URL
])
def test_other_urls_are_never_fetched_and_stay_the_text(servers, value):
    ls, evil = servers
    v = value.format(evil=evil.url, lsport=ls.port, evilport=evil.port)
    assert ls_file_url(v, ls.url) is None
    assert resolve_text(v, ls.url, LS_KEY) == v
    assert evil.hits == [] and ls.hits == []


def test_no_ls_configured_relative_path_is_a_clear_error_and_nothing_is_fetched(servers):
    ls, evil = servers
    with pytest.raises(FetchError, match="no Label Studio URL"):
        resolve_text("/data/upload/1/q.txt", None, LS_KEY)
    assert resolve_text(f"{ls.url}/data/upload/1/q.txt", None, LS_KEY) == f"{ls.url}/data/upload/1/q.txt"
    with pytest.raises(FetchError, match="no Label Studio API key"):
        resolve_text("/data/upload/1/q.txt", ls.url, None)
    assert ls.hits == [] and evil.hits == []


# -- what is refused ---------------------------------------------------------------------------------------------
def test_redirect_to_another_host_is_not_followed(servers):
    ls, evil = servers
    with pytest.raises(FetchError, match="redirected .* elsewhere; not followed"):
        resolve_text("/data/upload/1/to-evil.txt", ls.url, LS_KEY)
    assert evil.hits == [] and len(ls.hits) == 1
    # a redirect to another data path on the same Label Studio is followed (and re-checked)
    assert resolve_text("/data/upload/1/to-self.txt", ls.url, LS_KEY) == Q_TEXT
    assert [p for p, _ in ls.hits][1:] == ["/data/upload/1/to-self.txt", "/data/upload/1/q.txt"] and _auth_ok(ls)


def test_oversize_file_is_refused(servers):
    ls, _ = servers
    with pytest.raises(FetchError, match="over the 1000-byte limit"):
        resolve_text("/data/upload/1/big.txt", ls.url, LS_KEY, max_bytes=1000)
    assert resolve_text("/data/upload/1/big.txt", ls.url, LS_KEY, max_bytes=5000) == "a" * 5000


def test_non_utf8_file_is_refused_with_a_clear_reason(servers):
    ls, _ = servers
    with pytest.raises(FetchError, match=r"latin1.txt is not UTF-8 text$"):
        resolve_text("/data/upload/1/latin1.txt", ls.url, LS_KEY)


def test_http_errors_and_unreachable_ls_are_reasons_without_the_token(servers):
    ls, _ = servers
    with pytest.raises(FetchError, match="HTTP 404") as e:
        resolve_text("/data/upload/1/missing.txt", ls.url, LS_KEY)
    assert LS_KEY not in str(e.value)
    port = ls.port
    ls.close()
    with pytest.raises(FetchError, match="could not read /data/upload/1/q.txt from Label Studio") as e:
        resolve_text("/data/upload/1/q.txt", f"http://127.0.0.1:{port}", LS_KEY, timeout_s=2)
    assert LS_KEY not in str(e.value)


# -- through the service -----------------------------------------------------------------------------------------
def make_app(tmp_path, ls_url):
    from backend.app import create_app

    return create_app(get_settings(model_dir=tmp_path / "state", label_studio_url=ls_url, label_studio_api_key=LS_KEY),
                      start_worker=False)


def test_predict_classifies_the_fetched_text_of_an_ls_upload(servers, tmp_path, caplog):
    ls, evil = servers
    c = make_app(tmp_path, ls.url).test_client()
    tasks = [{"id": 1, "data": {"text": "/data/upload/1/q.txt"}},
             {"id": 2, "data": {"text": f"{ls.url}/data/upload/1/q.txt"}},
             {"id": 3, "data": {"text": f"{evil.url}/data/upload/1/q.txt"}},
             {"id": 4, "data": {"text": "/data/upload/1/latin1.txt"}}]
    r = c.post("/predict", json={"project": 7, "label_config": CONFIG, "tasks": tasks})
    assert r.status_code == 200, r.get_data(as_text=True)
    res = r.json["results"]
    assert len(res) == 4
    assert res[0] and res[1] and res[0][0]["result"][0]["value"]["choices"][0] in TREC
    assert res[0][0]["result"] == res[1][0]["result"]  # the same fetched text, the same answer
    assert res[3] == [] and "not UTF-8" in r.json["errors"]["4"]
    assert sorted(p for p, _ in ls.hits) == ["/data/upload/1/latin1.txt", "/data/upload/1/q.txt"]  # q.txt once
    assert _auth_ok(ls) and evil.hits == []
    assert LS_KEY not in caplog.text and LS_KEY not in r.get_data(as_text=True)


def test_predict_with_only_unreadable_ls_files_is_422_not_5xx(servers, tmp_path):
    ls, _ = servers
    c = make_app(tmp_path, ls.url).test_client()
    r = c.post("/predict", json={"project": 7, "label_config": CONFIG,
                                 "tasks": [{"id": 1, "data": {"text": "/data/upload/1/missing.txt"}}]})
    assert r.status_code == 422 and "HTTP 404" in r.get_data(as_text=True)


def test_training_pull_uses_the_fetched_text_and_keeps_task_data(servers):
    from molal.service.labelconfig import LabelSpec
    from molal.service.train import pool_from_tasks

    ls, evil = servers
    spec = LabelSpec(from_name="label", to_name="text", value_key="text", classes=tuple(TREC))

    class Svc:
        settings = get_settings(label_studio_url=ls.url, label_studio_api_key=LS_KEY)

    class State:
        id = 7

        def connection(self):
            return (evil.url, "setup-token")

    tasks = [{"id": 1, "data": {"text": "/data/upload/1/q.txt"}},
             {"id": 2, "data": {"text": "/data/upload/1/missing.txt"}},
             {"id": 3, "data": {"text": f"{evil.url}/secret.txt"}}]
    pool = pool_from_tasks(tasks, spec, resolve=taskdata.task_text_resolver(Svc.settings, State()))
    assert pool.texts == [Q_TEXT, f"{evil.url}/secret.txt"] and pool.task_ids == [1, 3] and pool.skipped == 1
    assert pool.data[0] == {"text": "/data/upload/1/q.txt"}  # written back to LS as it was
    assert evil.hits == [] and _auth_ok(ls)


def test_setup_hostname_is_used_only_when_the_operator_allows_it(servers, tmp_path, monkeypatch):
    ls, evil = servers
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)

    class Svc:
        settings = get_settings()

    class Trusting:
        settings = get_settings(trust_setup_hostname=True, label_studio_api_key="configured-key-abcdef")

    class State:
        def connection(self):
            return (ls.url, "setup-token-123456")

    # by default a hostname that arrived in a request is never contacted
    assert taskdata.ls_source(Svc.settings, State()) == (None, None)
    # allowed explicitly: with the token of that same /setup, never the configured key
    assert taskdata.ls_source(Trusting.settings, State()) == (ls.url, "setup-token-123456")

    class Configured:
        settings = get_settings(label_studio_url=ls.url)

    class EvilSetup:
        def connection(self):
            return (evil.url, "setup-token-123456")

    # a configured URL wins; a /setup token is only used for that same Label Studio
    assert taskdata.ls_source(Configured.settings, EvilSetup()) == (ls.url, None)
    assert taskdata.ls_source(Configured.settings, State()) == (ls.url, "setup-token-123456")
    assert json.dumps([evil.hits, ls.hits]) == "[[], []]"
