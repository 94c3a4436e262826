"""gunicorn's threaded worker, with each request read whole in the event loop before a thread sees it.

gunicorn's ``gthread`` worker hands a connection to one of its few threads as soon as the first bytes
arrive; the thread then blocks reading the rest. Eight clients that trickle a request body (a byte a second)
held all 2 x 4 threads of the backend, and ``/health`` and ``/predict`` timed out until they closed.
gunicorn's own advice is a buffering proxy in front (nginx). :class:`BufferingThreadWorker` does that
buffering itself, in the worker's event loop: a connection's bytes are read without blocking and framed by
``h11`` (the HTTP/1.1 parser httpx uses) until the request — headers and whole body — is in memory; only
then does a thread parse and serve it, from memory. So a thread is never held by a slow or silent client.

Bounds (each answered, then the connection closed): a request not complete within ``MOLAL_REQUEST_TIMEOUT_S``
(408), a body over ``MOLAL_MAX_BODY_BYTES`` (413, from its Content-Length before reading it), malformed
framing (400). When more than ``worker_connections`` connections are being read, the oldest is dropped to
make room for the newest, and the bytes held across all of them are capped (503 for the one over), so a
flood of slow connections costs memory and file descriptors within fixed limits and cannot stop new clients.
TLS (``certfile``) skips the buffering: terminate TLS in a proxy (README, "Deploying safely").
"""

from __future__ import annotations

import errno
import json
import selectors
import time
from functools import partial

import h11
from gunicorn import util
from gunicorn.workers.gthread import TConn, ThreadWorker

_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 503: "Service Unavailable"}


class _Conn(TConn):
    """A connection that closes without lingering: gthread closes connections on its event-loop thread,
    and its graceful close waits up to 2 s for the client to close too — a client that never does stalled
    the whole loop (accepts, dispatch) for 2 s per request. Requests are read whole before they are served,
    so no unread request bytes are left to make a plain close reset the connection early."""

    def close(self, graceful: bool = False) -> None:
        util.close(self.sock)


class _Reading:
    """A connection whose request is being read: the bytes so far, its h11 framing state, its deadline."""

    __slots__ = ("conn", "buf", "h11", "deadline", "body")

    def __init__(self, conn, deadline: float, first: bytes) -> None:
        self.conn = conn
        self.buf = bytearray(first)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.deadline = deadline
        self.body = 0


class BufferingThreadWorker(ThreadWorker):
    """``gthread`` whose threads only ever get complete requests (see the module docstring)."""

    def init_process(self):
        from molal.config import get_settings

        s = get_settings()
        self.max_body = int(s.max_body_bytes)
        self.read_timeout = float(s.request_timeout_s)
        # headers are capped by h11 (64 KiB), bodies by max_body; all reads together by this:
        self.max_held = max(4 * self.max_body, 256 * 1024 * 1024)
        self.max_reading = max(16, self.cfg.worker_connections - self.cfg.threads)
        self.reading: dict[int, _Reading] = {}  # insertion order = oldest first
        self.held = 0
        super().init_process()

    # -- every request passes through here ----------------------------------------------------------------
    def accept(self, listener):
        """gthread's accept, with a connection class that closes without lingering."""
        try:
            sock, addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):  # out of file descriptors: free one, never crash
                if self.reading:
                    self._close(next(iter(self.reading.values())), 503, "the server is out of connections; retry")
                return
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(_Conn(self.cfg, sock, addr, listener.getsockname()))

    def enqueue_req(self, conn):
        if getattr(conn, "molal_ready", False) or self.cfg.is_ssl:
            conn.molal_ready = False
            return super().enqueue_req(conn)
        # a new connection, a kept-alive one that became readable, or bytes of a pipelined request the
        # parser already holds: read the next request whole before any thread sees it
        first = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        conn.sock.setblocking(False)
        r = _Reading(conn, time.monotonic() + self.read_timeout, first)
        if len(self.reading) >= self.max_reading:  # make room: the oldest read in progress goes
            self._close(next(iter(self.reading.values())), 503, "too many connections are sending requests")
        self.reading[id(conn)] = r
        self.held += len(first)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, r))
        if first:
            self._advance(r, first)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection sent something: read that request whole (gthread handed it to a thread)."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.enqueue_req(conn)

    def _readable(self, r: _Reading, _sock) -> None:
        try:
            data = r.conn.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(r)
            return
        if not data:  # the client went away before finishing its request
            self._close(r)
            return
        r.buf += data
        self.held += len(data)
        if self.held > self.max_held:
            self._close(r, 503, "the server holds too many unfinished requests; retry")
            return
        self._advance(r, data)

    def _advance(self, r: _Reading, data: bytes) -> None:
        """Feed ``data`` to the framing; hand the request to a thread once it is complete."""
        try:
            r.h11.receive_data(data)
            while True:
                ev = r.h11.next_event()
                if ev is h11.NEED_DATA:
                    return
                if isinstance(ev, h11.Request):
                    n = dict(ev.headers).get(b"content-length")
                    if n is not None and int(n) > self.max_body:
                        self._close(r, 413, f"the request body is {int(n)} bytes; this backend accepts at most "
                                            f"{self.max_body} (MOLAL_MAX_BODY_BYTES)")
                        return
                    if r.h11.they_are_waiting_for_100_continue:
                        self._send(r, b"HTTP/1.1 100 Continue\r\n\r\n")
                elif isinstance(ev, h11.Data):
                    r.body += len(ev.data)
                    if r.body > self.max_body:
                        self._close(r, 413, f"the request body is over {self.max_body} bytes (MOLAL_MAX_BODY_BYTES)")
                        return
                elif isinstance(ev, h11.EndOfMessage):
                    self._ready(r)
                    return
                else:  # ConnectionClosed / PAUSED: nothing more to frame
                    self._close(r)
                    return
        except (h11.RemoteProtocolError, ValueError):
            self._close(r, 400, "malformed HTTP request")

    def _ready(self, r: _Reading) -> None:
        conn = r.conn
        self._forget(r)
        conn.sock.setblocking(True)
        conn.init()  # the HTTP/1 parser (no I/O without TLS or h2c prior knowledge)
        conn.parser.unreader.unread(bytes(r.buf))
        conn.data_ready = True
        conn.molal_ready = True
        self.enqueue_req(conn)

    # -- ending reads ---------------------------------------------------------------------------------------
    def _forget(self, r: _Reading) -> None:
        if self.reading.pop(id(r.conn), None) is not None:
            self.held -= len(r.buf)
            try:
                self.poller.unregister(r.conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    @staticmethod
    def _send(r: _Reading, data: bytes) -> None:
        try:
            r.conn.sock.send(data)  # non-blocking, best effort: a few hundred bytes into an empty buffer
        except OSError:
            pass

    def _close(self, r: _Reading, status: int | None = None, message: str = "") -> None:
        self._forget(r)
        if status is not None:
            body = json.dumps({"error": message}).encode()
            head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            self._send(r, head + body)
        self.nr_conns -= 1
        r.conn.close()

    def murder_pending(self):
        """Also end the reads past their deadline (408), and every read once the worker is stopping."""
        super().murder_pending()
        now = time.monotonic()
        for r in list(self.reading.values()):
            if not self.alive:
                self._close(r, 503, "the server is restarting; retry")
            elif r.deadline <= now:
                self._close(r, 408, f"the request was not received within {self.read_timeout:g} s "
                                    "(MOLAL_REQUEST_TIMEOUT_S)")
