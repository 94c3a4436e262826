"""Shared fixtures: paths to the real shared data, tiny local models built on the fly."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from molal.datasets import CLASS_NAMES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def _shared_data() -> Path:
    env = os.environ.get("MOLAL_SHARED_DATA")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data()
TREC_CLASSES = list(CLASS_NAMES["trec"])
TREC_LLMS = ["gemma", "llama", "mistral", "qwen", "yi"]
#: a Label Studio text-classification config over the TREC classes (single choice)
TREC_CONFIG = (
    '<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single">'
    + "".join(f'<Choice value="{c}"/>' for c in TREC_CLASSES)
    + "</Choices></View>"
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture()
def redis_url(tmp_path):
    """A real redis-server on a free loopback port (no persistence), stopped after the test."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server); .ci/run installs it")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from redis import Redis

    url = f"redis://127.0.0.1:{port}/0"
    t0 = time.monotonic()
    while True:
        try:
            if Redis.from_url(url).ping():
                break
        except Exception:
            if time.monotonic() - t0 > 10:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL cluster for the session (tests/pg.py); skipped where PostgreSQL is missing unless
    MOLAL_REQUIRE_POSTGRES=1."""
    from tests.pg import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()


class StateDB:
    """Where a test's state databases live: SQLite files under ``tmp_path`` or one fresh PostgreSQL database."""

    def __init__(self, dialect: str, tmp_path: Path, url: str | None = None) -> None:
        self.dialect, self.tmp_path, self.url = dialect, tmp_path, url

    def target(self, name: str) -> str | Path:
        """The ``JobQueue`` / ``AnnotationCache`` argument for a database called ``name``."""
        return self.url if self.url is not None else self.tmp_path / f"{name}.db"

    def __repr__(self) -> str:
        return self.dialect


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def state_db(request, tmp_path) -> StateDB:
    """Run a state test on SQLite and on a real PostgreSQL (the same code path behind molal.db)."""
    if request.param == "sqlite":
        return StateDB("sqlite", tmp_path)
    server = request.getfixturevalue("postgres_server")
    return StateDB("postgresql", tmp_path, server.new_database())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "trec").exists():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set MOLAL_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trec_recorded_paths(shared_data: Path) -> list[Path]:
    return [shared_data / "llm-outputs" / "trec" / f"{m}.jsonl" for m in TREC_LLMS]


@pytest.fixture(scope="session")
def trec_outputs(trec_recorded_paths):
    from molal import LLMOutputs

    return LLMOutputs.from_recorded_jsonl(trec_recorded_paths, TREC_CLASSES)


@pytest.fixture(scope="session")
def trec_gold(shared_data: Path):
    from molal import load_dataset

    return load_dataset(shared_data / "llm-outputs" / "trec" / "yi.jsonl", class_names=TREC_CLASSES).labels
