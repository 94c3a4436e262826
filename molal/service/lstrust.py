"""Where Label Studio is and which credentials go there: one rule for every path that talks to it (the
training and sync jobs, the query job, task texts stored as Label Studio files).

The rule:

1. ``LABEL_STUDIO_URL`` is set: that is Label Studio, and only it is ever contacted. The key is
   ``LABEL_STUDIO_API_KEY``; without one, the token Label Studio sent in ``/setup`` — but only when that
   ``/setup``'s ``hostname`` has the same origin (scheme, host, port) as ``LABEL_STUDIO_URL``.
2. ``LABEL_STUDIO_URL`` is unset: molal talks to no Label Studio at all (the jobs fail with a message that
   says what to set), unless the operator sets ``MOLAL_TRUST_SETUP_HOSTNAME=true``. Then the ``hostname``
   of the project's last ``/setup`` is used together with the token of that same ``/setup``, and nothing
   else: ``LABEL_STUDIO_API_KEY`` never goes to a host named in a request.

``/setup`` stores a hostname and token only when this rule can use them (:func:`setup_usable`). The
configured key, never a token from a request, is what molal registers for redaction in its logs.

Under rule 2 any caller who can send ``/setup`` chooses the address molal connects to, so what molal says
about a failure there must not tell an open port from a closed one, nor what it answered: every failure
to use a ``/setup`` Label Studio (a task file, a job's call) reads the same to the caller,
:func:`logged_failure` — a fixed sentence and an error id — and the details (address, status, exception)
go to the operator's log only, under that id. Messages never name Label Studio's address, in either mode.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from molal.service.store import ProjectState

_DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_CHARS = 4096

#: what a caller reads for any failure to use a Label Studio named by /setup (plus an error id)
SETUP_LS_FAILED = "the Label Studio named in /setup could not be used"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def logged_failure(logger: logging.Logger, message: str, detail: str) -> str:
    """``message`` with a new random error id, for the caller; ``detail`` (addresses, statuses, exceptions:
    what the operator needs) goes to ``logger`` only, under that id. The id carries nothing of the failure."""
    eid = secrets.token_hex(6)
    logger.warning("error id %s: %s", eid, detail)
    return f"{message} (error id {eid}; the backend's log has the details)"


def without_urls(text: str) -> str:
    """``text`` with every URL replaced by ``<url>`` (an exception's text may name the address it failed on)."""
    return _URL.sub("<url>", text)


def origin(url: object) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path prefix) of an http(s) URL without userinfo; None for anything else."""
    if not isinstance(url, str) or any(c.isspace() or c == "\\" or ord(c) < 32 for c in url) \
            or len(url) > MAX_URL_CHARS:
        return None
    try:
        p = urlsplit(url)
        port = p.port
    except ValueError:
        return None
    scheme = p.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not p.hostname or "@" in p.netloc:
        return None
    return scheme, p.hostname.lower(), port or _DEFAULT_PORTS[scheme], p.path.rstrip("/")


def same_origin(a: object, b: object) -> bool:
    """Both are http(s) URLs with the same scheme, host and port."""
    oa, ob = origin(a), origin(b)
    return oa is not None and ob is not None and oa[:3] == ob[:3]


@dataclass(frozen=True)
class LSAccess:
    """The Label Studio molal may talk to for a project (``url`` None: none) and the key it sends there."""

    url: str | None
    key: str | None = field(default=None, repr=False)
    #: where the key comes from: "settings" (LABEL_STUDIO_API_KEY) or "setup" (the /setup token)
    key_source: str | None = None
    #: why ``url`` or ``key`` is missing (a sentence for the job's error message)
    missing: str = ""
    #: ``url`` is the hostname of a /setup (MOLAL_TRUST_SETUP_HOSTNAME): its failures read alike
    from_setup: bool = False


def _configured_key(settings: Any) -> str | None:
    k = getattr(settings, "label_studio_api_key", None)
    v = k.get_secret_value() if k is not None else None
    if v:
        from molal.logging import register_secret

        register_secret(v)  # configured, so redacted wherever it might surface
    return v or None


def setup_usable(settings: Any, hostname: object) -> bool:
    """Whether a ``/setup`` hostname (and the token sent with it) can ever be used under the rule."""
    if origin(hostname) is None:
        return False
    if settings.label_studio_url:
        return _configured_key(settings) is None and same_origin(hostname, settings.label_studio_url)
    return bool(getattr(settings, "trust_setup_hostname", False))


def access_for(settings: Any, state: ProjectState | None) -> LSAccess:
    """The rule of this module for one project (``state`` None: no /setup connection is considered)."""
    key = _configured_key(settings)
    host, token = state.connection() if state is not None else (None, None)
    if settings.label_studio_url:
        url = settings.label_studio_url
        if key is not None:
            return LSAccess(url, key, "settings")
        if token and same_origin(host, url):
            return LSAccess(url, token, "setup")
        return LSAccess(url, None, None, missing=(
            "no Label Studio API key: set LABEL_STUDIO_API_KEY (or connect the backend from the Label Studio at "
            "LABEL_STUDIO_URL, whose /setup then sends its token)"))
    if getattr(settings, "trust_setup_hostname", False):
        if host and token and origin(host) is not None:
            return LSAccess(host, token, "setup", from_setup=True)
        return LSAccess(None, None, None, missing=(
            "Label Studio has not connected to this backend yet (MOLAL_TRUST_SETUP_HOSTNAME is on, so the "
            "hostname and token of its /setup call would be used): connect the model in Label Studio, or set "
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"))
    return LSAccess(None, None, None, missing=(
        "LABEL_STUDIO_URL is not set: molal only talks to the Label Studio it is configured with (set "
        "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY; MOLAL_TRUST_SETUP_HOSTNAME=true would instead accept the "
        "hostname Label Studio sends in /setup, with its own token)"))


__all__ = ["SETUP_LS_FAILED", "LSAccess", "access_for", "logged_failure", "origin", "same_origin", "setup_usable",
           "without_urls"]
