"""MoLAM vs baselines on the shared TREC recordings of 5 real LLMs.

50 random seeds (gold labels), accuracy / macro-F1 on the other 5,402 items, mean ± std over 5 fixed draws
(numpy default_rng(draw), draw = 0..4). Also: a no-consistency setting (probabilities only) and the fit
time of MoLAM on 10,000 items × 5 LLMs × 6 classes (TREC rows resampled with replacement).

    .venv/bin/python bench/molam_quality.py [--draws 5] [--seeds 50] [--json out.json]
    .venv/bin/python bench/molam_quality.py --text-features minilm --methods molam,molam+text \
        --skip-no-consistency --skip-fit-time      # MoLAM with the transductive MiniLM text model
    .venv/bin/python bench/molam_quality.py --ceiling --methods molam --skip-no-consistency --skip-fit-time
        # + how far ANY aggregator of these LLM outputs can go (supervised on all gold, 5-fold CV)
    .venv/bin/python bench/molam_quality.py --outputs real.npz --data pool.jsonl --skip-fit-time
        # any mixture's outputs from `molal annotate` (gold labels from the JSONL's label field, same order)

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


def ceiling(outputs: LLMOutputs, gold: np.ndarray, draws: int, n_seeds: int) -> dict:
    """What the LLM outputs allow at best, and where MoLAM's errors are.

    * LR and XGBoost on MoLAM's own per-item features, trained on the gold labels of *all* items (5-fold CV):
      an upper bound for any aggregator of these outputs (it uses 5,000+ gold labels, not 50);
    * per class: the share of its items that at least one / a majority of the LLMs vote for;
    * MoLAM (50 seeds): accuracy of its most confident half, and its most frequent confusions.
    """
    import xgboost as xgb
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from molal.aggregation.signals import general_features as _features

    x = _features(outputs)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(x, gold))
    out: dict = {"n_features": int(x.shape[1])}
    for name, make in (("lr_all_gold", lambda: LogisticRegression(C=1.0, max_iter=5000)),
                       ("xgb_all_gold", lambda: xgb.XGBClassifier(n_estimators=300, max_depth=4, learning_rate=0.05,
                                                                  n_jobs=1, verbosity=0))):
        pred = np.zeros_like(gold)
        for tr, te in folds:
            pred[te] = make().fit(x[tr], gold[tr]).predict(x[te])
        out[name] = {"acc": round(float(np.mean(pred == gold)), 4),
                     "recall": {c: round(float(np.mean(pred[gold == k] == k)), 3)
                                for k, c in enumerate(outputs.class_names)}}
    votes = outputs.normalized_probs().argmax(2)  # (n, L)
    out["llm_votes_for_true_class"] = {
        c: {"any": round(float(np.mean((votes[gold == k] == k).any(1))), 3),
            "majority": round(float(np.mean((votes[gold == k] == k).sum(1) * 2 > votes.shape[1])), 3)}
        for k, c in enumerate(outputs.class_names)}
    top_half, confusions = [], {}
    for draw in range(draws):
        seeds = np.random.default_rng(draw).choice(outputs.n_items, n_seeds, replace=False)
        p = MoLAM().fit(outputs, seeds, gold[seeds]).predict_proba(outputs)
        rest = np.setdiff1d(np.arange(outputs.n_items), seeds)
        conf, yhat = p[rest].max(1), p[rest].argmax(1)
        top = np.argsort(-conf)[: len(rest) // 2]
        top_half.append(float(np.mean(yhat[top] == gold[rest][top])))
        for g, h in zip(gold[rest][yhat != gold[rest]], yhat[yhat != gold[rest]], strict=True):
            key = f"{outputs.class_names[g]}->{outputs.class_names[h]}"
            confusions[key] = confusions.get(key, 0) + 1
    n_err = sum(confusions.values())
    out["molam_most_confident_half_acc"] = round(float(np.mean(top_half)), 4)
    out["molam_confusions_share"] = {k: round(v / n_err, 3) for k, v in sorted(confusions.items(), key=lambda kv: -kv[1])[:5]}
    return out


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
    ap.add_argument("--outputs", type=Path, default=None, help="LLMOutputs .npz from molal annotate (default: the "
                    "shared TREC recordings of 5 LLMs)")
    ap.add_argument("--data", type=Path, default=None, help="with --outputs: the annotated JSONL (gold labels)")
    ap.add_argument("--llms", default=None, help="comma-separated members of the outputs to keep (default: all)")
    ap.add_argument("--ceiling", action="store_true",
                    help="also: aggregators supervised on ALL gold labels (an upper bound), LLM votes per class, "
                         "MoLAM's confidence and confusions")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    ds = get_dataset("trec")
    if args.outputs is not None:
        if args.data is None:
            sys.exit("--outputs needs --data (the annotated JSONL, for the gold labels)")
        outputs = LLMOutputs.load(args.outputs)
        stats = json.loads(args.outputs.with_name(args.outputs.name + ".stats.json").read_text())
        labels = load_dataset(args.data, class_names=list(outputs.class_names)).labels
        gold = labels[np.asarray(stats["done_idx"], dtype=np.int64)]  # the rows molal annotate finished
        if args.llms:
            outputs = outputs.select_llms(args.llms.split(","))
        name = f"{args.outputs.name} ({', '.join(outputs.llm_names)})"
    else:
        outputs = ds.recorded_outputs()
        # gold from the recorded files themselves (their row order is not train.jsonl's)
        gold = load_dataset(ds.recorded_paths()[0], class_names=ds.class_names).labels
        name = "trec"
    assert gold is not None and len(gold) == outputs.n_items
    result: dict = {"dataset": name, "n_items": int(outputs.n_items), "n_seeds": args.seeds, "draws": args.draws}
    only = args.methods.split(",") if args.methods else None
    topts = json.loads(args.text_options) if args.text_options else None
    result["text_options"] = topts
    result["first_draw"] = args.first_draw
    result["trec"] = run(outputs, gold, args.draws, args.seeds, lambda s: err.log(s), args.text_features, only, topts, args.first_draw)
    if not args.skip_no_consistency:
        noc = LLMOutputs(outputs.probs, None, outputs.class_names, outputs.llm_names, texts=outputs.texts)
        result["trec_no_consistency"] = run(noc, gold, args.draws, args.seeds, lambda s: err.log("[no-cons] " + s),
                                            args.text_features, only, topts, args.first_draw)
    if args.ceiling:
        result["ceiling"] = ceiling(outputs, gold, args.draws, args.seeds)
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
    if "ceiling" in result:
        c = result["ceiling"]
        t = Table(title="how far aggregating these LLM outputs can go (all gold labels, 5-fold CV)")
        for col in ("aggregator", "acc", *ds.class_names):
            t.add_column(col, justify="left" if col == "aggregator" else "right")
        for name in ("lr_all_gold", "xgb_all_gold"):
            t.add_row(name, f"{c[name]['acc']:.4f}", *(f"{c[name]['recall'][k]:.3f}" for k in ds.class_names))
        v = c["llm_votes_for_true_class"]
        t.add_row("share of items: >= 1 LLM votes the true class", "", *(f"{v[k]['any']:.3f}" for k in ds.class_names))
        t.add_row("share of items: a majority votes it", "", *(f"{v[k]['majority']:.3f}" for k in ds.class_names))
        con.print(t)
        con.print(f"MoLAM ({args.seeds} seeds): its most confident half is {c['molam_most_confident_half_acc']:.4f} "
                  f"accurate; share of its errors: {c['molam_confusions_share']}")
    if "fit_seconds_10k" in result:
        con.print(f"MoLAM fit, 10,000 items × 5 LLMs × 6 classes: {result['fit_seconds_10k']} s")


if __name__ == "__main__":
    main()
