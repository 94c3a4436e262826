"""Build the bundled TREC sample shipped in molal/assets (used by the replay annotator and `molal demo`).

Source: the shared recordings of 5 real LLMs on TREC train (see shared/data/llm-outputs/README.md).
Run: .venv/bin/python tools/build_trec_asset.py [--shared ../shared/data]
Writes molal/assets/trec_recorded.npz (LLMOutputs with texts; probs stored as recorded, float32 precision)
and molal/assets/trec.jsonl (text, label) — the same rows in the same order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from molal.data import LLMOutputs, load_dataset, write_jsonl
from molal.datasets import CLASS_NAMES, RECORDED_LLMS

ap = argparse.ArgumentParser()
ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
args = ap.parse_args()
base = Path(args.shared) / "llm-outputs" / "trec"
paths = [base / f"{m}.jsonl" for m in RECORDED_LLMS["trec"]]
out = LLMOutputs.from_recorded_jsonl(paths, CLASS_NAMES["trec"])
out = LLMOutputs(
    probs=out.probs.astype(np.float32).astype(np.float64),
    consistency=out.consistency,
    class_names=out.class_names,
    llm_names=out.llm_names,
    texts=out.texts,
)
assets = Path(__file__).resolve().parents[1] / "molal" / "assets"
out.save(assets / "trec_recorded.npz")
ds = load_dataset(paths[0], class_names=CLASS_NAMES["trec"])
write_jsonl(assets / "trec.jsonl", ({"text": t, "label": CLASS_NAMES["trec"][y]} for t, y in zip(ds.texts, ds.labels)))
print("wrote", assets)
