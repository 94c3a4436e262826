"""A fault-injecting OpenAI-compatible server (run as a real process): ``python tests/fault_llm_server.py PORT LOG
[--kill-after N]``.

``POST /v1/chat/completions`` answers one token with ``top_logprobs``: the class is a deterministic function
of the text (sha256 of the user message), so answers are reproducible across restarts. Every request is
appended to LOG (one JSON line: the text and what was answered) before the answer is sent.

Faults, chosen by markers in the text:
  ``[429]``      HTTP 429 with ``Retry-After: 0.1`` on the first 2 requests for that text, then normal
  ``[500]``      HTTP 500 on the first 2 requests for that text, then normal
  ``[badjson]``  HTTP 200 with a body that is not JSON, always
  ``[nologprobs]`` HTTP 200, valid JSON without logprobs, always
  ``[slow]``     sleeps 30 s before answering (longer than any client timeout in the tests), always
``--kill-after N``: the N-th request makes the server SIGKILL itself before answering (a real crash in the
middle of an annotation run).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from molal.datasets import CLASS_NAMES

CLASSES = list(CLASS_NAMES["trec"])


def main() -> None:
    port, log_path = int(sys.argv[1]), sys.argv[2]
    kill_after = int(sys.argv[sys.argv.index("--kill-after") + 1]) if "--kill-after" in sys.argv else 0
    seen: Counter = Counter()
    lock = threading.Lock()
    total = [0]
    log = open(log_path, "a", buffering=1)  # noqa: SIM115

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def send(self, status: int, body: bytes, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            text = next((m["content"] for m in reversed(body.get("messages", [])) if m["role"] == "user"), "")
            with lock:
                total[0] += 1
                n = total[0]
                seen[text] += 1
                k = seen[text]
            if kill_after and n >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if "[429]" in text and k <= 2:
                what, status, out, hdr = "429", 429, b'{"error": "rate limited"}', {"Retry-After": "0.1"}
            elif "[500]" in text and k <= 2:
                what, status, out, hdr = "500", 500, b'{"error": "boom"}', {}
            elif "[badjson]" in text:
                what, status, out, hdr = "badjson", 200, b'{"choices": [ {"logprobs": ', {}
            elif "[nologprobs]" in text:
                what, status, out, hdr = "nologprobs", 200, json.dumps({"choices": [{"message": {"content": "x"}}]}).encode(), {}
            else:
                h = hashlib.sha256(text.encode()).digest()
                c = CLASSES[h[0] % len(CLASSES)]
                other = CLASSES[(h[0] + 1) % len(CLASSES)]
                top = [{"token": c, "logprob": -0.1}, {"token": other, "logprob": -2.5}, {"token": "zzz", "logprob": -4.0}]
                resp = {"choices": [{"index": 0, "message": {"role": "assistant", "content": c},
                                     "logprobs": {"content": [{"token": c, "logprob": -0.1, "top_logprobs": top}]}}],
                        "usage": {"total_tokens": 10}}
                what, status, out, hdr = "ok", 200, json.dumps(resp).encode(), {}
            if "[slow]" in text:
                what = "slow"
            log.write(json.dumps({"n": n, "text": text, "answer": what}) + "\n")  # logged on arrival
            if what == "slow":
                time.sleep(30)
            self.send(status, out, hdr)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
