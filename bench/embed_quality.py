"""What int8 dynamic quantization of the encoder (``MOLAL_ENCODER_QUANTIZE=int8``) does to accuracy: the 4
scorers of docker/mixture.cpu.example.toml, MoLAM on them (50 gold seeds; LLM-only and with its MiniLM text
model) and the frozen-encoder student trained on MoLAM's labels, float32 against int8, on shared data sets.

For each data set: a pool of ``--pool`` train texts (annotated by the scorers, aggregated by MoLAM from 50
seeds whose gold labels it is given; accuracy on the other pool texts) and ``--test`` test texts (the student,
trained on the pool with MoLAM's labels as the service trains it: 30 epochs, max length 64, frozen MiniLM).
Each precision runs in a fresh process, without the embedding store. Prints JSON, then a table.

    nice -n 10 .venv/bin/python bench/embed_quality.py --data trec,ag_news --pool 2000 --test 1000
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
sys.path.insert(0, str(REPO))
CONFIG = REPO / "docker" / "mixture.cpu.example.toml"


def _worker(dataset: Path, pool_n: int, test_n: int, out: Path) -> None:
    import numpy as np
    import torch

    from molal import MoLAM
    from molal.annotators import Mixture
    from molal.student import Student

    torch.manual_seed(0)

    def read(name: str, n: int) -> list[dict]:
        rows = [json.loads(x) for x in (dataset / f"{name}.jsonl").read_text().splitlines()]
        rng = np.random.default_rng(0)
        return [rows[i] for i in sorted(rng.choice(len(rows), min(n, len(rows)), replace=False))]

    pool, test = read("train", pool_n), read("test", test_n)
    classes = sorted({r["label"] for r in pool})
    gold = np.array([classes.index(r["label"]) for r in pool])
    test_gold = np.array([classes.index(r["label"]) for r in test])
    res: dict = {"pool": len(pool), "test": len(test)}
    t0 = time.perf_counter()
    mix = Mixture.from_config(CONFIG)
    r = mix.annotate([x["text"] for x in pool], classes)
    assert len(r.done_idx) == len(pool), r.failed
    out_ = r.outputs
    pred = out_.normalized_probs().argmax(axis=2)
    res["scorers"] = {n: float((pred[:, j] == gold).mean()) for j, n in enumerate(out_.llm_names)}
    res["annotate_s"] = time.perf_counter() - t0
    idx = np.random.default_rng(1).choice(len(pool), 50, replace=False)
    rest = np.setdiff1d(np.arange(len(pool)), idx)
    fast = {"n_repeats": 1, "lr_cs": (0.1, 1.0), "xgb_params": {"learning_rate": 0.1, "max_depth": 3, "n_estimators": 40}}
    labels = None
    for name, tf in (("molam", None), ("molam_text", "minilm")):
        m = MoLAM(text_features=tf, **fast).fit(out_, idx, gold[idx])
        p = m.predict_proba(out_).argmax(1)
        res[name] = float((p[rest] == gold[rest]).mean())
        if tf is None:
            labels = p
            labels[idx] = gold[idx]
    t1 = time.perf_counter()
    st = Student(classes, max_length=64, freeze_encoder=True, epochs=30, device="cpu", seed=0)
    st.fit([x["text"] for x in pool], labels, progress=False)
    res["student"] = float((st.predict([x["text"] for x in test]) == test_gold).mean())
    res["student_s"] = time.perf_counter() - t1
    out.write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="trec,ag_news")
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.pool, args.test, args.worker_out)
        return
    from molal.resources import shared_data_dir

    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("the shared data folder was not found: set MOLAL_SHARED_DATA")
    tmp = Path(tempfile.mkdtemp(prefix="molal-bench-quality-"))
    results = []
    for name in args.data.split(","):
        for quant in ("none", "int8"):
            out = tmp / f"{name}-{quant}.json"
            env = {**os.environ, "PYTHONPATH": str(REPO), "MOLAL_ENCODER_QUANTIZE": quant, "HF_HUB_OFFLINE": "1"}
            r = subprocess.run([sys.executable, __file__, "--worker", str(shared / name), "--pool", str(args.pool),
                                "--test", str(args.test), "--worker-out", str(out)], env=env, capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise SystemExit(f"{name} {quant} failed: {r.stderr[-3000:]}")
            res = {"dataset": name, "quantize": quant, **json.loads(out.read_text())}
            results.append(res)
            print(json.dumps(res), flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=1))
    print("\n| data set | encoder | scorers (4) | MoLAM | MoLAM + text | student (test) | annotate s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in results:
        sc = " / ".join(f"{100 * v:.1f}" for v in r["scorers"].values())
        print(f"| {r['dataset']} | {r['quantize']} | {sc} | {100 * r['molam']:.1f} | {100 * r['molam_text']:.1f} "
              f"| {100 * r['student']:.1f} | {r['annotate_s']:.0f} |")


if __name__ == "__main__":
    main()
