"""Benchmark the human-free AL loop on TREC: final student micro-F1 per label mode and query strategy.

Runs the grid strategies × modes × seeds with ``molal.simulate.run_simulation`` (one process, so the
frozen-encoder preset computes the MiniLM embeddings once), writes one result JSON per run into --out-dir,
prints a JSON line per run and a summary table (mean ± std over seeds of the micro-F1 after the last round,
and of the accuracy of the labels the student was trained on), and an overlay PNG of the learning curves.

Presets (the student; everything else as in ``molal simulate``):

* ``finetune`` — full fine-tuning of MiniLM-L6 (the product default), AdamW lr 5e-5, max length 64,
  ``--epochs`` (default 2) — slow on CPU (minutes per round);
* ``frozen``   — MiniLM-L6 kept frozen, a linear head trained with the same loss/optimiser (lr 2e-3,
  40 epochs) — seconds per round; a weaker student, used to run the full grid on a 2-core CPU.

    .venv/bin/python bench/simulate.py --preset frozen --strategies random,coreset --modes molam,oracle,majority \
        --seeds 0,1,2 --out-dir bench/out/simulate
    .venv/bin/python bench/simulate.py --summarize bench/out/simulate      # table from existing JSONs
    .venv/bin/python bench/simulate.py --preset frozen --strategies random --modes molam \
        --molam-text-features minilm --seeds 0,1,2                  # MoLAM + its MiniLM text model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

#: fidelity variants of the loop (molal.learner): the default is the paper's code (MoLLIA)
VARIANTS = {
    "paper": {},  # weights kept from the querying round, λ counts the seed round as 1
    "each_round": {"weights": "each_round"},
    "offset0": {"round_offset": 0},
    "molal-2026-11": {"weights": "each_round", "round_offset": 0},  # molal's simulate before the learner
    # the query strategies as molal ran them before 2026-12 (NoiseStability: no normalisation, biases
    # perturbed too; BEMPS: no per-model variance term); the loop as the paper's
    "old-strategies": {"strategy_options": "old"},
}
OLD_STRATEGY_OPTIONS = {"noise_stability": {"normalize": False, "weights_only": False},
                        "bemps": {"variance_term": False}}


def variant_config(name: str, strategy: str) -> dict:
    """SimulationConfig fields of a fidelity variant for ``strategy``."""
    kw = dict(VARIANTS[name])
    if kw.get("strategy_options") == "old":
        kw["strategy_options"] = OLD_STRATEGY_OPTIONS.get(strategy, {})
    return kw


def variant_of(config: dict) -> str:
    """The name of the fidelity variant a result was run with."""
    defaults = {"weights": "at_add", "round_offset": 1, "strategy_options": {}}
    for name in VARIANTS:
        want = {**defaults, **variant_config(name, config["strategy"])}
        if all(config.get(k, defaults[k]) == v for k, v in want.items()):
            return name
    return "?"


PRESETS = {
    "finetune": {"freeze_encoder": False, "lr": 5e-5, "epochs": 2, "batch_size": 16},
    "frozen": {"freeze_encoder": True, "lr": 2e-3, "epochs": 40, "batch_size": 16},
}


def summarize(results) -> list[dict]:
    groups: dict[tuple, list] = {}
    for r in results:
        c = r.config
        preset = "frozen" if c.get("freeze_encoder") else "finetune"
        groups.setdefault((preset, c["strategy"], r.mode_label, variant_of(c)), []).append(r)
    rows = []
    for (preset, strategy, mode, variant), runs in sorted(groups.items()):
        f1 = np.array([r.final["micro_f1"] for r in runs])
        maf1 = np.array([r.final["macro_f1"] for r in runs])
        lab = np.array([r.final["train_label_acc"] for r in runs])
        secs = np.array([r.metadata.get("seconds", np.nan) for r in runs])
        stops = [next((x for x in r.records if x.get("stop_rule_met")), None) for r in runs]
        rows.append({
            "preset": preset, "strategy": strategy, "mode": mode, "variant": variant,
            "seeds": sorted(r.config["seed"] for r in runs),
            "stop_round": [s["round"] if s else None for s in stops],
            "stop_micro_f1_mean": round(float(np.mean([(s or r.final)["micro_f1"] for s, r in zip(stops, runs, strict=True)])), 4),
            "rounds": runs[0].final["round"], "train_size": runs[0].final["train_size"],
            "micro_f1_mean": round(float(f1.mean()), 4), "micro_f1_std": round(float(f1.std()), 4),
            "macro_f1_mean": round(float(maf1.mean()), 4),
            "label_acc_mean": round(float(lab.mean()), 4), "seconds_per_run": round(float(np.nanmean(secs)), 1),
        })
    return rows


def print_table(rows: list[dict]) -> None:
    hdr = (f"{'preset':<9}{'strategy':<16}{'mode':<12}{'variant':<15}{'seeds':<10}{'n':>5}{'micro-F1':>18}"
           f"{'macro-F1':>10}{'label acc':>11}{'stop at':>12}{'F1 there':>10}{'s/run':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        seeds = ",".join(map(str, r["seeds"]))
        stop = ",".join("-" if x is None else str(x) for x in r.get("stop_round", []))
        print(f"{r['preset']:<9}{r['strategy']:<16}{r['mode']:<12}{r.get('variant', 'paper'):<15}{seeds:<10}"
              f"{r['train_size']:>5}{r['micro_f1_mean']:>10.4f} ± {r['micro_f1_std']:.4f}{r['macro_f1_mean']:>10.4f}"
              f"{r['label_acc_mean']:>11.4f}{stop:>12}{r.get('stop_micro_f1_mean', float('nan')):>10.4f}"
              f"{r['seconds_per_run']:>8.0f}")


def time_round(n: int, preset_name: str, epochs: int | None, threads: int | None) -> int:
    """Seconds of one ``Student.fit`` on n TREC train items (gold labels, half with negatives) + inference."""
    import os

    import torch

    from molal.datasets import get_dataset
    from molal.student import Student

    if threads:
        torch.set_num_threads(threads)
    preset = dict(PRESETS[preset_name])
    if epochs:
        preset["epochs"] = epochs
    tr = get_dataset("trec").split("train")
    idx = np.random.default_rng(0).choice(len(tr), n, replace=False)
    texts = [tr.texts[i] for i in idx]
    y = tr.labels[idx]
    neg = np.zeros((n, len(tr.class_names)), bool)
    neg[np.arange(n // 2), (y[: n // 2] + 1) % len(tr.class_names)] = True
    st = Student(tr.class_names, max_length=64, seed=0, **preset)
    t0 = time.perf_counter()
    st.fit(texts, y, negatives=neg, round_t=5, val_texts=texts[:50], val_labels=y[:50], progress=False)
    fit_s = time.perf_counter() - t0
    test = get_dataset("trec").split("test")
    t0 = time.perf_counter()
    pred = st.predict(test.texts)
    inf_s = time.perf_counter() - t0
    row = {"preset": preset_name, "n_train": n, "epochs": st.metadata["epochs"], "max_length": 64,
           "fit_seconds": round(fit_s, 1), "test_infer_seconds_500": round(inf_s, 1),
           "test_micro_f1_gold_labels": round(float((pred == test.labels).mean()), 4),
           "torch_threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    from molal.simulate import (
        SimulationConfig,
        SimulationResult,
        load_simulation_data,
        mode_label,
        plot_learning_curves,
        run_simulation,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="frozen")
    ap.add_argument("--strategies", default="random,coreset")
    ap.add_argument("--modes", default="molam,oracle,majority")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=11, help="rounds after the seed round (11: the paper's 50 -> 600)")
    ap.add_argument("--variants", default="paper",
                    help=f"fidelity variants of the loop, comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    ap.add_argument("--candidates", type=int, default=None, help="unlabelled candidates scored per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--molam-text-features", default=None, metavar="ENCODER",
                    help="molam/hybrid modes: MoLAM's transductive text model on this encoder's embeddings "
                         "(e.g. minilm); result files get a '+text' suffix")
    ap.add_argument("--out-dir", default="bench/out/simulate")
    ap.add_argument("--skip-existing", action="store_true", help="do not re-run configs whose JSON exists")
    ap.add_argument("--summarize", default=None, help="only print the table of the result JSONs in this folder")
    ap.add_argument("--time-round", type=int, default=None, metavar="N",
                    help="only time one student training round on N TREC items (the preset's settings)")
    a = ap.parse_args(argv)
    if a.time_round:
        return time_round(a.time_round, a.preset, a.epochs, a.threads)

    if a.summarize:
        results = [SimulationResult.load(p) for p in sorted(Path(a.summarize).glob("*.json")) if not p.name.startswith("summary")]
        print_table(summarize(results))
        return 0
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preset = dict(PRESETS[a.preset])
    if a.epochs:
        preset["epochs"] = a.epochs
    data = None
    results = []
    variants = a.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    for seed, strategy, mode, variant in [(int(s), st, m, v) for s in a.seeds.split(",") for st in a.strategies.split(",")
                                          for m in a.modes.split(",") for v in variants]:
        text = a.molam_text_features if mode in ("molam", "hybrid") else None
        tag = "" if variant == "paper" else f"-{variant}"
        path = out_dir / f"{a.preset}-{strategy}-{mode_label(mode, text)}{tag}-s{seed}.json"
        if a.skip_existing and path.exists():
            results.append(SimulationResult.load(path))
            continue
        cfg = SimulationConfig(
            strategy=strategy, mode=mode, seed=seed, rounds=a.rounds, budget=a.budget,  # type: ignore[arg-type]
            candidates=a.candidates, threads=a.threads, progress=False, molam_text_features=text, **preset,
            **variant_config(variant, strategy),
        )
        data = data or load_simulation_data(cfg)
        t0 = time.perf_counter()
        res = run_simulation(cfg, data=data)
        res.save(path)
        results.append(res)
        f = res.final
        print(json.dumps({"preset": a.preset, "strategy": strategy, "mode": mode_label(mode, text),
                          "variant": variant, "seed": seed,
                          "micro_f1": round(f["micro_f1"], 4), "macro_f1": round(f["macro_f1"], 4),
                          "label_acc": round(f["train_label_acc"], 4), "train_size": f["train_size"],
                          "seconds": round(time.perf_counter() - t0, 1),
                          "max_round_train_s": max(r["seconds_train"] for r in res.records)}), flush=True)
    rows = summarize(results)
    print()
    print_table(rows)
    from molal.io import atomic_write_json

    atomic_write_json(out_dir / f"summary-{a.preset}.json", {"rows": rows}, mode=0o644)
    plot_learning_curves(results, out_dir / f"curves-{a.preset}.png", title=f"TREC, {a.preset} student")
    return 0


if __name__ == "__main__":
    sys.exit(main())
