"""How many optimiser steps the frozen-encoder student needs: accuracy and time of its head trained for the
full ``--epochs`` against runs capped at ``--caps`` steps (``Student(max_steps=...)``), on one data set.

    .venv/bin/python bench/student_steps.py --train ../shared/data/ag_news/train.jsonl \\
        --test ../shared/data/ag_news/test.jsonl --caps 1000,3000 --noise 0,0.3

The embeddings are computed once (the student caches them per text), so the timings are the head's alone.
``--noise`` flips that fraction of the training labels to another class at random (MoLAM's labels are
noisy; the weights of the noise-robust loss stay 1 here). Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--caps", default="1000,3000")
    ap.add_argument("--noise", default="0,0.3")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=0, help="repeat the training texts with a suffix (` [n]`) up "
                    "to this many, as bench/scale.py builds a big project (for the timing at that size)")
    args = ap.parse_args()

    import torch

    from molal.data import load_dataset
    from molal.student import Student

    torch.set_num_threads(2)
    tr = load_dataset(args.train)
    te = load_dataset(args.test, class_names=tr.class_names)
    k = len(tr.class_names)
    test_texts, test_y = te.texts[: args.n_test], np.asarray(te.labels[: args.n_test])
    train_texts, train_y = list(tr.texts), list(tr.labels)
    if args.n_train > len(train_texts):
        m = len(tr.texts)
        train_texts = [t if i < m else f"{t} [{i // m}]" for i, t in
                       ((i, tr.texts[i % m]) for i in range(args.n_train))]
        train_y = [tr.labels[i % m] for i in range(args.n_train)]
    rng = np.random.default_rng(args.seed)
    rows = []
    for noise in [float(x) for x in args.noise.split(",")]:
        y = np.asarray(train_y).copy()
        flip = rng.random(len(y)) < noise
        y[flip] = (y[flip] + rng.integers(1, k, int(flip.sum()))) % k
        for cap in [0, *[int(x) for x in args.caps.split(",")]]:
            st = Student(tr.class_names, freeze_encoder=True, epochs=args.epochs, max_length=args.max_length,
                         max_steps=cap, seed=args.seed)
            st.fit(train_texts[:16], y[:16], progress=False)  # warm: embeddings of a few texts, model loaded
            st._frozen_embeddings(st._fresh_model(), train_texts + list(test_texts))  # noqa: SLF001 - cache
            t0 = time.perf_counter()
            st.fit(train_texts, y, progress=False)
            secs = time.perf_counter() - t0
            acc = float((st.predict_proba(test_texts).argmax(1) == test_y).mean())
            row = {"noise": noise, "max_steps": cap or None, "epochs_run": st.metadata.get("epochs"),
                   "steps": st.metadata.get("steps"), "fit_s": round(secs, 1), "test_acc": round(acc, 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{len(train_texts)} training texts, {len(test_texts)} test texts, {args.epochs} epochs of batch 16 uncapped\n")
    print("| label noise | max_steps | epochs run | fit s | test accuracy |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['noise']:.0%} | {r['max_steps'] or 'off'} | {r['epochs_run']} | {r['fit_s']} | {r['test_acc']:.3f} |")


if __name__ == "__main__":
    main()
