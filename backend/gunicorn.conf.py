"""gunicorn settings for the molal backend (``molal serve`` passes host/port/workers on the command line).

Threaded workers (:class:`backend.worker.BufferingThreadWorker`: gthread that reads each request whole in its
event loop, so slow clients never hold a thread): /predict calls for cached tasks are short and can overlap;
the in-process job worker is a separate thread in each worker process. ``timeout`` exceeds the predict budget
(MOLAL_PREDICT_BUDGET_S) so a long /predict answers with what is ready instead of being killed. The app is not
preloaded: each worker process builds its own app (it imports the request path's modules before it accepts
a request; models load lazily, once per worker).

Secure by default: gunicorn refuses to start when it would listen beyond loopback without basic auth
(``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``), unless ``MOLAL_INSECURE_NO_AUTH=true``.
"""

import os
import resource

bind = os.environ.get("MOLAL_BIND", "127.0.0.1:9090")
workers = int(os.environ.get("MOLAL_WORKERS", "2"))
worker_class = "backend.worker.BufferingThreadWorker"
threads = int(os.environ.get("MOLAL_THREADS", "4"))
timeout = int(os.environ.get("MOLAL_WORKER_TIMEOUT", "120"))
graceful_timeout = 30
keepalive = 5
preload_app = False
# gunicorn >= 24 opens a control socket at one fixed path per user: several servers on one machine (tests,
# the demo) would fight over it, and molal does not use it.
control_socket_disable = True
accesslog = os.environ.get("MOLAL_ACCESS_LOG", None)
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def _open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (at most 65,536; the workers inherit
    it) and return it: each connection being read costs one descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return 65536 if soft == resource.RLIM_INFINITY else soft


# connections a worker holds at once (being read, served or kept alive): half the descriptors, at most 1,000
worker_connections = max(64, min(1000, _open_files_limit() // 2))


def on_starting(server):
    """Refuse settings molal cannot use, and to serve beyond loopback without authentication (unless explicitly
    told to)."""
    from molal.config import SettingsError, exposure_refusal, get_settings, is_loopback_bind

    try:
        s = get_settings()
    except SettingsError as exc:  # e.g. a MOLAL_DATABASE_URL molal cannot read (the message quotes none of it)
        raise SystemExit(f"molal: {exc}") from None
    why = exposure_refusal(s, list(server.cfg.bind))
    if why:
        raise SystemExit(f"molal: {why}")
    if not (s.basic_auth_user and s.basic_auth_pass is not None):
        exposed = [b for b in server.cfg.bind if not is_loopback_bind(b)]
        if exposed:
            server.log.warning("molal: listening on %s WITHOUT authentication (MOLAL_INSECURE_NO_AUTH=true)",
                               ", ".join(exposed))


def post_fork(server, worker):
    """Two malloc arenas per worker, unless ``MALLOC_ARENA_MAX`` says otherwise: glibc gives each thread that
    allocates its own arena (up to 8 per core) and keeps what is freed in it, so a worker's request, predict,
    queue and job threads each held on to the peak of the largest request they had seen (bench/predict_budget.py:
    1.45 GB after a few 32 MB /predicts, 1.1 GB with two arenas). Python holds the GIL: threads seldom
    allocate at once, and share the two arenas at no measurable cost."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return  # glibc read it at start
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
