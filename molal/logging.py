"""Logging with secret redaction: every handler molal installs filters known secrets out of records."""

from __future__ import annotations

import logging
import os
import re

_SECRET_ENV = ("LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS", "OPENAI_API_KEY", "REDIS_URL", "MOLAL_API_KEY")
_PATTERNS = [
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(token|bearer|basic)\s+[^\s'\",}]+"),
    re.compile(r"(?i)((?:api[_-]?key|access_token|password|token)['\"]?\s*[:=]\s*['\"]?)[^\s'\",}&]+"),
    re.compile(r"(redis(?:s)?://[^:/@\s]*:)[^@\s]+(@)"),
]
_extra_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Add a value that must never appear in logs (e.g. an API key read from a config file)."""
    if value and len(value) >= 4:
        _extra_secrets.add(value)


def scrub(text: str) -> str:
    """Remove secrets (registered values, secret env vars, key=value patterns) from ``text``."""
    for name in _SECRET_ENV:
        v = os.environ.get(name)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    for v in _extra_secrets:
        text = text.replace(v, "***")
    text = _PATTERNS[0].sub(r"\1\2 ***", text)
    text = _PATTERNS[1].sub(r"\1***", text)
    text = _PATTERNS[2].sub(r"\1***\2", text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = scrub(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        return True


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once, with secret redaction on its handler."""
    root = logging.getLogger()
    if any(isinstance(f, RedactingFilter) for h in root.handlers for f in h.filters):
        root.setLevel(level)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level)
