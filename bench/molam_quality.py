"""MoLAM vs baselines on the shared TREC recordings of 5 real LLMs.

50 random seeds (gold labels), accuracy / macro-F1 on the other 5,402 items, mean ± std over 5 fixed draws
(numpy default_rng(draw), draw = 0..4). Also: a no-consistency setting (probabilities only) and the fit
time of MoLAM on 10,000 items × 5 LLMs × 6 classes (TREC rows resampled with replacement).

    .venv/bin/python bench/molam_quality.py [--draws 5] [--seeds 50] [--json out.json]
    .venv/bin/python bench/molam_quality.py --text-features minilm --methods molam,molam+text \
        --skip-no-consistency --skip-fit-time      # MoLAM with the transductive MiniLM text model

Prints one JSON object, then a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from molal import LLMOutputs, load_dataset  # noqa: E402
from molal.datasets import get_dataset  # noqa: E402
from molal.metrics import macro_f1  # noqa: E402
from molal.molam import BASELINES, MoLAM  # noqa: E402


def run(outputs: LLMOutputs, gold: np.ndarray, draws: int, n_seeds: int, progress,
        text_features: str | None = None, only: list[str] | None = None, text_options: dict | None = None,
        first_draw: int = 0) -> dict:
    methods = {"molam": MoLAM, **BASELINES}
    if text_features:
        methods["molam+text"] = functools.partial(MoLAM, text_features=text_features, **(text_options or {}))
    if only:
        methods = {m: c for m, c in methods.items() if m in only}
    k = outputs.n_classes
    res: dict[str, dict] = {m: {"acc": [], "f1": [], "sec": [], "choice": [], "class_acc": []} for m in methods}
    n = len(gold)
    for d in range(first_draw, first_draw + draws):
        idx = np.random.default_rng(d).choice(n, n_seeds, replace=False)
        rest = np.setdiff1d(np.arange(n), idx)
        for name, cls in methods.items():
            t0 = time.perf_counter()
            m = cls().fit(outputs, idx, gold[idx])
            sec = time.perf_counter() - t0
            pred = m.predict(outputs)
            res[name]["acc"].append(float((pred[rest] == gold[rest]).mean()))
            res[name]["f1"].append(macro_f1(gold[rest], pred[rest], outputs.n_classes))
            res[name]["sec"].append(sec)
            res[name]["choice"].append(m.metadata.get("choice") or m.metadata.get("source"))
            g, pr = gold[rest], pred[rest]
            res[name]["class_acc"].append([float((pr[g == c] == c).mean()) if (g == c).any() else None for c in range(k)])
            progress(f"draw {d} {name}: acc {res[name]['acc'][-1]:.4f} ({sec:.1f} s)")
    return {
        name: {
            "mean_acc": float(np.mean(r["acc"])),
            "std_acc": float(np.std(r["acc"])),
            "mean_macro_f1": float(np.mean(r["f1"])),
            "mean_fit_s": float(np.mean(r["sec"])),
            "acc_per_draw": [round(a, 4) for a in r["acc"]],
            "choice_per_draw": r["choice"],
            # recall of each gold class on the non-seed pool, mean over draws
            "class_acc": {c: round(float(np.mean([a[i] for a in r["class_acc"] if a[i] is not None])), 4)
                          for i, c in enumerate(outputs.class_names)},
        }
        for name, r in res.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-no-consistency", action="store_true")
    ap.add_argument("--text-features", default=None, metavar="ENCODER",
                    help="also run MoLAM(text_features=ENCODER) as 'molam+text' (e.g. minilm)")
    ap.add_argument("--text-options", default=None, metavar="JSON",
                    help='more MoLAM text_* arguments for molam+text, e.g. \'{"text_ngrams": 4096, "text_rounds": 3}\'')
    ap.add_argument("--first-draw", type=int, default=0, help="draws first_draw .. first_draw+draws-1 (held-out draws)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (e.g. molam,molam+text)")
    ap.add_argument("--skip-fit-time", action="store_true", help="skip the 10k-item fit timing")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    ds = get_dataset("trec")
    outputs = ds.recorded_outputs()
    # gold from the recorded files themselves (their row order is not train.jsonl's)
    gold = load_dataset(ds.recorded_paths()[0], class_names=ds.class_names).labels
    assert gold is not None and len(gold) == outputs.n_items
    result: dict = {"dataset": "trec", "n_items": int(outputs.n_items), "n_seeds": args.seeds, "draws": args.draws}
    only = args.methods.split(",") if args.methods else None
    topts = json.loads(args.text_options) if args.text_options else None
    result["text_options"] = topts
    result["first_draw"] = args.first_draw
    result["trec"] = run(outputs, gold, args.draws, args.seeds, lambda s: err.log(s), args.text_features, only, topts, args.first_draw)
    if not args.skip_no_consistency:
        noc = LLMOutputs(outputs.probs, None, outputs.class_names, outputs.llm_names, texts=outputs.texts)
        result["trec_no_consistency"] = run(noc, gold, args.draws, args.seeds, lambda s: err.log("[no-cons] " + s),
                                            args.text_features, only, topts, args.first_draw)
    if not args.skip_fit_time:  # fit time at 10k items × 5 LLMs × 6 classes
        rows = np.random.default_rng(0).choice(outputs.n_items, 10_000, replace=True)
        big = outputs.subset(rows)
        idx = np.arange(50) * 200
        t0 = time.perf_counter()
        MoLAM().fit(big, idx, gold[rows][idx])
        result["fit_seconds_10k"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    con = Console()
    for setting in [k for k in ("trec", "trec_no_consistency") if k in result]:
        t = Table(title=f"{setting}: {args.seeds} seeds, accuracy on the other items, {args.draws} draws")
        for c in ("method", "mean acc", "std", "macro-F1", "fit s"):
            t.add_column(c, justify="left" if c == "method" else "right")
        for name, r in result[setting].items():
            t.add_row(name, f"{r['mean_acc']:.4f}", f"{r['std_acc']:.4f}", f"{r['mean_macro_f1']:.4f}", f"{r['mean_fit_s']:.2f}")
        con.print(t)
    if "fit_seconds_10k" in result:
        con.print(f"MoLAM fit, 10,000 items × 5 LLMs × 6 classes: {result['fit_seconds_10k']} s")


if __name__ == "__main__":
    main()
