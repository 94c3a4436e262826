"""Own data, as a user without a preset meets it (issue 29): the offline embedding scorers, the shipped small
LLMs with the recipe README.md documents, and MoLAM over them, with and without one plain line per class.

    nice -n 10 python bench/own_data.py --datasets ag_news,sst2,pubmed-20k-rct,trec --n 400 --draws 5 \
        --json-out bench/out/own_data.json

Per dataset: ``--n`` texts of its test split (a fixed random sample), the classes in molal's order, no preset.
Descriptions: ``bench/configs/own_data_descriptions.toml`` (one plain line per class, written before any result
was seen). The LLMs: ``--recipe`` (default ``bench/configs/cpu_llms.toml``, the documented recipe). Every
answer goes through molal's annotation cache (``--cache``), so a rerun annotates nothing; texts/s are those of
the run that annotated (kept beside the cache in ``<cache>.timing.json``).

Mixtures: the scorers alone (the offline default: 4 MiniLM scorers, a 5th whose label texts are the
descriptions when there are descriptions), the scorers + each LLM, the scorers + all LLMs. For each, over
``--draws`` seed draws (numpy ``default_rng(draw)``, ``--seeds`` gold labels as the seeds): MoLAM's accuracy on
the other texts, and for each member its accuracy on those texts and molal's member check on the seeds
(:func:`molal.aggregation.members.check_members`: flagged as at or below chance, or collapsed onto one class).
Prints one JSON object, then tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from molal import LLMOutputs  # noqa: E402
from molal.datasets import CLASS_NAMES  # noqa: E402

DESCRIPTIONS = REPO / "bench" / "configs" / "own_data_descriptions.toml"
RECIPE = REPO / "bench" / "configs" / "cpu_llms.toml"


def sample(name: str, n: int) -> tuple[list[str], np.ndarray, list[str]]:
    from molal.resources import shared_data_dir

    base = shared_data_dir()
    if base is None:
        raise SystemExit("shared data not found (MOLAL_SHARED_DATA)")
    rows = [json.loads(x) for x in (base / name / "test.jsonl").read_text().splitlines() if x.strip()]
    pick = np.random.default_rng(0).permutation(len(rows))[:n]
    classes = list(CLASS_NAMES[name])
    return [rows[i]["text"] for i in pick], np.array([classes.index(rows[i]["label"]) for i in pick]), classes


def scorers(descriptions: dict[str, str] | None):
    from molal.annotators import Mixture

    return list(Mixture.default(class_names=["a", "b"], descriptions=descriptions or None).annotators)


def llms(recipe: Path, only: list[str] | None):
    from molal.annotators import Mixture

    anns = Mixture.from_config(recipe).annotators
    return [a for a in anns if only is None or a.name in only]


def annotate_one(ann, texts, classes, desc, task, cache, timing: dict, key: str) -> LLMOutputs:
    from molal.annotators import Mixture

    mix = Mixture([ann], descriptions=desc, task=task)
    res = mix.annotate(texts, classes, cache=cache, progress=True)
    if len(res.done_idx) != len(texts):
        raise SystemExit(f"{ann.name}: {len(res.failed)} texts failed: {sorted(set(res.failed.values()))[:3]}")
    st = res.stats["per_annotator"][ann.name]
    if st["annotated"]:
        timing[key] = {"texts": st["annotated"], "seconds": round(st["seconds"], 2)}
    return res.outputs


def run_dataset(name: str, args, cache, timing: dict) -> dict:
    from molal.aggregation.members import check_members
    from molal.molam import MoLAM

    texts, gold, classes = sample(name, args.n)
    conf = tomllib.loads(DESCRIPTIONS.read_text())[name]
    settings = {"none": ({}, None), "descriptions": (conf["descriptions"], None)}
    if args.task:
        settings["descriptions+task"] = (conf["descriptions"], conf["task"])
    out: dict = {"n": len(texts), "classes": classes, "settings": {}}
    llm_list = llms(Path(args.recipe), args.llms.split(",") if args.llms else None)
    for sname, (desc, task) in settings.items():
        members = scorers(desc) + ([] if args.scorers_only else llm_list)
        parts, kinds = [], {}
        for a in members:
            key = f"{name}|{sname}|{a.name}|{json.dumps(a.identity(), sort_keys=True, default=str)}"
            t0 = time.perf_counter()
            parts.append(annotate_one(a, texts, classes, desc, task, cache, timing, key))
            kinds[a.name] = a.kind
            tm = timing.get(key)
            print(f"{name} {sname} {a.name}: {time.perf_counter() - t0:.1f} s"
                  + (f" (annotated at {tm['texts'] / tm['seconds']:.2f} texts/s)" if tm else ""), file=sys.stderr)
            if hasattr(a, "close"):
                a.close()
        outputs = LLMOutputs.concat_llms(parts)
        sc = [m for m, k in kinds.items() if k == "scorer"]
        ll = [m for m, k in kinds.items() if k != "scorer"]
        subsets = {"scorers": sc, **{f"scorers+{m}": sc + [m] for m in ll}}
        if len(ll) > 1:
            subsets["scorers+" + "+".join(ll)] = sc + ll
        norm = outputs.normalized_probs()
        per_member = {}
        for j, m in enumerate(outputs.llm_names):
            pred = norm[:, j].argmax(1)
            top = np.bincount(pred, minlength=len(classes))
            key = next((k for k in timing if k.startswith(f"{name}|{sname}|{m}|")), None)
            tm = timing.get(key) if key else None
            per_member[m] = {"kind": kinds[m], "accuracy_all": float((pred == gold).mean()),
                             "top_class": classes[int(top.argmax())], "top_share": float(top.max() / len(pred)),
                             "texts_per_s": round(tm["texts"] / tm["seconds"], 2) if tm and tm["seconds"] else None}
        res: dict = {"members": per_member, "mixtures": {}}
        for sub, names in subsets.items():
            o = outputs.select_llms(names)
            rows = []
            for d in range(args.draws):
                idx = np.random.default_rng(d).choice(len(gold), args.seeds, replace=False)
                rest = np.setdiff1d(np.arange(len(gold)), idx)
                m = MoLAM(**json.loads(args.molam_options)).fit(o, idx, gold[idx])
                pred = m.predict(o)
                checks = check_members(o, idx, gold[idx], kinds={n: kinds[n] for n in names})
                nm = o.normalized_probs()
                rows.append({"draw": d, "molam": float((pred[rest] == gold[rest]).mean()),
                             "choice": m.metadata.get("choice"), "dropped": (m.metadata.get("members") or {}).get("dropped", []),
                             "members": {n: float((nm[rest, j].argmax(1) == gold[rest]).mean())
                                         for j, n in enumerate(names)},
                             "flagged": {c.name: c.problem for c in checks if c.problem}})
            accs = [r["molam"] for r in rows]
            res["mixtures"][sub] = {"members": names, "molam_mean": float(np.mean(accs)),
                                    "molam_std": float(np.std(accs)), "draws": rows}
            print(f"{name} {sname} {sub}: MoLAM {np.mean(accs):.3f} ± {np.std(accs):.3f}", file=sys.stderr)
        out["settings"][sname] = res
    return out


def table(results: dict) -> str:
    lines = ["| dataset | setting | mixture | MoLAM (mean ± std over draws) | Δ vs scorers | flagged (draws) |",
             "|---|---|---|---:|---:|---|"]
    for ds, r in results["datasets"].items():
        for sname, s in r["settings"].items():
            base = s["mixtures"]["scorers"]["molam_mean"]
            for sub, m in s["mixtures"].items():
                flags: dict[str, int] = {}
                for d in m["draws"]:
                    for n in d["flagged"]:
                        flags[n] = flags.get(n, 0) + 1
                fl = ", ".join(f"{n} {c}/{len(m['draws'])}" for n, c in flags.items()) or "–"
                lines.append(f"| {ds} | {sname} | {sub} | {m['molam_mean']:.3f} ± {m['molam_std']:.3f} | "
                             f"{m['molam_mean'] - base:+.3f} | {fl} |")
    lines += ["", "| dataset | setting | member | accuracy (all texts) | most predicted | texts/s |",
              "|---|---|---|---:|---|---:|"]
    for ds, r in results["datasets"].items():
        for sname, s in r["settings"].items():
            for n, m in s["members"].items():
                tps = f"{m['texts_per_s']:.2f}" if m["texts_per_s"] else "–"
                lines.append(f"| {ds} | {sname} | {n} | {m['accuracy_all']:.3f} | {m['top_class']} "
                             f"{m['top_share']:.0%} | {tps} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="ag_news,sst2,pubmed-20k-rct,trec")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--llms", default=None, help="comma list of the recipe's members to use (default all)")
    ap.add_argument("--scorers-only", action="store_true")
    ap.add_argument("--task", action="store_true", help="also a setting with the task framing")
    ap.add_argument("--molam-options", default="{}", help="JSON of MoLAM keyword arguments")
    ap.add_argument("--cache", default=str(REPO / "bench" / "out" / "own_data_cache.sqlite"))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    from molal.cache import AnnotationCache

    cache = AnnotationCache(args.cache)
    tpath = Path(args.cache + ".timing.json")
    timing = json.loads(tpath.read_text()) if tpath.exists() else {}
    t0 = time.perf_counter()
    results = {"command": " ".join(sys.argv), "n": args.n, "seeds": args.seeds, "draws": args.draws, "datasets": {}}
    try:
        for name in args.datasets.split(","):
            results["datasets"][name] = run_dataset(name, args, cache, timing)
    finally:
        tpath.write_text(json.dumps(timing, indent=1))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(results, indent=1)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text)
    print(text)
    print(table(results))


if __name__ == "__main__":
    main()
