"""gunicorn settings for the molal backend (``molal serve`` passes host/port/workers on the command line).

Threaded workers: /predict calls for cached tasks are short and can overlap; the in-process job worker is
a separate thread in each worker process. ``timeout`` exceeds the predict budget (MOLAL_PREDICT_BUDGET_S)
so a long /predict answers with what is ready instead of being killed. The app is not preloaded: each
worker process builds its own app (models load lazily, once per worker).
"""

import os

bind = os.environ.get("MOLAL_BIND", "127.0.0.1:9090")
workers = int(os.environ.get("MOLAL_WORKERS", "2"))
worker_class = "gthread"
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
