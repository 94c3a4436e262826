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

Responses go the same way in reverse. A request thread writes its response into memory (:class:`_Output`),
never to the socket; the event loop then sends it without blocking, as fast as the client reads. So a client
that does not read its response holds only its own connection and the bytes of that response: never a thread.
A response not read within ``MOLAL_RESPONSE_TIMEOUT_S`` is dropped (the connection closed), and so is the
oldest unread one when the responses waiting for their readers hold more than a cap of bytes.

Requests go to one of three lanes, so cheap calls never queue behind expensive ones: ``GET /health`` (and
``/``) is answered in the event loop itself (a millisecond of work: Label Studio gives it 1 s); a ``POST
/predict`` of over 256 KiB (a batch: *Retrieve Predictions*), whose cost grows with its input, gets the
``threads`` threads; every other request (a /predict of a task or a few, as when a person opens a task;
``/setup``, webhooks, the small GETs) gets a pool of its own. With 64 clients that each post a 10,000-task /predict
and never read the 18 MB answer, /health still answers at once (tests/test_security_network.py,
bench/load.py --scenario slow-read).

HTTP/1.1 framing rules enforced here, before a thread sees the request (RFC 9112 section 3.2): a request
without ``Host``, with several, or with a malformed one (a bare IPv6 address such as ``::1`` must be
written ``[::1]``) gets 400; ``Expect: 100-continue`` is answered once, by the loop, while the body is
still to come.

TLS (``certfile``) skips the buffering: terminate TLS in a proxy (README, "Deploying safely").
"""

from __future__ import annotations

import errno
import gc
import json
import selectors
import sys
import time
from concurrent import futures
from functools import partial

import h11
from gunicorn import util
from gunicorn.workers.gthread import TConn, ThreadWorker

from backend.hosts import host_header_error

_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 503: "Service Unavailable"}
#: the lanes (module docstring): answered in the loop / the ``threads`` pool / a pool of their own
INLINE, HEAVY, LIGHT = "inline", "heavy", "light"
_INLINE_PATHS = frozenset({b"/health", b"/"})
_HEAVY_PATHS = frozenset({b"/predict"})
#: a /predict body up to this size (a task or a few, as when a person opens a task) is a light request
_SMALL_BODY = 256 * 1024
_SEND_CHUNK = 1 << 20


class _Conn(TConn):
    """A connection that closes without lingering: gthread closes connections on its event-loop thread,
    and its graceful close waits up to 2 s for the client to close too — a client that never does stalled
    the whole loop (accepts, dispatch) for 2 s per request. Requests are read whole before they are served,
    so no unread request bytes are left to make a plain close reset the connection early."""

    def close(self, graceful: bool = False) -> None:
        util.close(self.sock)


class _Output:
    """The socket a request thread sees while it serves a request: what it sends is kept in memory, for the
    event loop to write. Everything gunicorn's response and error paths call on a socket is here."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def sendall(self, data) -> None:
        if data:
            b = data if isinstance(data, bytes) else bytes(data)
            self.chunks.append(b)
            self.size += len(b)

    def send(self, data) -> int:
        self.sendall(data)
        return len(data)

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        file.seek(offset)
        data = file.read() if count is None else file.read(count)
        self.sendall(data)
        return len(data)

    def recv(self, _n: int) -> bytes:  # util.close_graceful drains the peer: nothing to drain from memory
        return b""

    def setblocking(self, _flag: bool) -> None:
        pass

    def settimeout(self, _t) -> None:
        pass

    def shutdown(self, _how: int) -> None:  # the loop closes the connection once this response is written
        pass

    def close(self) -> None:
        pass


class _MemorySocket:
    """The socket gunicorn's request parser reads from: the bytes the loop read, served from memory. Handed
    over with ``unread`` instead, a whole body sat in gunicorn's read buffer, which copies everything it still
    holds on each read: a 32 MB body read 64 KiB at a time took 10-20 s. Here each read is a slice."""

    __slots__ = ("data", "pos")

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0

    def feed(self, data: bytes | bytearray) -> None:
        if self.pos:
            del self.data[:self.pos]
            self.pos = 0
        self.data += data

    def recv(self, n: int) -> bytes:
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += len(out)
        return out

    def take(self) -> bytes:
        """What the parser has not read (a pipelined request), removed from here."""
        out = bytes(self.data[self.pos:])
        self.data = bytearray()
        self.pos = 0
        return out

    def pending(self) -> bool:
        return self.pos < len(self.data)

    def setblocking(self, _flag: bool) -> None:
        pass

    def settimeout(self, _t) -> None:
        pass


class _Reading:
    """A connection whose request is being read: the bytes so far, its h11 framing state, its deadline."""

    __slots__ = ("conn", "buf", "h11", "deadline", "body", "lane", "continued")

    def __init__(self, conn, deadline: float, first: bytes) -> None:
        self.conn = conn
        self.buf = bytearray(first)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.deadline = deadline
        self.body = 0
        self.lane = LIGHT
        self.continued = False


class _Writing:
    """A connection whose response the loop is sending: what is left of it, its deadline, keep-alive."""

    __slots__ = ("conn", "chunks", "offset", "left", "deadline", "keep")

    def __init__(self, conn, out: _Output, deadline: float, keep: bool) -> None:
        self.conn = conn
        self.chunks = out.chunks
        self.offset = 0  # into chunks[0]
        self.left = out.size
        self.deadline = deadline
        self.keep = keep


class BufferingThreadWorker(ThreadWorker):
    """``gthread`` whose threads only ever get complete requests and never write to a socket (see the
    module docstring)."""

    def init_process(self):
        from molal.config import get_settings

        s = get_settings()
        self.max_body = int(s.max_body_bytes)
        self.read_timeout = float(s.request_timeout_s)
        self.write_timeout = float(s.response_timeout_s)
        # headers are capped by h11 (64 KiB), bodies by max_body; all reads together by this, and all
        # responses waiting for their readers by the same amount:
        self.max_held = max(4 * self.max_body, 256 * 1024 * 1024)
        self.max_reading = max(16, self.cfg.worker_connections - self.cfg.threads)
        self.reading: dict[int, _Reading] = {}  # insertion order = oldest first
        self.writing: dict[int, _Writing] = {}  # the same
        self.held = 0
        self.out_held = 0
        # A thread that waits for the GIL asks its holder to let go after this long (CPython's default: 5 ms).
        # The event loop waits for it several times for each request it frames and each answer it sends;
        # behind threads building big answers, 5 ms a wait made /health take 100 ms and more. 1 ms costs the
        # busy threads about a thousand switches a second.
        sys.setswitchinterval(0.001)
        self.light_pool = futures.ThreadPoolExecutor(max_workers=max(2, self.cfg.threads),
                                                     thread_name_prefix="molal-light")
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
                elif self.writing:
                    self._drop(next(iter(self.writing.values())), "the server is out of connections")
                return
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(_Conn(self.cfg, sock, addr, listener.getsockname()))

    def enqueue_req(self, conn):
        if self.cfg.is_ssl:
            return super().enqueue_req(conn)
        lane = getattr(conn, "molal_lane", None)
        if lane is not None:  # a complete request, in memory: serve it in its lane
            conn.molal_lane = None
            if lane == INLINE:
                self._served(conn, self._serve(conn))
                return None
            pool = self.tpool if lane == HEAVY else self.light_pool
            fs = pool.submit(self._serve, conn)
            fs.add_done_callback(lambda f: self.method_queue.defer(self._served_future, conn, f))
            return None
        # a new connection, a kept-alive one that became readable, or bytes of a pipelined request the
        # parser already holds: read the next request whole before any thread sees it
        first = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        mem = getattr(conn, "molal_mem", None)
        if mem is not None:
            first += mem.take()
        conn.sock.setblocking(False)
        r = _Reading(conn, time.monotonic() + self.read_timeout, first)
        if len(self.reading) >= self.max_reading:  # make room: the oldest read in progress goes
            self._close(next(iter(self.reading.values())), 503, "too many connections are sending requests")
        self.reading[id(conn)] = r
        self.held += len(first)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, r))
        if first:
            self._advance(r, first)
        return None

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
                    # the client waits for a go-ahead before its body: give it once (gunicorn's own is
                    # suppressed, see handle_request)
                    if r.h11.they_are_waiting_for_100_continue and not r.continued:
                        r.continued = True
                        self._send(r, b"HTTP/1.1 100 Continue\r\n\r\n")
                    return
                if isinstance(ev, h11.Request):
                    why = host_header_error([v for k, v in ev.headers.raw_items() if k.lower() == b"host"],
                                            http11=ev.http_version == b"1.1")
                    if why:
                        self._close(r, 400, why)
                        return
                    n = dict(ev.headers).get(b"content-length")
                    if n is not None and int(n) > self.max_body:
                        self._close(r, 413, f"the request body is {int(n)} bytes; this backend accepts at most "
                                            f"{self.max_body} (MOLAL_MAX_BODY_BYTES)")
                        return
                    path = ev.target.split(b"?", 1)[0]
                    big = n is None or int(n) > _SMALL_BODY  # (chunked bodies count as big)
                    r.lane = (INLINE if ev.method in (b"GET", b"HEAD") and path in _INLINE_PATHS
                              else HEAVY if path in _HEAVY_PATHS and big else LIGHT)
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
        except h11.RemoteProtocolError as e:  # h11 checks the Host rules of HTTP/1.1 first: say which
            self._close(r, 400, "an HTTP/1.1 request must carry exactly one Host header"
                        if "Host" in str(e) else "malformed HTTP request")
        except ValueError:
            self._close(r, 400, "malformed HTTP request")

    def _ready(self, r: _Reading) -> None:
        conn = r.conn
        self._forget(r)
        conn.sock.setblocking(True)
        if conn.parser is None:  # the HTTP/1 parser, reading from memory: it never touches the socket
            real, conn.molal_mem = conn.sock, _MemorySocket()
            conn.sock = conn.molal_mem
            try:
                conn.init()
            finally:
                conn.sock = real
        conn.molal_mem.feed(r.buf)
        conn.data_ready = True
        conn.molal_lane = r.lane
        self.enqueue_req(conn)

    # -- serving: a thread (or the loop, for /health) writes into memory -----------------------------------
    def _serve(self, conn) -> tuple[bool, _Output]:
        """gthread's ``handle`` with the response kept in memory: (keep the connection alive, the response)."""
        real, out = conn.sock, _Output()
        conn.sock = out
        try:
            keep = self.handle(conn)
        finally:
            conn.sock = real
        return bool(keep), out

    def handle_request(self, req, conn):
        # the whole body is here already: the loop said "100 Continue" if the client waited for it
        req._expected_100_continue = False
        return super().handle_request(req, conn)

    def _served_future(self, conn, fs) -> None:
        try:
            keep, out = fs.result()
        except Exception:  # handle() catches everything; a failure here is the pool's own (shutdown)
            self.nr_conns -= 1
            conn.close()
            return
        self._served(conn, (keep, out))

    def _served(self, conn, result: tuple[bool, _Output]) -> None:
        """On the loop: send the response without blocking; what the socket does not take now waits for it."""
        keep, out = result
        if not out.size:
            self._written(conn, keep)
            return
        w = _Writing(conn, out, time.monotonic() + self.write_timeout, keep)
        conn.sock.setblocking(False)
        if self._flush(w):
            return
        self.writing[id(conn)] = w
        self.out_held += w.left
        while self.out_held > self.max_held and len(self.writing) > 1:  # the oldest unread response goes
            self._drop(next(iter(self.writing.values())),
                       f"responses not read by their clients hold over {self.max_held} bytes")
        if id(conn) in self.writing:
            self.poller.register(conn.sock, selectors.EVENT_WRITE, partial(self._writable, w))

    def _flush(self, w: _Writing) -> bool:
        """Send what the socket takes now; True once the response is gone (written, or the connection closed)."""
        sock = w.conn.sock
        while w.chunks:
            chunk = w.chunks[0]
            try:
                n = sock.send(memoryview(chunk)[w.offset:w.offset + _SEND_CHUNK])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:  # the client is gone
                self._end_write(w)
                self.nr_conns -= 1
                w.conn.close()
                return True
            w.offset += n
            w.left -= n
            if id(w.conn) in self.writing:
                self.out_held -= n
            if w.offset >= len(chunk):
                w.chunks.pop(0)
                w.offset = 0
        self._end_write(w)
        self._written(w.conn, w.keep)
        return True

    def _writable(self, w: _Writing, _sock) -> None:
        self._flush(w)

    def _end_write(self, w: _Writing) -> None:
        if self.writing.pop(id(w.conn), None) is not None:
            self.out_held -= w.left
            try:
                self.poller.unregister(w.conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _written(self, conn, keep: bool) -> None:
        """The response is out: keep the connection alive (or serve its pipelined request) or close it, as
        gthread does after a thread returns."""
        mem = getattr(conn, "molal_mem", None)
        if keep and self.alive and mem is not None and mem.pending():  # a pipelined request is here already
            self.enqueue_req(conn)
            return
        fs = futures.Future()
        fs.set_result(keep)
        self.finish_request(conn, fs)

    def _drop(self, w: _Writing, why: str) -> None:
        self.log.info("molal: closed a connection whose client did not read its response (%d bytes left): %s",
                      w.left, why)
        self._end_write(w)
        self.nr_conns -= 1
        w.conn.close()

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
        """Also end the reads past their deadline (408), every read once the worker is stopping, and the
        responses not read by their deadline."""
        super().murder_pending()
        now = time.monotonic()
        for r in list(self.reading.values()):
            if not self.alive:
                self._close(r, 503, "the server is restarting; retry")
            elif r.deadline <= now:
                self._close(r, 408, f"the request was not received within {self.read_timeout:g} s "
                                    "(MOLAL_REQUEST_TIMEOUT_S)")
        for w in list(self.writing.values()):
            if w.deadline <= now:
                self._drop(w, f"not read within {self.write_timeout:g} s (MOLAL_RESPONSE_TIMEOUT_S)")

    def run(self):
        # The app is loaded (its modules imported, ~300k objects): out of the garbage collector's sight from
        # now on, and young collections 14x rarer than CPython's default 700 allocations. Building one
        # 10,000-task /predict answer set off ~450 collections, two of them full ones of ~1 s each with the
        # GIL held (no other thread, nor the event loop, ran); now ~30, none over 0.1 s.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        try:
            super().run()
        finally:
            self.light_pool.shutdown(wait=False)

    def handle_quit(self, sig, frame):
        self.light_pool.shutdown(wait=False)
        super().handle_quit(sig, frame)
