"""``molal molam fit`` / ``molal molam eval``: train the aggregator on seed labels and evaluate it;
``molal molam certify``: the certified threshold (molal.trust) simulated over recorded outputs.

Seeds / labels file (JSONL), one labeled item per line, ``label`` = class name, the item given either by
``"index"`` (row of the outputs file) or by ``"text"`` (matched exactly against the outputs' texts)::

    {"index": 17, "label": "human"}
    {"text": "Who wrote The Night of the Iguana ?", "label": "human"}

A labeled dataset JSONL (``text`` + ``label``) therefore works as is; lines whose label is null or missing
are skipped (unlabeled).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from molal.data import DataError

molam_app = typer.Typer(help="MoLAM: the learned aggregator of the LLMs (fit on seed labels, evaluate, certify).",
                        no_args_is_help=True)

METHODS = ["molam", "best_single_llm", "majority_vote", "mean_probs", "paper_xgboost", "dawid_skene"]


def read_labeled(path: Path, outputs) -> tuple:
    """Rows and class indices of a seeds/labels JSONL against ``outputs`` (see module doc)."""
    import numpy as np

    if not path.exists():
        raise DataError(f"{path}: file not found")
    cls = {c: i for i, c in enumerate(outputs.class_names)}
    by_text: dict[str, int] | None = None
    rows, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            lab = obj.get("label")
            if lab is None:
                continue
            if str(lab) not in cls:
                raise DataError(f"{path}:{lineno}: label {lab!r} is not one of the classes {outputs.class_names}")
            if "index" in obj:
                i = obj["index"]
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < outputs.n_items:
                    raise DataError(f"{path}:{lineno}: index {i!r} is not a row of the outputs (0..{outputs.n_items - 1})")
            elif "text" in obj:
                if outputs.texts is None:
                    raise DataError(f"{path}:{lineno}: items given by text but the outputs file holds no texts; use 'index'")
                if by_text is None:
                    by_text = {}
                    for j, t in enumerate(outputs.texts):
                        by_text.setdefault(t, j)
                if obj["text"] not in by_text:
                    raise DataError(f"{path}:{lineno}: text not found in the outputs: {str(obj['text'])[:60]!r}")
                i = by_text[obj["text"]]
            else:
                raise DataError(f"{path}:{lineno}: each line needs 'index' or 'text' (and 'label')")
            rows.append(i)
            labels.append(cls[str(lab)])
    if not rows:
        raise DataError(f"{path}: no labeled items")
    rows_a = np.asarray(rows, dtype=np.int64)
    labels_a = np.asarray(labels, dtype=np.int64)
    # the same item twice: keep the first (a dataset may hold duplicate texts)
    _, first = np.unique(rows_a, return_index=True)
    first.sort()
    return rows_a[first], labels_a[first]


def _fail(exc: Exception) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[red]error:[/red] {exc}")
    raise typer.Exit(code=2)


@molam_app.command("fit")
def fit_cmd(
    outputs: Path = typer.Option(..., "--outputs", help="LLMOutputs .npz (from `molal annotate`)."),
    seeds: Path = typer.Option(..., "--seeds", help="Seed labels JSONL ({index|text, label}) or a labeled dataset."),
    out: Path = typer.Option(Path("molam.json"), "--out", help="Where to write the model (JSON)."),
    method: str = typer.Option("molam", help="|".join(METHODS)),
    seed: int = typer.Option(0, help="Random seed (folds, XGBoost)."),
) -> None:
    """Fit MoLAM (or a baseline) on the seed labels; the unlabeled rows of the outputs are used too."""
    from rich.console import Console

    from molal.data import LLMOutputs
    from molal.molam import BASELINES, MoLAM, MoLAMError

    console = Console()
    try:
        if method not in METHODS:
            raise DataError(f"unknown method {method!r}; choose from {METHODS}")
        outs = LLMOutputs.load(outputs)
        idx, labels = read_labeled(seeds, outs)
        model = MoLAM(seed=seed, progress=True) if method == "molam" else BASELINES[method]()
        with console.status(f"fitting {method} on {len(idx)} seeds, {outs.n_items} items"):
            model.fit(outs, idx, labels)
        model.save(out)
    except (DataError, MoLAMError) as exc:
        _fail(exc)
    md = model.metadata
    console.print(f"[green]wrote[/green] {out}  ({method}, {md['n_seeds']} seeds, {md['fit_seconds']:.1f} s)")
    if md.get("choice"):
        console.print(f"chosen model: [bold]{md['choice']}[/bold]  (best single LLM on seeds: "
                      f"{md['best_single_source']} {md['best_single_seed_accuracy']:.3f})")
    if md.get("classes_unseen_in_seeds"):
        console.print(f"classes absent from the seeds (predicted from the LLMs' evidence): {md['classes_unseen_in_seeds']}")


@molam_app.command("eval")
def eval_cmd(
    model_path: Path = typer.Option(..., "--model", help="Model file from `molal molam fit`."),
    outputs: Path = typer.Option(..., "--outputs", help="LLMOutputs .npz."),
    labels_path: Path = typer.Option(..., "--labels", help="Labeled items to evaluate on ({index|text, label} JSONL)."),
    seeds: Path | None = typer.Option(None, "--seeds", help="Seed labels: excluded from the evaluation; per-LLM accuracy on them."),
    out_dir: Path = typer.Option(Path("molam-eval"), "--out-dir", help="Where to write report.json and the PNGs."),
) -> None:
    """Accuracy, macro-F1, calibration error, per-class recall; per-LLM accuracy (seeds and eval set);
    reliability diagram and per-LLM confusion matrices as PNG."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from molal.data import LLMOutputs
    from molal.io import atomic_write_json
    from molal.metrics import confusion_matrix, evaluate, reliability_bins
    from molal.molam import MoLAMError, load_aggregator
    from molal.plots import confusion_grid, reliability_diagram

    console = Console()
    try:
        model = load_aggregator(model_path)
        outs = LLMOutputs.load(outputs)
        rows, y = read_labeled(labels_path, outs)
        seed_rows = seed_y = None
        if seeds is not None:
            seed_rows, seed_y = read_labeled(seeds, outs)
            keep = ~np.isin(rows, seed_rows)
            rows, y = rows[keep], y[keep]
            if len(rows) == 0:
                raise DataError("every labeled item is a seed: nothing left to evaluate")
        proba = model.predict_proba(outs)
    except (DataError, MoLAMError) as exc:
        _fail(exc)
    k, names = outs.n_classes, outs.class_names
    report = {"model": str(model_path), "kind": model.kind, "choice": model.metadata.get("choice"),
              "eval": evaluate(proba[rows], y, names)}
    votes = outs.consistency if outs.consistency is not None else outs.normalized_probs()
    per_llm = {}
    cms = {}
    for m, name in enumerate(outs.llm_names):
        pred = (votes[:, m] + 1e-3 * outs.normalized_probs()[:, m]).argmax(axis=1)
        entry = {"eval_accuracy": float((pred[rows] == y).mean())}
        if seed_rows is not None:
            entry["seed_accuracy"] = float((pred[seed_rows] == seed_y).mean())
        per_llm[name] = entry
        cms[name] = confusion_matrix(y, pred[rows], k)
    cms[f"{model.kind}"] = confusion_matrix(y, proba[rows].argmax(axis=1), k)
    report["per_llm"] = per_llm
    if seed_rows is not None:
        report["seed_accuracy"] = float((proba[seed_rows].argmax(axis=1) == seed_y).mean())
    out_dir.mkdir(parents=True, exist_ok=True)
    reliability_diagram(reliability_bins(proba[rows], y), out_dir / "reliability.png",
                        title=f"{model.kind}: ECE {report['eval']['ece']:.3f}")
    confusion_grid(cms, names, out_dir / "confusion_per_llm.png")
    atomic_write_json(out_dir / "report.json", report)

    t = Table(title=f"{model.kind} on {report['eval']['n']} labeled items" + (" (seeds excluded)" if seeds else ""))
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("accuracy", "macro_f1", "ece"):
        t.add_row(key, f"{report['eval'][key]:.4f}")
    for c, r in report["eval"]["per_class_recall"].items():
        t.add_row(f"recall {c}", "-" if r is None else f"{r:.3f}")
    console.print(t)
    t2 = Table(title="per-LLM accuracy (sampled votes where recorded, else argmax)")
    t2.add_column("LLM")
    t2.add_column("eval set", justify="right")
    if seed_rows is not None:
        t2.add_column("seeds", justify="right")
    for name, e in per_llm.items():
        t2.add_row(name, f"{e['eval_accuracy']:.3f}", *([f"{e['seed_accuracy']:.3f}"] if seed_rows is not None else []))
    console.print(t2)
    console.print(f"wrote {out_dir}/report.json, reliability.png, confusion_per_llm.png")


def _floats(text: str, name: str, lo: float, hi: float) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DataError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not vals or not all(lo < v < hi for v in vals):
        raise DataError(f"{name}: every value must be in ({lo:g}, {hi:g}), got {text!r}")
    return vals


@molam_app.command("certify")
def certify_cmd(
    outputs: Path | None = typer.Option(None, "--outputs", help="LLMOutputs .npz (default: the bundled TREC recording "
                                        "of 5 real LLMs)."),
    labels_path: Path | None = typer.Option(None, "--labels", help="Gold labels ({index|text, label} JSONL, e.g. the "
                                            "annotated dataset); rows without one are left out (default with the "
                                            "bundled recording: its TREC labels)."),
    epsilon: str = typer.Option("0.05", "--epsilon", help="Largest acceptable error among accepted items (comma-"
                                "separated for several)."),
    delta: float = typer.Option(0.1, "--delta", help="Largest acceptable probability that a certificate is wrong."),
    audit_size: str = typer.Option("100", "--audit-size", help="Audit items per draw (comma-separated for several)."),
    draws: int = typer.Option(20, "--draws", min=1, max=10_000, help="Random draws of the seeds, each one MoLAM fit."),
    audits: int = typer.Option(5, "--audits", min=1, max=1000, help="Random audits of each size per fit."),
    n_seeds: int = typer.Option(50, "--seeds", min=2, help="Random seed labels per draw."),
    first_draw: int = typer.Option(0, "--first-draw", min=0, help="Draws first_draw .. first_draw + draws - 1."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write every draw's record and the summary here."),
) -> None:
    """Simulate the certified threshold: per draw, random seeds fit MoLAM, a random audit of the other items
    sets the threshold (molal.trust.certify); report the threshold, the coverage of the remaining pool and the
    realised error among its accepted items against gold, beside the naive rule "confidence >= 1 - epsilon".
    Gold is read only for the seeds, the audit (the simulated people) and the realised error."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from molal.data import LLMOutputs, load_dataset
    from molal.io import atomic_write_json
    from molal.molam import MoLAMError
    from molal.progress import progress_bar
    from molal.resources import asset_path
    from molal.simulate_trust import simulate_certification
    from molal.trust import TrustError

    console = Console()
    try:
        epsilons = _floats(epsilon, "--epsilon", 0.0, 1.0)
        if not 0 < delta < 1:
            raise DataError(f"--delta must be in (0, 1), got {delta}")
        try:
            sizes = [int(v) for v in audit_size.split(",") if v.strip()]
        except ValueError:
            raise DataError(f"--audit-size: expected comma-separated integers, got {audit_size!r}") from None
        if outputs is None and labels_path is None:  # the bundled recording: its labels, row for row
            outs = LLMOutputs.load(asset_path("trec_recorded.npz"))
            gold = load_dataset(asset_path("trec.jsonl"), class_names=list(outs.class_names)).labels
        else:
            outs = LLMOutputs.load(outputs or asset_path("trec_recorded.npz"))
            if labels_path is None:
                raise DataError("--labels is needed with --outputs: the gold labels the realised error is measured on")
            rows, gold = read_labeled(labels_path, outs)
            order = np.argsort(rows)
            gold = gold[order]
            if len(rows) < outs.n_items:  # only the items with a gold label
                outs = outs.subset(rows[order])
        rest = outs.n_items - n_seeds
        if not sizes or not all(0 < s < rest for s in sizes):
            raise DataError(f"--audit-size: each must be between 1 and {rest - 1} (the items that are not seeds)")
        with progress_bar(f"certify: {draws} draws (a MoLAM fit each)", draws) as bar:
            res = simulate_certification(outs, gold, draws=draws, first_draw=first_draw, n_seeds=n_seeds,
                                         epsilons=epsilons, delta=delta, audit_sizes=sizes, audits=audits,
                                         progress=lambda i, n: bar.update(completed=i))
    except (DataError, MoLAMError, TrustError, ValueError) as exc:
        _fail(exc)
    if json_out is not None:
        atomic_write_json(json_out, {"epsilons": epsilons, "delta": delta, "audit_sizes": sizes, "draws": draws,
                                     "audits_per_fit": audits,
                                     "first_draw": first_draw, "n_seeds": n_seeds, **res})
    for conf, summary in res["summary"].items():
        t = Table(title=f"{outs.n_items} items, {n_seeds} seeds, δ = {delta:g}, {draws} fits × {audits} audits "
                        f"({conf} confidence): coverage and realised error over the remaining pool")
        for col in ("rule", "audit", "ε", "threshold", "certified", "coverage", "error", "error > ε"):
            t.add_column(col, justify="left" if col == "rule" else "right")
        for s in summary:
            t.add_row(s["rule"], str(s["audit"]), f"{s['epsilon']:g}",
                      "-" if s["threshold"] is None else f"{s['threshold']:.4f}", f"{s['certified']:.0%}",
                      f"{s['coverage']:.3f}", "-" if s["error"] is None else f"{s['error']:.4f}",
                      f"{s['fail']:.0%}" + ("" if s["holds"] or s["rule"] == "naive" else " (> δ!)"))
        console.print(t)
    console.print("ltt-pool: the certificate with the pool's confidences; ltt-audit: from the audit alone; naive: "
                  "confidence >= 1 - ε. threshold: median over the audits with a certificate; error: mean over them; "
                  "error > ε: share of all audits.")
    if json_out is not None:
        console.print(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.add_typer(molam_app, name="molam")
