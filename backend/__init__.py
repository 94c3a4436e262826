"""The Label Studio ML backend: a thin Flask adapter over :mod:`molal.service` (served by gunicorn)."""
