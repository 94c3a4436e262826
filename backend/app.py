"""Flask app factory: Label Studio's ML-backend protocol over :class:`molal.service.pipeline.Service`.

Endpoints: ``GET /health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``, ``POST /train`` (the
older Label Studio training call, same as START_TRAINING), ``GET /metrics``,
``GET /versions``, ``GET /jobs/<id>``, ``GET /jobs?project=N``, ``GET /projects/<id>``.
Environment (see molal.config.Settings): ``MODEL_DIR``, ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``,
``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` (when set, every endpoint but ``/health`` needs them),
``REDIS_URL`` (jobs go to RQ workers, ``molal worker``), ``MOLAL_PREDICT_BUDGET_S``, ``MOLAL_TRAIN_EVERY``...
Malformed input answers 4xx with ``{"error": "..."}``; an unexpected failure answers 500 without details.

Secure by default (README "Deploying safely"): writes (POST) take only ``Content-Type: application/json``
(no form a browser could send cross-site); without basic auth only loopback ``Host`` names are served (no DNS
rebinding; ``MOLAL_ALLOWED_HOSTS``); bodies over ``MOLAL_MAX_BODY_BYTES`` get 413; GETs never create state;
``backend/gunicorn.conf.py`` refuses to listen beyond loopback without auth.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from functools import partial

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.hosts import LOOPBACK_NAMES, allowed_host, host_header_error, host_name  # noqa: F401
from molal import __version__
from molal.config import Settings, get_settings
from molal.logging import register_secret, scrub, setup_logging
from molal.service.errors import BadRequest, Forbidden, ServiceError, TooLarge, UnsupportedMediaType

log = logging.getLogger("molal.backend")


def _json_body() -> object:
    limit = request.max_content_length
    if limit is not None and request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the request body is {request.content_length} bytes; this backend accepts at most {limit} "
                       "(MOLAL_MAX_BODY_BYTES)")
    try:
        raw = _read_body()
    except RequestEntityTooLarge:
        raise TooLarge(f"the request body is over {limit} bytes (MOLAL_MAX_BODY_BYTES)") from None
    if not raw or not raw.strip():
        raise BadRequest("empty request body; expected JSON")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest(f"the request body is JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_depth(body)
    return body


def _read_body() -> bytes:
    """The request body, read in as few calls as its Content-Length allows: werkzeug's own ``get_data``
    reads 64 KiB at a time, and each read of gunicorn's buffered input copies all it still holds (a 32 MB
    /predict took 10-20 s to read that way on a busy 2-core machine; in one call, well under a second)."""
    n = request.content_length
    if not n:
        return request.get_data(cache=True)  # chunked (no Content-Length) or empty
    parts, got = [], 0
    while got < n:
        part = request.stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


#: deeper request bodies are refused (400): nothing Label Studio sends nests beyond ~10 levels, and very
#: deep JSON would exhaust the recursion limit in json.dumps/jsonify later.
MAX_JSON_DEPTH = 64


def _check_depth(body: object) -> None:
    stack = [(body, 1)]
    while stack:
        obj, d = stack.pop()
        if isinstance(obj, (dict, list)):
            if d > MAX_JSON_DEPTH:
                raise BadRequest(f"the request body is JSON nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((v, d + 1) for v in (obj.values() if isinstance(obj, dict) else obj))


#: lists longer than this, in the top two levels of an answer, are encoded an element at a time
_PIECEWISE = 64


def _json_pieces(dumps, obj: object, depth: int = 0):
    """``obj``'s JSON in pieces: the elements of long lists near the top (``results`` of /predict) each by
    their own ``dumps`` call."""
    if depth < 2 and isinstance(obj, list) and len(obj) > _PIECEWISE:
        yield "["
        for i, x in enumerate(obj):
            if i:
                yield ","
            yield from _json_pieces(dumps, x, depth + 1)
        yield "]"
    elif depth < 2 and isinstance(obj, dict) and any(isinstance(v, list) and len(v) > _PIECEWISE
                                                     for v in obj.values()):
        yield "{"
        for i, (k, v) in enumerate(obj.items()):
            yield ("," if i else "") + dumps(str(k)) + ":"
            yield from _json_pieces(dumps, v, depth + 1)
        yield "}"
    else:
        yield dumps(obj)


def json_response(app: Flask, obj: object, status: int = 200) -> Response:
    """``jsonify`` for big answers. One ``json.dumps`` call holds the GIL until it returns: for an 18 MB
    /predict answer that is most of a second in which no other thread of the worker — nor its event loop,
    which answers /health — runs. Encoded piece by piece, the GIL changes hands between pieces; the bytes
    are the same as ``jsonify``'s."""
    dumps = partial(app.json.dumps, separators=(",", ":"))  # as jsonify outside debug mode
    body = ("".join(_json_pieces(dumps, obj)) + "\n").encode()
    return Response(body, status, mimetype="application/json")


def preload(settings: Settings | None = None) -> float:
    """Import what /setup needs before the worker takes requests (a cold worker otherwise spent 3-16 s of
    Label Studio's 3 s /setup budget importing the label-config parser, the annotators, MoLAM). Loading a
    published MoLAM needs neither scikit-learn nor XGBoost (~4 s): an XGBoost candidate's booster is built
    at its first prediction (/predict has 100 s). When a Label Studio can be reached (``settings``), also the
    SDK's client that reads task files from it (~3 s cold, else spent inside a /predict's budget)."""
    t0 = time.perf_counter()
    import label_studio_sdk.label_interface  # noqa: F401  (the label-config parser: ~2.5 s cold)

    if settings is not None and (settings.label_studio_url or settings.trust_setup_hostname):
        import label_studio_sdk.client  # noqa: F401

    import molal.annotators.embedding  # noqa: F401
    import molal.annotators.mixture  # noqa: F401
    import molal.annotators.replay  # noqa: F401
    import molal.molam  # noqa: F401
    import molal.service.predict  # noqa: F401

    return time.perf_counter() - t0


def create_app(settings: Settings | None = None, start_worker: bool = True):
    """Build the app. ``start_worker``: run the in-process job worker thread (ignored with REDIS_URL)."""
    from molal.resources import offline_env
    from molal.service.pipeline import Service

    offline_env()
    settings = settings or get_settings()
    setup_logging(settings.log_level.upper())
    if settings.label_studio_api_key is not None:
        register_secret(settings.label_studio_api_key.get_secret_value())
    if settings.basic_auth_pass is not None:
        register_secret(settings.basic_auth_pass.get_secret_value())
    dt = preload(settings)
    log.debug("preloaded the request path's modules in %.1f s", dt)
    svc = Service(settings)
    if start_worker:
        svc.start_worker()
    app = Flask("molal-backend")
    app.config["MOLAL_SERVICE"] = svc
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False

    user = settings.basic_auth_user
    password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass is not None else None
    if bool(user) != bool(password):
        raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
    hosts = settings.allowed_hosts
    allowed = frozenset(h.strip().lower() for h in hosts.split(",") if h.strip()) if hosts else None
    check_host = allowed is not None or not (user or settings.insecure_no_auth)

    @app.before_request
    def _host():
        # the worker frames requests by these rules already; under any other WSGI server the app applies them
        raw = request.environ.get("HTTP_HOST")
        why = host_header_error([raw.encode("latin-1")] if raw is not None else [],
                                http11=request.environ.get("SERVER_PROTOCOL") == "HTTP/1.1")
        if why:
            raise BadRequest(why)
        if check_host and not allowed_host(host_name(request.host), allowed):
            raise Forbidden("this backend answers only requests addressed to it by an allowed host name "
                            "(MOLAL_ALLOWED_HOSTS; without basic auth: localhost and loopback addresses)")
        return None

    @app.before_request
    def _auth():
        if not user or request.path == "/health":
            return None
        auth = request.authorization
        # both fields are always compared in constant time (no early exit revealing a right user name)
        user_ok = hmac.compare_digest((auth.username or "").encode() if auth else b"", user.encode())
        pass_ok = hmac.compare_digest((auth.password or "").encode() if auth else b"", (password or "").encode())
        ok = auth is not None and auth.type == "basic" and user_ok and pass_ok
        if not ok:
            return Response(
                '{"error": "authentication required (basic auth)"}', 401,
                {"WWW-Authenticate": 'Basic realm="molal"', "Content-Type": "application/json"},
            )
        return None

    @app.before_request
    def _json_only():
        if request.method == "POST" and request.mimetype != "application/json":
            raise UnsupportedMediaType("send the request body as JSON with Content-Type: application/json")
        return None

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError):
        log.info("%s %s -> %d: %s", request.method, request.path, exc.status, scrub(str(exc)))
        return jsonify({"error": scrub(str(exc))}), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return jsonify({"error": exc.description or exc.name}), exc.code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.error("%s %s failed: %s", request.method, request.path, scrub(f"{type(exc).__name__}: {exc}"),
                  exc_info=exc)
        return jsonify({"error": f"internal error ({type(exc).__name__}); see the backend log"}), 500

    @app.get("/health")
    @app.get("/")
    def health():
        return jsonify({"status": "UP", "model_class": "molal", "version": __version__, "pid": os.getpid(),
                        "warm": svc.warm})

    @app.post("/setup")
    def setup():
        return jsonify(svc.setup(_json_body()))

    @app.post("/predict")
    def predict():
        started = time.monotonic()  # MOLAL_PREDICT_BUDGET_S counts from here: parsing the body is part of it
        return json_response(app, svc.predict(_json_body(), started=started))

    @app.post("/webhook")
    def webhook():
        out = svc.webhook(_json_body())
        return jsonify(out), 201 if out.get("status") == "queued" else 200

    @app.post("/train")
    def train():
        out = svc.train_request(_json_body())
        return jsonify(out), 201 if out.get("status") == "queued" else 200

    @app.get("/metrics")
    def metrics():
        return jsonify(svc.metrics())

    @app.get("/versions")
    def versions():
        return jsonify(svc.versions(request.args.get("project")))

    @app.get("/jobs/<job_id>")
    def job(job_id: str):
        return jsonify(svc.job(job_id))

    @app.post("/job_status")
    def job_status():
        return jsonify(svc.job_status(_json_body()))

    @app.get("/jobs")
    def jobs():
        project = request.args.get("project")
        if not project:
            raise BadRequest("name the project: GET /jobs?project=N (the CLI `molal jobs` lists every project's)")
        try:
            limit = min(max(int(request.args.get("limit", 50)), 1), 1000)
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        return jsonify({"jobs": svc.project_jobs(project, limit=limit)})

    @app.get("/projects/<project>")
    def project_info(project: str):
        return jsonify(svc.project_info(project, public=True))

    @app.get("/projects/<project>/status")
    def project_status_page(project: str):
        """The project's state for people (molal.service.status), linked from the labelling instructions."""
        return Response(svc.status_page(project), 200, {"Content-Type": "text/html; charset=utf-8",
                                                        "Cache-Control": "no-store",
                                                        "Content-Security-Policy": "default-src 'none'; "
                                                                                   "style-src 'unsafe-inline'"})

    return app
