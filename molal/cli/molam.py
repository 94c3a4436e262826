"""``molal molam fit`` / ``molal molam eval``: train the aggregator on seed labels and evaluate it.

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

molam_app = typer.Typer(help="MoLAM: the learned aggregator of the LLMs (fit on seed labels, evaluate).",
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


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.add_typer(molam_app, name="molam")
