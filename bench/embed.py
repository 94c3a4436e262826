"""The CPU path against its peer, side by side in one run (issue 30): texts/s of

* ``st``: sentence-transformers' single ``encode`` of the texts (the bundled MiniLM folder, ``max_seq_length``
  128, batch 64): the peer;
* ``annotate``: the 4 scorers of docker/mixture.cpu.example.toml on the same texts, no cache, in one
  ``Mixture.annotate`` (the stage ``molal annotate`` times, model already loaded), with each scorer's accuracy;
* ``cli``: the whole ``molal annotate --no-cache`` command (process start, imports, load, annotate, write);
* ``embed``: ``molal.embeddings.embed`` alone;
* with ``--before DIR``: ``annotate`` and ``cli`` of another checkout (e.g. the main branch), same texts;
* with ``--int8``: ``annotate`` with ``MOLAL_ENCODER_QUANTIZE=int8``.

Every measurement runs in a fresh process (nothing cached in memory, no embedding store), one after another,
in rounds (``--rounds``), so the ratios compare runs made under the same load. Prints JSON, then a table.

    nice -n 10 .venv/bin/python bench/embed.py --data ag_news:3000,trec:0 --before ../main --int8 \\
        --json-out bench/out/embed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "docker" / "mixture.cpu.example.toml"


def _worker(mode: str, data: Path, out: Path) -> None:
    """One measurement in this (fresh) process; writes {"seconds": ..., ...} to ``out``."""
    root = os.environ.get("MOLAL_BENCH_ROOT", str(REPO))
    sys.path.insert(0, root)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    texts = [r["text"] for r in rows]
    classes = sorted({r["label"] for r in rows})
    res: dict = {"n": len(texts)}
    if mode == "st":
        from sentence_transformers import SentenceTransformer

        from molal.resources import minilm_path

        m = SentenceTransformer(str(minilm_path()), device="cpu")
        m.max_seq_length = 128
        m.encode(["warm up"], show_progress_bar=False)  # as the others: first-call costs not in the timing
        t0 = time.perf_counter()
        m.encode(texts, batch_size=64, show_progress_bar=False)
        res["seconds"] = time.perf_counter() - t0
    elif mode == "embed":
        from molal.embeddings import embed

        embed(["warm up"], "minilm")
        t0 = time.perf_counter()
        embed(texts, "minilm", max_length=128, batch_size=64)
        res["seconds"] = time.perf_counter() - t0
    elif mode == "annotate":
        import numpy as np

        from molal.annotators import Mixture

        mix = Mixture.from_config(CONFIG)
        mix.annotate(["warm up: load the model"], classes)  # a 1-text call: not in the timing
        t0 = time.perf_counter()
        r = mix.annotate(texts, classes)
        res["seconds"] = time.perf_counter() - t0
        gold = np.array([classes.index(x["label"]) for x in rows])[r.done_idx]
        pred = r.outputs.normalized_probs().argmax(axis=2)
        res["accuracy"] = {n: float((pred[:, j] == gold).mean()) for j, n in enumerate(r.outputs.llm_names)}
        res["accuracy_majority"] = float((np.array([np.bincount(p, minlength=len(classes)).argmax() for p in pred])
                                          == gold).mean())
    else:
        raise SystemExit(f"unknown mode {mode}")
    out.write_text(json.dumps(res))


def _run(mode: str, data: Path, root: Path, env_extra: dict[str, str], tmp: Path) -> dict:
    env = {**os.environ, "MOLAL_BENCH_ROOT": str(root), "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1",
           "MOLAL_EMBEDDING_STORE_MB": "0", **env_extra}
    out = tmp / f"{mode}-{time.time_ns()}.json"
    t0 = time.perf_counter()
    if mode == "cli":
        molal = Path(sys.executable).with_name("molal")
        cmd = [str(molal), "annotate", "--data", str(data), "--config", str(CONFIG), "--no-cache",
               "--no-progress", "--out", str(tmp / "out.npz")]
        r = subprocess.run(cmd, env={**env, "MODEL_DIR": str(tmp / "model-dir")}, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"cli failed: {r.stderr[-2000:]}")
        return {"n": len(data.read_text().splitlines()), "seconds": wall}
    r = subprocess.run([sys.executable, __file__, "--worker", mode, "--data", str(data), "--worker-out", str(out)],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed: {r.stderr[-2000:]}")
    res = json.loads(out.read_text())
    res["process_seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="ag_news:3000,trec:0",
                    help="shared data sets and how many train texts (0 = all), comma-separated")
    ap.add_argument("--shared", type=Path, default=None, help="the shared data folder (default: found)")
    ap.add_argument("--before", type=Path, default=None, help="another checkout to measure alongside (e.g. main)")
    ap.add_argument("--int8", action="store_true", help="also the scorers with MOLAL_ENCODER_QUANTIZE=int8")
    ap.add_argument("--no-cli", action="store_true", help="skip the whole-command measurements")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, Path(args.data), args.worker_out)
        return
    sys.path.insert(0, str(REPO))
    from molal.resources import shared_data_dir

    shared = args.shared or shared_data_dir()
    if shared is None:
        raise SystemExit("the shared data folder was not found: pass --shared or set MOLAL_SHARED_DATA")
    tmp = Path(tempfile.mkdtemp(prefix="molal-bench-embed-"))
    plan = [("st", REPO, {}), ("annotate", REPO, {}), ("embed", REPO, {})]
    if not args.no_cli:
        plan.append(("cli", REPO, {}))
    if args.before is not None:
        plan += [("annotate", args.before.resolve(), {})] + ([] if args.no_cli else [("cli", args.before.resolve(), {})])
    if args.int8:
        plan.append(("annotate", REPO, {"MOLAL_ENCODER_QUANTIZE": "int8"}))
    results: list[dict] = []
    for spec in args.data.split(","):
        name, _, n = spec.partition(":")
        lines = (shared / name / "train.jsonl").read_text().splitlines()
        lines = lines[: int(n)] if n and int(n) > 0 else lines
        data = tmp / f"{name}.jsonl"
        data.write_text("\n".join(lines) + "\n")
        for rnd in range(args.rounds):
            for mode, root, extra in plan:
                label = mode + (" (before)" if root != REPO else "") + (" int8" if extra else "")
                r = _run(mode, data, root, extra, tmp)
                r.update(dataset=name, round=rnd, what=label, texts_per_s=r["n"] / r["seconds"])
                results.append(r)
                print(json.dumps(r), flush=True)
    # ratios against the peer of the same data set and round
    for r in results:
        peer = next(x for x in results if x["dataset"] == r["dataset"] and x["round"] == r["round"] and x["what"] == "st")
        r["vs_st"] = r["texts_per_s"] / peer["texts_per_s"]
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    def commit(root: Path) -> str:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return r.stdout.strip() or "?"

    doc = {"loadavg_at_end": load, "cpus": os.cpu_count(), "commit": commit(REPO),
           "before_commit": commit(args.before) if args.before else None, "results": results}
    print(json.dumps(doc, indent=1))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(doc, indent=1))
    print("\n| data set | round | what | texts | seconds | texts/s | × sentence-transformers | accuracy (4 scorers) |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        acc = " / ".join(f"{v:.3f}" for v in r.get("accuracy", {}).values())
        print(f"| {r['dataset']} | {r['round']} | {r['what']} | {r['n']} | {r['seconds']:.1f} | {r['texts_per_s']:.1f} "
              f"| {r['vs_st']:.2f} | {acc} |")


if __name__ == "__main__":
    main()
