"""Logging with secret redaction: every log record is scrubbed when it is created (message, arguments and
traceback), so no handler — molal's, Flask's, Django's — prints a known secret."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

_SECRET_ENV = ("LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS", "OPENAI_API_KEY", "REDIS_URL", "MOLAL_API_KEY",
               "MOLAL_DATABASE_URL", "PGPASSWORD")
_PATTERNS = [
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(token|bearer|basic)\s+[^\s'\",}]+"),
    re.compile(r"(?i)((?:api[_-]?key|access_token|password|token)['\"]?\s*[:=]\s*['\"]?)[^\s'\",}&]+"),
    re.compile(r"((?:redis|rediss|postgres|postgresql)://[^:/@\s]*:)[^@\s]+(@)"),
]
#: configured secrets (keys named by a mixture config, a Label Studio access token derived from the configured
#: key): redacted everywhere. Never values taken from a request — any caller could otherwise make any word
#: vanish from the logs. Bounded: the newest 64 are kept.
_extra_secrets: dict[str, None] = {}
_MAX_SECRETS = 64
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Add a configured value that must never appear in logs (e.g. an API key read from a config file).
    Only for secrets of the server's own configuration, never for values a request carries."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _extra_secrets.pop(value, None)
            _extra_secrets[value] = None
            while len(_extra_secrets) > _MAX_SECRETS:
                del _extra_secrets[next(iter(_extra_secrets))]


def scrub(text: str) -> str:
    """Remove secrets (registered values, secret env vars, key=value patterns) from ``text``."""
    for name in _SECRET_ENV:
        v = os.environ.get(name)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    with _secrets_lock:
        extra = list(_extra_secrets)
    for v in extra:
        text = text.replace(v, "***")
    text = _PATTERNS[0].sub(r"\1\2 ***", text)
    text = _PATTERNS[1].sub(r"\1***", text)
    text = _PATTERNS[2].sub(r"\1***\2", text)
    return text


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Scrub a record in place: its message (args merged in) and its traceback (pre-formatted into
    ``exc_text``, which every standard Formatter prints instead of formatting the traceback again)."""
    try:
        msg = record.getMessage()
    except Exception:  # a bad format string: keep the raw message, scrubbed
        msg = str(record.msg)
    clean = scrub(msg)
    if clean != msg or record.args:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None and not getattr(record, "_molal_scrubbed", False):
        record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
    record._molal_scrubbed = True  # type: ignore[attr-defined]
    return record


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_factory_installed = False


def _install_record_factory() -> None:
    """Scrub every record when it is created, whichever logger or handler it goes to (Flask's default
    handler, Django's console handler and other libraries' handlers included)."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        return redact_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _factory_installed = True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (never a stream that was closed since), and
    reports its own failures without printing the record or the exception being handled (they may hold
    secrets), unlike :meth:`logging.Handler.handleError`."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always wins
        pass

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        try:
            sys.__stderr__.write(f"molal: a log record from {record.name} could not be written\n")
        except Exception:
            pass


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once, with secret redaction on its handler and on every record."""
    _install_record_factory()
    root = logging.getLogger()
    if any(isinstance(f, RedactingFilter) for h in root.handlers for f in h.filters):
        root.setLevel(level)
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level)
