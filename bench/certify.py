"""The certified threshold (molal.trust) over recorded LLM outputs: coverage and realised error, and MoLAM's
calibration (issue 27, items 4 and 5).

Protocol (molal.simulate_trust): per draw, 50 random seed labels fit MoLAM; 10 audits (`--audits`) of 50 / 100
/ 200 items each are drawn uniformly at random from the other items (the pool); the certificate (`ltt-pool`: with the pool's
confidences; `ltt-audit`: the audit alone) and the naive rule "confidence >= 1 - ε" are applied to the pool's
items outside the audit; gold labels give the realised error among the accepted ones. Gold is read only for
the seeds, the audit (the simulated people) and that realised error.

    .venv/bin/python bench/certify.py [--draws 100] [--json out.json] [--cache /tmp/certify-cache]
    .venv/bin/python bench/certify.py --rows even --draws 50      # half of TREC (the calibration split)
    .venv/bin/python bench/certify.py --outputs ag.npz --data ag_news/train.jsonl   # outputs of `molal annotate`
    .venv/bin/python bench/certify.py --calibration none          # MoLAM without temperature scaling

MoLAM is fitted with temperature scaling (on its out-of-fold seed predictions) unless `--calibration none`;
with it, every rule is also run on the uncalibrated confidence of the same fit, side by side, with the ECE
of both (out-of-fold on the seeds: what a user sees; on the pool against gold: for this report only).
`--cache DIR` keeps each draw's fitted probabilities (a rerun with other ε / δ / audit sizes refits nothing).
Prints one JSON object, then tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from molal import LLMOutputs, load_dataset  # noqa: E402
from molal.datasets import get_dataset  # noqa: E402
from molal.metrics import expected_calibration_error, reliability_bins  # noqa: E402
from molal.simulate_trust import certify_draw, fit_draw, summarize  # noqa: E402

#: bumped when what a fit returns changes (2: the temperature applied only when significant on the seeds)
CACHE_VERSION = 2


def load(args) -> tuple[LLMOutputs, np.ndarray, str]:
    if args.outputs is not None:
        if args.data is None:
            sys.exit("--outputs needs --data (the annotated JSONL, for the gold labels)")
        outputs = LLMOutputs.load(args.outputs)
        stats_path = args.outputs.with_name(args.outputs.name + ".stats.json")
        labels = load_dataset(args.data, class_names=list(outputs.class_names)).labels
        if stats_path.exists():  # the rows molal annotate finished
            labels = labels[np.asarray(json.loads(stats_path.read_text())["done_idx"], dtype=np.int64)]
        name = args.outputs.stem
    else:
        ds = get_dataset("trec")
        outputs, labels, name = ds.recorded_outputs(), ds.recorded_labels().labels, "trec"
    gold = np.asarray(labels, dtype=np.int64)
    if len(gold) != outputs.n_items or (gold < 0).any():
        sys.exit(f"gold labels: {len(gold)} rows for {outputs.n_items} outputs, or some unlabeled")
    if args.rows != "all":  # a fixed half of the items: even or odd row numbers
        rows = np.arange(outputs.n_items)[(0 if args.rows == "even" else 1)::2]
        outputs, gold, name = outputs.subset(rows), gold[rows], f"{name} ({args.rows} rows)"
    return outputs, gold, name


def cached_fit(outputs, gold, draw, n_seeds, params, cache: Path | None, key: str):
    path = None
    if cache is not None:
        path = cache / f"{key}-d{draw}.npz"
        if path.exists():
            z = np.load(path, allow_pickle=False)
            probas = {k[6:]: z[k] for k in z.files if k.startswith("proba_")}
            return z["seeds"], probas, json.loads(str(z["info"]))
    seeds, probas, info = fit_draw(outputs, gold, draw, n_seeds, params)
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, seeds=seeds, info=json.dumps(info), **{f"proba_{k}": v for k, v in probas.items()})
        tmp.replace(path)
    return seeds, probas, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--first-draw", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--epsilons", default="0.02,0.05,0.1")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--audit-sizes", default="50,100,200")
    ap.add_argument("--audits", type=int, default=10, help="random audits of each size per fit")
    ap.add_argument("--calibration", choices=["temperature", "none"], default="temperature")
    ap.add_argument("--outputs", type=Path, default=None, help="LLMOutputs .npz (default: the TREC recordings)")
    ap.add_argument("--data", type=Path, default=None, help="with --outputs: the annotated JSONL (gold labels)")
    ap.add_argument("--rows", choices=["all", "even", "odd"], default="all", help="all items or a fixed half")
    ap.add_argument("--cache", type=Path, default=None, help="folder for each draw's fitted probabilities")
    ap.add_argument("--plot", type=Path, default=None, help="write reliability diagrams (PNG) with this prefix")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    outputs, gold, name = load(args)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    sizes = [int(s) for s in args.audit_sizes.split(",")]
    params = {"calibration": None if args.calibration == "none" else "temperature"}
    key = hashlib.sha256(json.dumps([name, outputs.n_items, args.seeds, params, CACHE_VERSION],
                                    sort_keys=True).encode()).hexdigest()[:12]
    records, fits, ece = [], [], {}
    bins: dict[str, list] = {}
    t_start = time.perf_counter()
    for d in range(args.first_draw, args.first_draw + args.draws):
        t0 = time.perf_counter()
        seeds, probas, info = cached_fit(outputs, gold, d, args.seeds, params, args.cache, key)
        fits.append(info)
        rest = np.setdiff1d(np.arange(len(gold)), seeds)
        for conf_name, proba in probas.items():
            for r in certify_draw(proba, gold, seeds, d, epsilons=epsilons, delta=args.delta, audit_sizes=sizes,
                                  audits=args.audits):
                records.append({**r, "confidence": conf_name})
            ece.setdefault(conf_name, []).append(expected_calibration_error(proba[rest], gold[rest]))
            bins.setdefault(conf_name, []).append(reliability_bins(proba[rest], gold[rest]))
        err.log(f"draw {d}: {info['choice']}, T {info['temperature']:.3f}, ECE "
                + ", ".join(f"{k} {v[-1]:.4f}" for k, v in ece.items()) + f" ({time.perf_counter() - t0:.1f} s)")
    conf_names = list(dict.fromkeys(r["confidence"] for r in records))
    summary = {c: summarize([r for r in records if r["confidence"] == c], args.delta) for c in conf_names}
    cal = [f["calibration"] for f in fits if f.get("calibration") and "seed_oof_ece" in f["calibration"]]
    result = {
        "dataset": name, "n_items": int(outputs.n_items), "n_seeds": args.seeds, "draws": args.draws,
        "first_draw": args.first_draw, "audits_per_fit": args.audits, "delta": args.delta, "epsilons": epsilons, "audit_sizes": sizes,
        "molam": params, "seconds": round(time.perf_counter() - t_start, 1),
        "choices": {c: sum(f["choice"] == c for f in fits) for c in sorted({f["choice"] for f in fits})},
        "temperature": {"mean": float(np.mean([f["temperature"] for f in fits])),
                        "min": float(np.min([f["temperature"] for f in fits])),
                        "max": float(np.max([f["temperature"] for f in fits]))},
        "ece_pool": {c: {"mean": float(np.mean(v)), "median": float(np.median(v)), "max": float(np.max(v))}
                     for c, v in ece.items()},
        "ece_seed_oof": ({"uncalibrated": float(np.mean([c["seed_oof_ece"][0] for c in cal])),
                          "served": float(np.mean([c["seed_oof_ece"][1] for c in cal])),
                          "log_loss_uncalibrated": float(np.mean([c["seed_oof_log_loss"][0] for c in cal])),
                          "log_loss_served": float(np.mean([c["seed_oof_log_loss"][1] for c in cal]))} if cal else None),
        "summary": summary,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        from molal.plots import reliability_diagram

        for c, bs in bins.items():  # pooled over draws
            count = np.sum([b["count"] for b in bs], axis=0)
            pooled = {"edges": bs[0]["edges"], "count": count,
                      "accuracy": np.sum([b["accuracy"] * b["count"] for b in bs], axis=0) / np.maximum(count, 1),
                      "confidence": np.sum([b["confidence"] * b["count"] for b in bs], axis=0) / np.maximum(count, 1)}
            path = Path(f"{args.plot}-{c}.png")
            reliability_diagram(pooled, path, title=f"MoLAM on {name}, {c}: ECE {np.mean(ece[c]):.3f}")
            err.log(f"wrote {path}")
    con = Console()
    t = Table(title=f"{name}: ECE of MoLAM's confidence, mean over {args.draws} draws")
    for col in ("confidence", "ECE pool (gold)", "ECE seeds out-of-fold"):
        t.add_column(col, justify="left" if col == "confidence" else "right")
    oof = result["ece_seed_oof"] or {}
    for c in conf_names:
        t.add_row(c, f"{result['ece_pool'][c]['mean']:.4f}", f"{oof[c]:.4f}" if c in oof else "-")
    con.print(t)
    for c in conf_names:
        t = Table(title=f"{name}, {c} confidence: δ = {args.delta}, {args.draws} fits × {args.audits} audits, "
                        "coverage and realised error over the remaining pool")
        for col in ("rule", "audit", "ε", "certified", "coverage", "error", "fail", "fail (pool)", "fail ≤ δ"):
            t.add_column(col, justify="left" if col == "rule" else "right")
        for s in summary[c]:
            t.add_row(s["rule"], str(s["audit"]), f"{s['epsilon']:g}", f"{s['certified']:.2f}", f"{s['coverage']:.3f}",
                      "-" if s["error"] is None else f"{s['error']:.4f}", f"{s['fail']:.2f}", f"{s['fail_pool']:.2f}",
                      "yes" if s["holds"] else "NO")
        con.print(t)


if __name__ == "__main__":
    main()
