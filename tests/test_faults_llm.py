"""LLM-server faults injected for real: a separate OpenAI-compatible server process (tests/fault_llm_server.py)
that SIGKILLs itself mid-annotation, answers slowly, returns malformed JSON or 429/500, driven through the
real molal annotate job (Service → Mixture → OpenAIAnnotator over HTTP → SQLite cache).

Expected: retries with backoff and a bounded total time; what was annotated stays in the cache; the next
run resumes without recomputing anything; the job reports which texts failed and why."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from molal.config import get_settings
from tests.conftest import TREC_CLASSES, free_port

REPO = Path(__file__).resolve().parent.parent
TREC = TREC_CLASSES



class Server:
    def __init__(self, port: int, log: Path, kill_after: int = 0) -> None:
        args = [sys.executable, str(REPO / "tests" / "fault_llm_server.py"), str(port), str(log)]
        if kill_after:
            args += ["--kill-after", str(kill_after)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def requests_log(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def service(tmp_path: Path, port: int, **annot):
    from molal.service.pipeline import Service

    opts = {"concurrency": 2, "batch_size": 8, "timeout": 2.0, "max_retries": 3, "backoff": 0.05, "max_total_s": 6.0,
            **annot}
    lines = ['[[annotator]]', 'type = "openai"', 'name = "faulty"', f'base_url = "http://127.0.0.1:{port}/v1"',
             'model = "m"', 'api = "chat"'] + [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
    cfg = tmp_path / "mixture.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return Service(get_settings(model_dir=tmp_path / "state", mixture=cfg))


def run_annotate_job(svc, texts: list[str]) -> tuple[dict, float]:
    from molal.service.jobs import execute

    job, _ = svc.submit(7, "annotate", {"texts": texts, "classes": TREC}, source="test")
    t0 = time.monotonic()
    row = execute(svc.jobs, svc.jobs.claim(job["id"]), svc.run_job)
    return row, time.monotonic() - t0


def sent_texts(log: Path, texts: list[str], since: int = 0) -> list[str]:
    """Which of ``texts`` the server was asked about (per request, in order) from request number ``since``."""
    out = []
    for r in requests_log(log)[since:]:
        hit = [t for t in texts if t in r["text"]]
        assert len(hit) == 1, r
        out.append(hit[0])
    return out


TEXTS = [f"Question number {i}: what is item {i * 7} called ?" for i in range(48)]


def test_server_killed_mid_annotation_then_resume_without_recomputing(tmp_path):
    port, log = free_port(), tmp_path / "requests.jsonl"
    srv = Server(port, log, kill_after=20)
    try:
        svc = service(tmp_path, port)
        row, elapsed = run_annotate_job(svc, TEXTS)
    finally:
        srv.stop()
    assert srv.proc.returncode == -9  # the server really died by SIGKILL
    res = row["result"]
    assert row["status"] == "succeeded", row
    answered = [r for r in requests_log(log) if r["answer"] == "ok"]
    assert 10 <= len(answered) <= 19
    # the server logs an answer just before sending it: with 2 requests in flight, at most 2 answers can be
    # lost with the SIGKILL; every row marked done was really answered
    assert len(answered) - 2 <= res["done"] <= len(answered)
    assert res["failed"] == len(TEXTS) - res["done"]
    # which texts failed, and why, is in the job record
    failed = {f["text"]: f["reason"] for f in res["failed_texts"]}
    assert len(failed) == res["failed"]
    assert all("cannot reach" in why for why in failed.values()), failed
    answered_texts = {t for t in TEXTS if any(t in r["text"] for r in answered)}
    assert set(TEXTS) - set(failed) <= answered_texts
    # retries with backoff, bounded: max_total_s per request, the annotator is marked dead after that
    assert elapsed < 45, elapsed  # generous for a loaded CI machine; unbounded retries would not end
    cached = svc.cache.count()
    assert cached == res["done"]

    # the server comes back (same address): the next run asks only for what failed
    n_before = len(requests_log(log))
    srv = Server(port, log)
    try:
        svc2 = service(tmp_path, port)
        row2, _ = run_annotate_job(svc2, TEXTS)
    finally:
        srv.stop()
    assert row2["status"] == "succeeded" and row2["result"]["done"] == len(TEXTS) and row2["result"]["failed"] == 0
    again = sent_texts(log, TEXTS, since=n_before)
    assert sorted(again) == sorted(failed), "cached texts were recomputed (or failed ones skipped)"
    assert svc2.cache.count() == len(TEXTS)


def test_slow_429_500_and_malformed_answers(tmp_path):
    port, log = free_port(), tmp_path / "requests.jsonl"
    texts = ([f"plain text {i}" for i in range(6)] + ["rate limited [429] a", "rate limited [429] b",
             "flaky [500] c", "malformed [badjson] d", "no scores [nologprobs] e", "very slow [slow] f"])
    srv = Server(port, log)
    try:
        svc = service(tmp_path, port, concurrency=4, batch_size=16, timeout=1.0, max_retries=2, max_total_s=4.0)
        row, elapsed = run_annotate_job(svc, texts)
        reqs = requests_log(log)
    finally:
        srv.stop()
    res = row["result"]
    assert row["status"] == "succeeded", row
    failed = {f["text"]: f["reason"] for f in res["failed_texts"]}
    # 429 (Retry-After) and 500 were retried and then answered; their rows are done
    for t in ("rate limited [429] a", "rate limited [429] b", "flaky [500] c"):
        asked = [r["answer"] for r in reqs if t in r["text"]]
        assert asked[-1] == "ok" and len(asked) == 3, (t, asked)
        assert t not in failed
    # malformed JSON / no logprobs / too slow: only those rows fail, each with its reason
    assert set(failed) == {"malformed [badjson] d", "no scores [nologprobs] e", "very slow [slow] f"}, failed
    assert "invalid JSON" in failed["malformed [badjson] d"]
    assert "logprobs" in failed["no scores [nologprobs] e"]
    assert "Timeout" in failed["very slow [slow] f"] or "cannot reach" in failed["very slow [slow] f"]
    assert res["done"] == len(texts) - 3
    assert elapsed < 60, elapsed  # timeout 1 s x (1 + 2 retries) + backoff, not 3 x the server's 30 s
    assert svc.cache.count() == len(texts) - 3  # every good answer is cached, failures never
    # a second run asks only for the failed rows again
    srv = Server(port, log)
    try:
        n_before = len(requests_log(log))
        row2, _ = run_annotate_job(service(tmp_path, port, concurrency=4, batch_size=16, timeout=1.0, max_retries=0,
                                           max_total_s=2.0), texts)
    finally:
        srv.stop()
    asked = {r["text"] for r in requests_log(log)[n_before:]}
    assert {t for t in texts if any(t in a for a in asked)} == set(failed)
    assert row2["result"]["done"] == len(texts) - 3


@pytest.mark.parametrize("n", [1])
def test_unreachable_server_fails_every_text_quickly_with_reason(tmp_path, n):
    port = free_port()  # nothing listens
    svc = service(tmp_path, port, max_retries=2, max_total_s=3.0)
    row, elapsed = run_annotate_job(svc, TEXTS[:10])
    res = row["result"]
    assert res["done"] == 0 and res["failed"] == 10
    assert all("cannot reach" in f["reason"] for f in res["failed_texts"])
    assert elapsed < 30 and svc.cache.count() == 0
