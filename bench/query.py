"""Benchmark the query strategies: time and peak (traced) memory at pool sizes 1k / 10k / 100k.

Synthetic pools with the shapes the student produces (K=6 classes, d=384 MiniLM embeddings, 10 MC-dropout
samples, 5 perturbations, 500 labelled embeddings). Only the strategy's selection is timed (the model's
forward passes that produce these arrays are the student's cost, not the strategy's). Peak memory is the
tracemalloc peak of the selection (numpy reports its buffers to tracemalloc), excluding the pool itself.

    .venv/bin/python bench/query.py [--sizes 1000,10000,100000] [--budget 50] [--strategies all] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc

import numpy as np


def make_pool(n: int, k: int = 6, d: int = 384, t: int = 10, p: int = 5, m: int = 500, seed: int = 0):
    from molal.query import QueryPool

    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(k, 0.5), size=n)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    mc = np.clip(probs[None] + 0.05 * rng.normal(size=(t, n, k)), 1e-6, None)
    mc /= mc.sum(2, keepdims=True)
    pert = probs[None] + 1e-3 * rng.normal(size=(p, n, k))
    lab = rng.normal(size=(m, d)).astype(np.float32)
    return QueryPool(probs=probs, embeddings=emb, labeled_embeddings=lab, mc_probs=mc, perturbed_probs=pert)


def main(argv: list[str] | None = None) -> int:
    from molal.query import STRATEGIES, get_strategy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--strategies", default="all")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    names = list(STRATEGIES) if a.strategies == "all" else a.strategies.split(",")
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        pool = make_pool(n)
        pool_mb = sum(x.nbytes for x in (pool.probs, pool.embeddings, pool.mc_probs, pool.perturbed_probs)) / 2**20
        for name in names:
            st = get_strategy(name)
            tracemalloc.start()
            t0 = time.perf_counter()
            idx = st.select(pool, a.budget, np.random.default_rng(0))
            sec = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert len(np.unique(idx)) == min(a.budget, n)
            row = {"strategy": name, "n": n, "budget": a.budget, "seconds": round(sec, 3),
                   "peak_mb": round(peak / 2**20, 1), "pool_arrays_mb": round(pool_mb, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{'strategy':<18}" + "".join(f"{'n=' + str(n):>24}" for n in sorted({r['n'] for r in rows})))
    for name in names:
        cells = [r for r in rows if r["strategy"] == name]
        print(f"{name:<18}" + "".join(f"{r['seconds']:>10.2f}s {r['peak_mb']:>8.1f}MB  " for r in cells))
    if a.json:
        from molal.io import atomic_write_json

        atomic_write_json(a.json, {"rows": rows}, mode=0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main())
