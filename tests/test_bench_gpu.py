"""bench/annotate_gpu.py (issue 14) runs on a CPU with a tiny model in seconds: CI keeps the GPU benchmark
runnable for the sessions that have a GPU (where it runs the Llama-3.1-8B shape)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_bench_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "annotate_gpu.py"), "--device", "cpu", "--shape", "tiny",
                        "--n", "8", "--naive-n", "4", "--batch-sizes", "4", "--json-out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["matmul_tflops"] > 0 and doc["meta"]["params"]["body"] > 0 and doc["meta"]["naive"]["n"] == 4
    modes = {(x["mode"], x["batch"]) for x in doc["results"]}
    assert modes == {("first_token", 4), ("full", 4)}
    for x in doc["results"]:
        assert x["texts_per_s"] > 0 and x["prompt_tokens"] > 8 * 20 and 0 < x["roofline_share"]
        assert (x["label_tokens"] > 0) == (x["mode"] == "full") and x["naive_ratio"] > 0
    assert "| first_token | 4 |" in r.stdout
