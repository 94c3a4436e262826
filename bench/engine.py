"""The annotation engine on Ray Data against the plain in-process path, on the same texts and mixture.

    .venv/bin/python bench/engine.py [--n 4000] [--workers 1,2] [--mixture embedding|smollm2] [--json-out F]

Each variant is one `molal annotate` command in a fresh process with a fresh SQLite cache (so every
(annotator, text) pair is a miss): `--engine local` (the process, torch with all cores), then
`--engine ray --workers W` for each W (a local Ray cluster started by the command; each actor reserves one
CPU, and Ray gives it one thread). Reported: the whole command's wall time (imports, cluster start, model
loads), the annotation's own seconds as the command measured them, texts/s over those, and the ratio to the
in-process path. Texts: TREC train questions (shared data) or the bundled TREC sample. Mixtures: the offline
default (4 MiniLM scorers) or SmolLM2-135M (hf, first-token, prefill; `molal models install smollm2-135m`).
Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = """
[[annotator]]
type = "hf"
name = "smollm2"
model = "smollm2-135m"
scoring = "first_token"
prefill = true
batch_size = 16
"""
TREC = "abbreviation,description,entity,human,location,numeric"


def _texts(n: int) -> list[str]:
    shared = REPO.parent / "shared" / "data" / "trec" / "train.jsonl"
    src = shared if shared.exists() else REPO / "molal" / "assets" / "trec.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(r["text"] for r in rows))[:n]


def run(variant: str, workers: int, pool: Path, config: Path | None, tmp: Path, shard: int) -> dict:
    out = tmp / f"{variant}-{workers}.npz"
    cmd = [sys.executable, "-m", "molal.cli.main", "annotate", "--data", str(pool), "--out", str(out),
           "--labels", TREC, "--no-progress", "--cache", str(tmp / f"cache-{variant}-{workers}.db")]
    if config is not None:
        cmd += ["--config", str(config)]
    if variant == "ray":
        cmd += ["--engine", "ray", "--workers", str(workers), "--shard-size", str(shard)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{variant} x{workers} failed:\n{proc.stderr[-3000:]}")
    st = json.loads(out.with_name(out.name + ".stats.json").read_text())
    return {"variant": "in-process" if variant == "local" else f"ray x{workers}", "wall_s": round(wall, 1),
            "annotate_s": round(st["seconds"], 1), "texts": st["done"],
            "texts_per_s": round(st["done"] / st["seconds"], 2), "annotated_pairs": st["annotated"],
            "workers_used": len(st.get("worker_pids", [])) or None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--mixture", choices=["embedding", "smollm2"], default="embedding")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="molal-bench-engine-"))
    texts = _texts(args.n)
    pool = tmp / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = None
    if args.mixture == "smollm2":
        config = tmp / "smollm2.toml"
        config.write_text(SMOLLM2)
    rows = [run("local", 0, pool, config, tmp, args.shard_size)]
    for w in [int(x) for x in args.workers.split(",") if x]:
        rows.append(run("ray", w, pool, config, tmp, args.shard_size))
    base = rows[0]["texts_per_s"]
    for r in rows:
        r["vs_in_process"] = round(r["texts_per_s"] / base, 2)
    result = {"bench": "engine", "mixture": args.mixture, "n": len(texts), "shard_size": args.shard_size,
              "cpus": os.cpu_count(), "python": platform.python_version(), "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1))
    print(f"\n{'variant':<12}{'wall s':>8}{'annot. s':>10}{'texts/s':>9}{'x proc.':>9}")
    for r in rows:
        print(f"{r['variant']:<12}{r['wall_s']:>8}{r['annotate_s']:>10}{r['texts_per_s']:>9}{r['vs_in_process']:>9}")


if __name__ == "__main__":
    main()
