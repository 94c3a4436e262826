"""Task texts that are Label Studio-hosted files: fetch them from Label Studio, and from nowhere else.

When .txt files are uploaded into a Label Studio project, the task's ``data.text`` holds the file's URL on
the Label Studio server — ``/data/upload/<project>/<uuid>-<name>.txt`` (relative), or the same path on an
absolute ``http(s)://<LS host>`` URL; local-files storage gives ``/data/local-files/?d=<path>``. Classifying
that string would classify a URL, so :func:`resolve_text` fetches the file — but only when it is a
Label Studio data path on **the Label Studio the service talks to** (the one rule of
:mod:`molal.service.lstrust`: ``LABEL_STUDIO_URL``; a ``/setup`` hostname only where the operator allows it): same scheme, host and port, no userinfo, a path under
``/data/upload/`` or ``/data/local-files/`` (after the LS URL's own path prefix, if any), no ``..``.
Everything else (other hosts, ``file:``, ``ftp:``, ``data:``, ``s3:``, ``http://ls@evil/``,
``http://evil/?x=ls``, …) is never fetched: the value is the task's text as it stands.

A fetch sends the Label Studio token (the SDK's header: ``Token <key>`` for a legacy token; for a JWT
personal access token the SDK exchanges the refresh token for an access token and sends ``Bearer``),
with a timeout, no redirects except to another data path on the same origin (at most 3 hops), a size cap
(``MOLAL_TASK_FILE_MAX_BYTES``, 1 MB) and strict UTF-8 decoding. Fetched texts are cached per process
(LRU, bounded by entries and bytes) so a repeated ``/predict`` costs nothing. A failure is a
:class:`FetchError` whose message is the reason given for that task (no token in it, no byte of the file).
For a Label Studio named by a ``/setup`` (``MOLAL_TRUST_SETUP_HOSTNAME``) every failure reads the same
(:data:`FILE_FAILED` and an error id; the reason is in the log under that id): any caller can choose that
address, and the reasons would tell an open port from a closed one, and what it answered.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from molal.lru import LRU
from molal.service.lstrust import _DEFAULT_PORTS, access_for, logged_failure, origin

if TYPE_CHECKING:
    from molal.service.store import ProjectState

log = logging.getLogger("molal.taskdata")

DATA_PATHS = ("/data/upload/", "/data/local-files/")
DEFAULT_MAX_BYTES = 1_000_000
DEFAULT_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3
#: what a task's error says, whatever the reason, when its file is on a /setup-named Label Studio
FILE_FAILED = "the task's text file could not be read from the Label Studio named in /setup"


class FetchError(Exception):
    """A Label Studio-hosted task file could not be used as the task's text (the message says why)."""


# -- what may be fetched ------------------------------------------------------------------------------------
def _data_path(path: str, prefix: str) -> bool:
    """``path`` is a Label Studio data path (optionally under the LS URL's path prefix) without dot segments."""
    if any(seg in (".", "..") for seg in unquote(path).split("/")):
        return False
    return any(path.startswith(prefix + d) or path.startswith(d) for d in DATA_PATHS)


def ls_file_url(value: str, ls_url: str | None) -> str | None:
    """The URL to fetch when ``value`` is a file on the Label Studio at ``ls_url``; else None (never fetch)."""
    if not isinstance(value, str):
        return None
    v = value.strip()
    if not v or len(v) > 4096 or any(c.isspace() or c == "\\" or ord(c) < 32 for c in v):
        return None
    ls = origin(ls_url) if ls_url else None
    if v.startswith("/") and not v.startswith("//"):
        if ls is None or not _data_path(urlsplit(v).path, ls[3]):
            return None
        rel = urlsplit(v)
        path, query = rel.path, rel.query
    else:
        o = origin(v)
        if o is None or ls is None or o[:3] != ls[:3]:
            return None
        p = urlsplit(v)
        if not _data_path(p.path, ls[3]):
            return None
        path, query = p.path, p.query
    # rebuild from the configured origin (never from the value's own authority): no parser differential
    scheme, host, port, _ = ls
    hostport = f"[{host}]" if ":" in host else host
    if port != _DEFAULT_PORTS[scheme]:
        hostport += f":{port}"
    return f"{scheme}://{hostport}{path}" + (f"?{query}" if query else "")


def looks_like_ls_file(value: object) -> bool:
    """A value Label Studio writes for an uploaded/local file (relative data path), whatever the LS URL."""
    return isinstance(value, str) and value.strip().startswith(DATA_PATHS)


# -- fetching -----------------------------------------------------------------------------------------------
#: texts read from Label Studio, per process: at most 512 files and 64 MB
CACHE: LRU[str, str] = LRU(512, max_size=64_000_000, sizeof=len)
#: SDK clients (they hold the JWT access token exchanged for a personal access token), per (URL, key)
_AUTH: LRU[tuple[str, str], object] = LRU(8)


def auth_header(ls_url: str, api_key: str) -> str:
    """The Authorization header the Label Studio SDK sends (legacy token or JWT refresh→access exchange)."""
    from label_studio_sdk.client import LabelStudio

    from molal.logging import register_secret

    client = _AUTH.setdefault((ls_url, api_key),
                              lambda: LabelStudio(base_url=ls_url.rstrip("/"), api_key=api_key))
    h = client._client_wrapper.get_headers()["Authorization"]  # type: ignore[attr-defined]
    if h != f"Token {api_key}":  # an access token exchanged for the key: as secret as the key itself
        register_secret(h.split(" ", 1)[-1])
    return h


def _shown(url: str) -> str:
    return urlsplit(url).path[:200]


def fetch(url: str, ls_url: str, api_key: str | None, max_bytes: int = DEFAULT_MAX_BYTES,
          timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """GET ``url`` (already checked by :func:`ls_file_url`) from Label Studio; the text, or FetchError."""
    if not api_key:
        raise FetchError(f"task text is the Label Studio file {_shown(url)} but no Label Studio API key is known "
                         "(set LABEL_STUDIO_API_KEY)")
    try:
        headers = {"Authorization": auth_header(ls_url, api_key)}
    except Exception as exc:  # noqa: BLE001 - an expired/invalid JWT, a refused refresh
        raise FetchError(f"could not authenticate to Label Studio to read {_shown(url)} "
                         f"({type(exc).__name__}; check LABEL_STUDIO_API_KEY)") from None
    cur = url
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as http:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with http.stream("GET", cur, headers=headers) as r:
                    if r.is_redirect:
                        nxt = ls_file_url(urljoin(cur, r.headers.get("location", "")), ls_url)
                        if nxt is None:
                            raise FetchError(f"Label Studio redirected {_shown(url)} elsewhere; not followed")
                        cur = nxt
                        continue
                    if r.status_code != 200:
                        raise FetchError(f"Label Studio answered HTTP {r.status_code} for {_shown(url)}")
                    n = r.headers.get("content-length")
                    if n and n.isdigit() and int(n) > max_bytes:
                        raise FetchError(f"{_shown(url)} is {int(n)} bytes, over the {max_bytes}-byte limit "
                                         "(MOLAL_TASK_FILE_MAX_BYTES)")
                    buf = bytearray()
                    for chunk in r.iter_bytes():
                        buf += chunk
                        if len(buf) > max_bytes:
                            raise FetchError(f"{_shown(url)} is over the {max_bytes}-byte limit "
                                             "(MOLAL_TASK_FILE_MAX_BYTES)")
                    break
            except httpx.HTTPError as exc:
                raise FetchError(f"could not read {_shown(url)} from Label Studio ({type(exc).__name__})") from None
        else:
            raise FetchError(f"Label Studio redirected {_shown(url)} more than {MAX_REDIRECTS} times")
    try:
        text = bytes(buf).decode("utf-8-sig")
    except UnicodeDecodeError as exc:  # the offending byte goes to the log only (it is part of the file)
        log.info("%s is not UTF-8: byte 0x%02x at offset %d", _shown(url), buf[exc.start], exc.start)
        raise FetchError(f"{_shown(url)} is not UTF-8 text") from None
    if not text.strip():
        raise FetchError(f"{_shown(url)} is empty")
    return text


def resolve_text(value: str, ls_url: str | None, api_key: str | None, max_bytes: int = DEFAULT_MAX_BYTES,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """The task's text: the Label Studio file's content when ``value`` is a file on ``ls_url``, else ``value``.

    Raises FetchError (the reason for that task) when the file cannot be used, or when ``value`` is a relative
    Label Studio data path but no Label Studio URL is known."""
    url = ls_file_url(value, ls_url)
    if url is None:
        if looks_like_ls_file(value) and not ls_url:
            raise FetchError(f"task text is the Label Studio file {value.strip()[:200]} but no Label Studio URL "
                             "is known (set LABEL_STUDIO_URL or connect the backend from Label Studio)")
        return value
    hit = CACHE.get(url)
    if hit is not None:
        return hit
    text = fetch(url, ls_url or "", api_key, max_bytes=max_bytes, timeout_s=timeout_s)
    CACHE.put(url, text)
    log.debug("read task text from Label Studio %s (%d chars)", _shown(url), len(text))
    return text


# -- for the service ----------------------------------------------------------------------------------------
def ls_source(settings, state: ProjectState | None) -> tuple[str | None, str | None]:
    """(Label Studio URL, key) to read task files from: :func:`molal.service.lstrust.access_for`."""
    a = access_for(settings, state)
    return a.url, a.key


def resolve_texts(settings, state: ProjectState | None, texts: list[str | None],
                  errors: dict[int, str]) -> list[str | None]:
    """``texts`` with Label Studio-hosted files replaced by their content; a failed one becomes None and its
    reason goes to ``errors`` (position -> reason). Values that are no LS file cost nothing. ``settings``:
    :class:`molal.config.Settings` (the Label Studio URL and key, the file size and time limits)."""
    if not any(isinstance(t, str) and ("/data/" in t) for t in texts):
        return texts
    a = access_for(settings, state)
    ls_url, key = a.url, a.key
    max_bytes = getattr(settings, "task_file_max_bytes", DEFAULT_MAX_BYTES)
    timeout_s = getattr(settings, "task_file_timeout_s", DEFAULT_TIMEOUT_S)
    out: list[str | None] = []
    for i, t in enumerate(texts):
        if t is None:
            out.append(None)
            continue
        try:
            out.append(resolve_text(t, ls_url, key, max_bytes=max_bytes, timeout_s=timeout_s))
        except FetchError as exc:
            out.append(None)
            errors[i] = _reason(exc, a.from_setup, ls_url, state)
    return out


def _reason(exc: FetchError, from_setup: bool, ls_url: str | None, state: ProjectState | None) -> str:
    """What a caller reads about a failed task file: the reason, or (for a /setup-named Label Studio) one
    fixed sentence with an error id, the reason and the address going to the log under that id."""
    if not from_setup:
        return str(exc)
    return logged_failure(log, FILE_FAILED, f"project {getattr(state, 'id', '?')}: reading a task file from the "
                                            f"Label Studio at {ls_url} (from /setup): {exc}")


def task_text_resolver(settings, state: ProjectState | None):
    """A ``value -> text | None`` function for the training pull: failures are logged (path and reason, no
    token) and the task is skipped like one without text."""
    a = access_for(settings, state)
    ls_url, key = a.url, a.key
    max_bytes = getattr(settings, "task_file_max_bytes", DEFAULT_MAX_BYTES)
    timeout_s = getattr(settings, "task_file_timeout_s", DEFAULT_TIMEOUT_S)

    def resolve(value: str) -> str | None:
        try:
            return resolve_text(value, ls_url, key, max_bytes=max_bytes, timeout_s=timeout_s)
        except FetchError as exc:
            where = f" (Label Studio at {ls_url}, from /setup)" if a.from_setup else ""
            log.warning("project %s: task skipped: %s%s", getattr(state, "id", "?"), exc, where)
            return None

    return resolve


__all__ = ["CACHE", "FILE_FAILED", "FetchError", "fetch", "ls_file_url", "ls_source", "resolve_text", "resolve_texts", "task_text_resolver"]
