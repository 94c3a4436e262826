"""Host header rules, one copy for the worker (which frames requests) and the app (which serves them).

RFC 9112 section 3.2: an HTTP/1.1 request carries exactly one ``Host`` field, whose value is
``uri-host [":" port]`` (RFC 9110 section 7.2) — a registered name or IPv4 address, or an IPv6 literal in
brackets; anything else is answered 400. So a bare ``::1`` is refused the same way everywhere (write
``[::1]``), and ``[::1]`` is a loopback name like ``localhost`` and ``127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
import re

#: reg-name / IPv4address characters (unreserved, pct-encoded, sub-delims)
_REG_NAME = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=%]*")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_header_error(values: list[bytes], http11: bool = True) -> str | None:
    """Why a request's Host header fields are not acceptable, or None. ``http11``: the request is HTTP/1.1
    (then the field is mandatory; HTTP/1.0 may omit it)."""
    if not values:
        return "an HTTP/1.1 request must carry a Host header" if http11 else None
    if len(values) > 1:
        return "a request must carry one Host header, not several"
    v = values[0].strip()
    if v.startswith(b"["):
        end = v.find(b"]")
        try:
            if end < 0:
                raise ValueError
            ipaddress.IPv6Address(v[1:end].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return "malformed Host header"
        port = v[end + 1:]
    else:
        if v.count(b":") > 1:
            return "malformed Host header (an IPv6 address goes in brackets: [::1])"
        name, colon, digits = v.partition(b":")
        if not _REG_NAME.fullmatch(name):
            return "malformed Host header"
        port = colon + digits
    if port and not (port[:1] == b":" and (port[1:].isdigit() or port == b":")):
        return "malformed Host header"
    return None


def host_name(host_header: str) -> str:
    """The name in a (valid) Host header, without port or IPv6 brackets, lower-cased."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def allowed_host(name: str, allowed: frozenset[str] | None) -> bool:
    """``allowed`` None: loopback names only (localhost, 127.0.0.0/8, ::1); else those names, or '*'."""
    if allowed is None:
        return name in LOOPBACK_NAMES or (name.startswith("127.") and name.replace(".", "").isdigit())
    return "*" in allowed or name in allowed
