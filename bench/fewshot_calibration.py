"""Few-shot from seeds and calibration (issue 29): why Gemma-3 labelled every AG News text "Sci/Tech" with
``examples = "seeds"`` and ``calibrate = "content_free"``, and what calibrating on the project's own texts does.

    MOLAL_SHARED_DATA=/work/shared/data nice -n 10 python bench/fewshot_calibration.py --dataset ag_news --n 150

The prompt: the shipped model (``--model``, default gemma3-270m) through the ``hf`` annotator with ``prefill =
true`` and ``examples = "seeds"``, filled as the training job fills it: the train split's first 8 texts of each
class (lowest id first), of which the prompt shows ``examples_per_class`` (1) and the rest (up to 32) are the
calibration texts. The model answers ``--n`` test texts (a fixed sample) once; each calibration divides those
same answers by a bias: none; the mean answer on the content-free inputs (the old behaviour); the mean answer
on the calibration texts (molal's now). Prints JSON, then a table: accuracy and each class's share.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="ag_news")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--model", default="gemma3-270m")
    args = ap.parse_args()

    from molal.annotators import Mixture
    from molal.annotators.base import CONTENT_FREE_TEXTS
    from molal.datasets import CLASS_NAMES
    from molal.resources import shared_data_dir

    base = shared_data_dir()
    if base is None:
        raise SystemExit("shared data not found (MOLAL_SHARED_DATA)")
    classes = list(CLASS_NAMES[args.dataset])

    def rows(split: str) -> list[dict]:
        return [json.loads(x) for x in (base / args.dataset / f"{split}.jsonl").read_text().splitlines() if x]

    labelled, per = [], {}
    for r in rows("train"):
        if per.get(r["label"], 0) < 8:
            per[r["label"]] = per.get(r["label"], 0) + 1
            labelled.append({"text": r["text"], "label": r["label"]})
    test = rows("test")
    pick = np.random.default_rng(0).permutation(len(test))[:args.n]
    texts = [test[i]["text"] for i in pick]
    gold = np.array([classes.index(test[i]["label"]) for i in pick])
    spec = f'[[annotator]]\ntype = "hf"\nname = "llm"\nmodel = "{args.model}"\nprefill = true\nexamples = "seeds"\n'
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "raw.toml").write_text(spec)
        (Path(d) / "cal.toml").write_text(spec + 'calibrate = "content_free"\n')
        raw = Mixture.from_config(Path(d) / "raw.toml").with_seed_examples(labelled).annotators[0]
        cal = Mixture.from_config(Path(d) / "cal.toml").with_seed_examples(labelled).annotators[0]
    t0 = time.perf_counter()
    p = raw.annotate(texts, classes).probs
    secs = time.perf_counter() - t0
    cf = raw._annotate(list(CONTENT_FREE_TEXTS), classes, {}).probs.mean(axis=0)
    seeds = cal.content_free_probs(classes, {})
    out = {"dataset": args.dataset, "model": args.model, "n": len(texts), "examples": len(cal.prompt.examples),
           "calibration_texts": len(cal.prompt.calibration_texts), "texts_per_s": round(len(texts) / secs, 3),
           "bias": {"content_free": cf.round(3).tolist(), "seed_texts": seeds.round(3).tolist()}, "rows": []}
    for name, div in (("none", np.ones(len(classes))), ("content-free inputs (before)", cf),
                      ("the seeds' other texts (now)", seeds)):
        pred = (p / div).argmax(axis=1)
        out["rows"].append({"calibration": name, "accuracy": round(float((pred == gold).mean()), 3),
                            "shares": dict(zip(classes, (np.bincount(pred, minlength=len(classes)) / len(pred))
                                               .round(2).tolist(), strict=True))})
    print(json.dumps(out))
    print(f"\n{args.model}, {args.dataset}, {len(texts)} texts, {out['examples']} examples in the prompt, "
          f"{out['calibration_texts']} calibration texts, {out['texts_per_s']} texts/s\n")
    print("| calibration | accuracy | " + " | ".join(classes) + " |")
    print("|---|---:|" + "---:|" * len(classes))
    for r in out["rows"]:
        print(f"| {r['calibration']} | {r['accuracy']:.3f} | " + " | ".join(f"{v:.0%}" for v in r["shares"].values())
              + " |")


if __name__ == "__main__":
    main()
