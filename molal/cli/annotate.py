"""``molal annotate``: run a mixture of LLMs over a pool of texts, cached, and save the LLMOutputs."""

from __future__ import annotations

from pathlib import Path

import typer


def _agreement(outputs) -> tuple:  # (pairwise (L,L), with-majority (L,))
    import numpy as np

    pred = outputs.normalized_probs().argmax(axis=2)  # (n, L)
    n, n_llm = pred.shape
    pair = np.ones((n_llm, n_llm))
    for a in range(n_llm):
        for b in range(n_llm):
            pair[a, b] = float((pred[:, a] == pred[:, b]).mean()) if n else float("nan")
    maj = np.zeros(n_llm)
    if n:
        k = outputs.n_classes
        votes = np.zeros((n, k))
        for j in range(n_llm):
            votes[np.arange(n), pred[:, j]] += 1
        majority = votes.argmax(axis=1)
        maj = (pred == majority[:, None]).mean(axis=0)
    return pair, maj


def _read_descriptions(path: Path, class_names: list[str]) -> dict[str, str]:
    """class -> description from a JSON, TOML or YAML file; unknown classes are an error naming the file."""
    import json
    import tomllib

    import yaml

    if not path.exists():
        raise ValueError(f"{path}: descriptions file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot parse ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: expected a table class name -> description text")
    unknown = [k for k in data if k not in class_names]
    if unknown:
        raise ValueError(f"{path}: field {unknown[0]!r} is not one of the classes {class_names}")
    return dict(data)


def annotate_command(
    data: Path = typer.Option(..., "--data", help="JSONL pool: one object per line with a text field (and optionally a label)."),
    out: Path = typer.Option(..., "--out", help="Where to write the LLMOutputs (.npz)."),
    config: Path | None = typer.Option(None, "--config", help="Mixture config (TOML/YAML). Default: the offline default mixture."),
    cache: str | None = typer.Option(
        None, "--cache", help="Annotation cache: a SQLite file or a postgresql:// URL. Default: $MOLAL_DATABASE_URL "
                              "if set, else $MODEL_DIR/annotation_cache.sqlite."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the annotation cache."),
    labels: str | None = typer.Option(None, "--labels", help="Comma-separated class names, in order (default: labels in the data, sorted)."),
    text_field: str = typer.Option("text", "--text-field", help="Name of the text field."),
    label_field: str = typer.Option("label", "--label-field", help="Name of the (optional) gold label field."),
    descriptions: Path | None = typer.Option(
        None, "--descriptions", help="JSON/TOML/YAML table class name -> description (added to prompts)."
    ),
    time_budget: float | None = typer.Option(None, "--time-budget", help="Stop calling models after this many seconds."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    estimate_only: bool = typer.Option(False, "--estimate", help="Only estimate what annotating the pool will take "
                                       "(uncached texts, tokens, money at the configured prices, time from --sample "
                                       "texts), then exit."),
    sample: int = typer.Option(8, "--sample", min=0, help="Texts annotated (and cached) to time the estimate."),
    max_usd: float | None = typer.Option(None, "--max-usd", min=0, help="Refuse to annotate when the estimate is above "
                                         "this many US dollars (paid-API annotators need usd_per_mtok_* prices)."),
    max_hours: float | None = typer.Option(None, "--max-hours", min=0, help="Refuse when the estimate is above this "
                                           "many hours."),
    check: bool = typer.Option(False, "--check", help="Only check that each server has the features its scoring needs "
                               "(logprobs, top_logprobs depth, an aligned echo, n, prompt lists), then exit."),
    engine: str = typer.Option("local", "--engine", help="'local' (this process) or 'ray' (Ray Data actors writing "
                               "the same cache; pip install 'molal[ray]')."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="With --engine ray: a running cluster ('auto', "
                                           "'ray://head:10001'). Default: a local cluster on this machine."),
    workers: int = typer.Option(2, "--workers", min=1, max=4096, help="With --engine ray: annotation actors."),
    shard_size: int = typer.Option(256, "--shard-size", min=1, max=1_000_000,
                                   help="With --engine ray: texts per shard."),
    gpus_per_worker: float = typer.Option(0.0, "--gpus-per-worker", min=0.0,
                                          help="With --engine ray: GPUs each actor reserves."),
) -> None:
    """Annotate a pool with a mixture of LLMs (cache first) and save their probabilities/consistency."""
    import time

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from molal.annotators import ConfigError, Mixture
    from molal.annotators.base import AnnotatorError
    from molal.cache import AnnotationCache, CacheError
    from molal.config import get_settings
    from molal.data import DataError, load_dataset
    from molal.io import atomic_write_json

    console = Console(stderr=True)
    class_names = [c.strip() for c in labels.split(",") if c.strip()] if labels else None
    if labels is not None and not class_names:
        console.print("[red]error:[/] --labels is empty")
        raise typer.Exit(2)
    try:
        ds = load_dataset(data, class_names=class_names, text_field=text_field, label_field=label_field)
    except DataError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    try:
        mixture = Mixture.from_config(config) if config else Mixture.default(ds.texts, ds.class_names)
    except ConfigError as exc:
        console.print(f"[red]config error:[/] {exc}")
        raise typer.Exit(2) from None
    if mixture.wants_seed_examples():
        console.print('[yellow]note:[/] examples = "seeds" takes a Label Studio project\'s labelled tasks (the training '
                      "job fills them in); here those prompts run without examples")
    if check:
        bad = 0
        for a in mixture.annotators:
            if not hasattr(a, "check_server"):
                console.print(f"{a.name}: runs in this process (nothing to check)")
                continue
            try:
                console.print(f"{a.name}: [green]ok[/] {a.check_server()}")
            except AnnotatorError as exc:
                bad += 1
                console.print(f"{a.name}: [red]failed[/] {exc}")
        mixture.close()
        raise typer.Exit(1 if bad else 0)
    desc = None
    if descriptions is not None:
        try:
            desc = _read_descriptions(descriptions, ds.class_names)
        except ValueError as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
    if engine not in ("local", "ray"):
        console.print(f"[red]error:[/] --engine must be 'local' or 'ray', got {engine!r}")
        raise typer.Exit(2)
    if engine == "ray" and no_cache:
        console.print("[red]error:[/] --engine ray writes through the annotation cache: drop --no-cache")
        raise typer.Exit(2)
    if engine == "ray" and time_budget:
        console.print("[red]error:[/] --time-budget applies to --engine local only")
        raise typer.Exit(2)
    cache_obj = None
    cache_target: str | Path | None = None
    if not no_cache:
        settings = get_settings()
        if cache:
            cache_target = cache
        elif settings.database_url is not None:
            cache_target = settings.database_url.get_secret_value()
        else:
            cache_target = settings.model_dir / "annotation_cache.sqlite"
        try:
            cache_obj = AnnotationCache(cache_target)
        except CacheError as exc:
            console.print(f"[red]cache error:[/] {exc}")
            raise typer.Exit(2) from None
    from molal.embeddings import use_store

    # the texts' embeddings are kept beside the annotations (none with --no-cache: everything is computed)
    use_store(None if cache_target is None else str(cache_target), get_settings().embedding_store_mb)
    console.print(
        f"[bold]{len(ds)}[/] texts, {len(ds.class_names)} classes {ds.class_names}, mixture: {mixture}"
        + (f", cache: {cache_obj.target}" if cache_obj else ", no cache")
    )
    if estimate_only or max_usd is not None or max_hours is not None:
        from molal.annotators.cost import estimate

        try:
            est = estimate(mixture, ds.texts, ds.class_names, cache=cache_obj, descriptions=desc,
                           sample=sample if (estimate_only or max_hours is not None) else 0)
        except (ValueError, AnnotatorError) as exc:
            console.print(f"[red]error:[/] {exc}")
            mixture.close()
            raise typer.Exit(1) from None
        _print_estimate(console, est)
        why = est.over_budget(max_usd, max_hours)
        if estimate_only or why is not None:
            mixture.close()
            if cache_obj is not None:
                cache_obj.close()
            if why is not None:
                console.print(f"[red]over budget:[/] {why}; nothing annotated beyond the timing sample")
                raise typer.Exit(2)
            raise typer.Exit(0)
    deadline = time.monotonic() + time_budget if time_budget else None
    try:
        if engine == "ray":
            from molal.annotators.engine import RayEngine

            res = RayEngine(address=ray_address, workers=workers, shard_size=shard_size,
                            gpus_per_worker=gpus_per_worker).annotate(
                mixture, ds.texts, ds.class_names, cache=str(cache_target), descriptions=desc, progress=progress)
        else:
            res = mixture.annotate(
                ds.texts, ds.class_names, cache=cache_obj, descriptions=desc, progress=progress, deadline=deadline
            )
    except (ValueError, AnnotatorError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        mixture.close()
        if cache_obj is not None:
            cache_obj.close()
        if engine == "ray":
            from molal.annotators.engine import shutdown

            shutdown()
    st = res.stats
    outputs = res.outputs
    outputs.save(out)
    stats_path = out.with_name(out.name + ".stats.json")
    atomic_write_json(
        stats_path,
        {**st, "done_idx": res.done_idx.tolist(), "failed": {str(k): v for k, v in res.failed.items()}, "data": str(data)},
        mode=0o644,
    )

    gold = ds.labels[res.done_idx] if ds.labels is not None else None
    pair, maj = _agreement(outputs)
    pred = outputs.normalized_probs().argmax(axis=2) if len(outputs) else np.zeros((0, outputs.n_llms), int)
    n_gold = int((gold >= 0).sum()) if gold is not None else 0
    table = Table(title="annotators" + (f" (accuracy on {n_gold} labeled rows)" if n_gold else ""))
    for col in ("LLM", "hits", "misses", "new", "failed", "sec", "texts/s", "tok/s", "maj.agr"):
        table.add_column(col, justify="right" if col != "LLM" else "left")
    if gold is not None:
        table.add_column("acc", justify="right")
    for j, name in enumerate(outputs.llm_names):
        s = st["per_annotator"][name]
        tps = s["annotated"] / s["seconds"] if s["seconds"] > 0 and s["annotated"] else None
        toks = s["tokens"] / s["seconds"] if s["tokens"] and s["seconds"] > 0 else None
        row = [
            name, str(s["cache_hits"]), str(s["cache_misses"]), str(s["annotated"]), str(s["failed"]),
            f"{s['seconds']:.2f}", f"{tps:.1f}" if tps else "-", f"{toks:.0f}" if toks else "-",
            f"{maj[j]:.3f}" if len(outputs) else "-",
        ]
        if gold is not None:
            m = gold >= 0
            row.append(f"{(pred[m, j] == gold[m]).mean():.3f}" if m.any() else "-")
        table.add_row(*row)
    console.print(table)
    if outputs.n_llms > 1 and len(outputs):
        pt = Table(title="pairwise agreement (argmax)")
        pt.add_column("")
        for name in outputs.llm_names:
            pt.add_column(name, justify="right")
        for a, name in enumerate(outputs.llm_names):
            pt.add_row(name, *[f"{pair[a, b]:.3f}" for b in range(outputs.n_llms)])
        console.print(pt)
    if len(outputs):
        from molal.aggregation.members import check_members

        lab = np.flatnonzero(gold >= 0) if gold is not None else np.zeros(0, dtype=np.int64)
        kinds = {a.name: a.kind for a in mixture.annotators}
        calibrated = [a.name for a in mixture.annotators if getattr(a, "calibrate", None)]
        for c in check_members(outputs, lab, gold[lab] if gold is not None else lab, kinds=kinds,
                               calibrated=calibrated):
            if c.problem:
                console.print(f"[yellow]warning:[/] {c.kind} {c.line()}")
    console.print(
        f"cache: {st['cache_hits']} hits / {st['cache_misses']} misses (annotator x text); "
        f"{st['done']} done, {len(res.failed)} failed, {st['pending']} pending; "
        f"{st['seconds']:.2f}s, {st['texts_per_s']:.1f} texts/s"
        + (f", {st['tokens_per_s']:.0f} tokens/s" if st.get("tokens_per_s") else "")
    )
    console.print(f"wrote {out} ({len(outputs)} rows) and {stats_path}")
    if res.failed:
        for i, reason in list(sorted(res.failed.items()))[:10]:
            console.print(f"[yellow]row {i + 1}[/] failed: {reason}")
        if len(res.failed) > 10:
            console.print(f"... and {len(res.failed) - 10} more (see {stats_path})")
        console.print(f"[yellow]{len(res.failed)} rows failed and are not in {out}; rerun to retry them (done rows are cached).[/]")
        raise typer.Exit(1)
    if st["pending"]:
        console.print(f"[yellow]time budget reached: {st['pending']} rows pending; rerun to continue.[/]")
        raise typer.Exit(3)


def _print_estimate(console, est) -> None:
    from rich.table import Table

    t = Table(title=f"estimate for {est.n_texts} texts" + (f" (timed on {est.sampled})" if est.sampled else ""))
    for col in ("annotator", "to annotate", "requests", "prompt tok", "completion tok", "USD", "time"):
        t.add_column(col, justify="left" if col == "annotator" else "right")
    def tok(v: int | None, exact: bool) -> str:
        return "-" if v is None else f"{v:,}" + ("" if exact else " ~")

    for a in est.annotators:
        usd = f"{a.usd:.4f}" if a.usd is not None else ("no price" if a.billed else "free")
        tm = f"{a.seconds / 60:.1f} min" if a.seconds is not None else "-"
        t.add_row(a.name, str(a.texts_to_annotate), "-" if not a.requests else f"{a.requests:,}", tok(a.prompt_tokens, a.tokens_exact),
                  tok(a.completion_tokens, a.tokens_exact), usd, tm)
    console.print(t)
    secs = est.seconds
    console.print(f"total: ${est.usd:.4f}" + (f", about {secs / 60:.1f} min one annotator after another" if secs is not None else "")
                  + (f"; no price configured for {', '.join(est.unpriced)}" if est.unpriced else "")
                  + " (~: about 4 characters a token)")


def annotators_command(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the Markdown here (docs/annotators.md) "
                                                                       "instead of printing it."),
) -> None:
    """Every annotator option (type, default, meaning, which types take it) and every prompt preset, as Markdown
    generated from the code (docs/annotators.md)."""
    from molal.annotators.reference import markdown
    from molal.io import atomic_write_bytes

    text = markdown()
    if output is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_bytes(output, text.encode("utf-8"), mode=0o644)
        typer.echo(f"wrote {output}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``molal annotate`` and ``molal annotators`` to the root app."""
    app.command("annotate")(annotate_command)
    app.command("annotators")(annotators_command)
