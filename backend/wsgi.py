"""``gunicorn backend.wsgi:app`` — one app (and one in-process job worker thread) per gunicorn worker.

``molal serve --host H --port P --workers N`` runs this with ``backend/gunicorn.conf.py``."""

from backend.app import create_app

app = create_app()
