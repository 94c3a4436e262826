"""A real llama.cpp server (llama-cpp-python's ``python -m llama_cpp.server``) on 127.0.0.1, for tests and
benchmarks: started on a free port, waited for, stopped. Needs ``pip install 'llama-cpp-python[server]'``."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port


class LlamaCppServer:
    """``with LlamaCppServer(gguf, alias="smollm2-135m") as srv: srv.base_url`` -> ``http://127.0.0.1:P/v1``."""

    def __init__(self, gguf: str | Path, alias: str, threads: int = 2, n_ctx: int = 2048, timeout_s: float = 90.0) -> None:
        self.gguf, self.alias, self.threads, self.n_ctx, self.timeout_s = Path(gguf), alias, threads, n_ctx, timeout_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="llamacpp-", suffix=".log")[1])

    def start(self) -> LlamaCppServer:
        import httpx

        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.alias,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", str(self.threads),
               "--n_ctx", str(self.n_ctx), "--verbose", "false"]
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
        end = time.monotonic() + self.timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama.cpp server not up after {self.timeout_s} s: {self.log.read_text()[-2000:]}")

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):  # the peak resident set
                    return round(int(line.split()[1]) / 1024, 1)
        except (OSError, AttributeError):
            return None
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
