"""``molal simulate``: the human-free AL loop on recorded LLM outputs; ``molal simulate plot`` overlays runs."""

from __future__ import annotations

from pathlib import Path

import typer

from molal.config import STUDENT_MAX_STEPS

MODES_HELP = "molam (labels from molal's MoLAM aggregator, the paper's loop) | oracle (gold) | best_llm | majority | hybrid (k least-confident MoLAM labels → gold)"


def _round_table_row(rec: dict) -> list[str]:
    acc = rec["batch_label_acc"]
    return [
        str(rec["round"]),
        str(rec["train_size"]),
        "-" if acc is None else f"{acc:.3f}",
        f"{rec['train_label_acc']:.3f}",
        f"{rec['micro_f1']:.4f}",
        f"{rec['macro_f1']:.4f}",
        "-" if rec.get("stop_kappa") is None else f"{rec['stop_kappa']:.3f}" + (" stop" if rec.get("stop_rule_met") else ""),
        f"{rec['seconds_total']:.1f}",
    ]


COLUMNS = ["round", "train size", "batch label acc", "all labels acc", "micro-F1", "macro-F1", "κ (stop rule)",
           "time (s)"]


def register(app: typer.Typer) -> None:
    """Add ``simulate`` (with its ``plot`` subcommand) to the root app."""
    sim = typer.Typer(
        help="Simulate the human-free active-learning loop on recorded LLM outputs (no annotator needed).",
        invoke_without_command=True,
        no_args_is_help=False,
    )

    @sim.callback()
    def simulate(
        ctx: typer.Context,
        dataset: str = typer.Option("trec", help="dataset name under shared/data (test split, class order)"),
        annotations: str | None = typer.Option(
            None, help="recorded outputs: .npz LLMOutputs, a folder of recorded *.jsonl, or comma-separated files "
            "(default: shared/data/llm-outputs/<dataset>, else the bundled TREC recordings)"
        ),
        pool_labels: str | None = typer.Option(None, help="JSONL with the pool's gold labels (for an .npz pool)"),
        test: str | None = typer.Option(None, help="JSONL test split (default: shared/data/<dataset>/test.jsonl)"),
        strategy: str = typer.Option("random", help="query strategy (see molal.query.STRATEGIES)"),
        mode: str = typer.Option("molam", help=MODES_HELP),
        rounds: int = typer.Option(11, help="AL rounds after the seed round (11: the paper's 50 -> 600 items)"),
        budget: int = typer.Option(50, help="items queried per round"),
        initial: int = typer.Option(50, help="random seed items with gold labels (cold start)"),
        human_per_round: int = typer.Option(10, help="hybrid mode: gold labels per round"),
        certify_epsilon: float | None = typer.Option(
            None, help="molam/hybrid modes: only MoLAM labels certified at this error level (molal.trust, from a "
            "random audit held out) go to the student unreviewed, the rest to people (the backend's auto_label)"),
        certify_delta: float = typer.Option(0.1, help="with --certify-epsilon: the certificate's failure probability"),
        audit: int = typer.Option(200, help="with --certify-epsilon: random items people label for the audit"),
        seed: int = typer.Option(0, help="random seed (seeds, queries, student init)"),
        molam_text_features: str | None = typer.Option(
            None, help="molam/hybrid modes: correct MoLAM's labels with its transductive text model (this "
            "sentence encoder's embeddings + hashed n-grams, self-trained on the pool; 'minilm' = bundled; default: off)"
        ),
        encoder: str = typer.Option("minilm", help="student encoder: 'minilm' (bundled) or a local HF model folder"),
        max_length: int = typer.Option(64, help="student max tokens (TREC: <= 41 tokens, so 64 is lossless)"),
        epochs: int = typer.Option(3, help="student epochs per round"),
        batch_size: int = typer.Option(16, help="student batch size"),
        min_steps: int = typer.Option(60, help="at least this many optimiser steps per round (small rounds)"),
        max_steps: int = typer.Option(STUDENT_MAX_STEPS, min=0, help="at most this many optimiser steps per round, "
                                      "in whole epochs (big rounds; 0 = off; MOLAL_STUDENT_MAX_STEPS in the backend)"),
        lr: float = typer.Option(5e-5, help="student AdamW learning rate"),
        freeze_encoder: bool = typer.Option(False, help="fast preset: train only the head on frozen embeddings"),
        loss: str = typer.Option("robust", help="robust (the paper's loss) or ce (plain cross-entropy)"),
        weights: str = typer.Option("at_add", help="discrepancy weight of a MoLAM label: at_add (kept from the "
                                                   "round that queried it, as the paper's code) | each_round"),
        round_offset: int = typer.Option(1, help="λ_t counts the seed round as round 1 (paper's code); 0 = λ 0.4 there"),
        stop_kappa: float = typer.Option(0.99, help="stopping rule: κ between successive rounds' predictions"),
        stop_window: int = typer.Option(3, help="stopping rule: rounds in a row at or above --stop-kappa"),
        candidates: int | None = typer.Option(None, help="score only N random unlabelled candidates per round"),
        pool_limit: int | None = typer.Option(None, help="use a fixed random subset of N pool rows"),
        test_limit: int | None = typer.Option(None, help="use only the first N test rows"),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        threads: int | None = typer.Option(None, help="torch CPU threads"),
        out: Path = typer.Option(Path("simulate-result.json"), "--out", "-o", help="result JSON path"),
        plot: Path | None = typer.Option(None, help="learning-curve PNG (default: <out>.png)"),
        overlay: list[Path] = typer.Option([], help="other result JSONs to overlay in the PNG (repeatable)"),
        progress: bool = typer.Option(True, help="show progress bars"),
    ) -> None:
        if ctx.invoked_subcommand is not None:
            return
        from rich.console import Console
        from rich.table import Table

        from molal.data import DataError
        from molal.query import QueryError
        from molal.simulate import SimulationConfig, SimulationResult, plot_learning_curves, run_simulation
        from molal.student import StudentError

        console = Console()
        cfg = SimulationConfig(
            dataset=dataset, annotations=annotations, pool_labels=pool_labels, test=test, strategy=strategy,
            mode=mode,  # type: ignore[arg-type]
            rounds=rounds, budget=budget, n_initial=initial, human_per_round=human_per_round, seed=seed,
            certify_epsilon=certify_epsilon, certify_delta=certify_delta, audit=audit,
            molam_text_features=molam_text_features,
            encoder=encoder, max_length=max_length, epochs=epochs, min_steps=min_steps, max_steps=max_steps, batch_size=batch_size, lr=lr,
            freeze_encoder=freeze_encoder, loss=loss, weights=weights,  # type: ignore[arg-type]
            round_offset=round_offset, stop_kappa=stop_kappa, stop_window=stop_window,
            candidates=candidates, pool_limit=pool_limit, test_limit=test_limit, device=device, threads=threads,
            progress=progress,
        )
        try:
            others = [SimulationResult.load(p) for p in overlay]
            cfg.validate()
        except (ValueError, QueryError, DataError) as exc:
            raise typer.BadParameter(str(exc)) from None
        console.print(f"[bold]molal simulate[/] {dataset}: mode={mode} strategy={strategy} rounds={rounds} "
                      f"budget={budget} seed={seed}")
        console.print("  " + " | ".join(COLUMNS))

        def on_round(rec: dict) -> None:
            console.print("  " + " | ".join(_round_table_row(rec)))

        try:
            result = run_simulation(cfg, console=on_round)
        except (DataError, StudentError, QueryError, ValueError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(2) from None
        for note in result.notes:
            console.print(f"[dim]note: {note}[/]")
        cert = result.metadata["labeller"].get("certificate")
        if cert is not None:
            said = (f"confidence >= {cert['threshold']:.4f} certified (coverage {cert['coverage']:.1%} of the pool)"
                    if cert["threshold"] is not None else f"nothing certified: {cert['reason']}")
            console.print(f"certificate at ε = {cert['epsilon']:g}, δ = {cert['delta']:g} on a random audit of "
                          f"{cert['audit']}: {said}; people labelled {result.metadata['human_labels']['training']} "
                          f"training items + the audit")
        table = Table(title=f"{result.label} — {dataset}")
        for c in COLUMNS:
            table.add_column(c, justify="right")
        for rec in result.records:
            table.add_row(*_round_table_row(rec))
        console.print(table)
        result.save(out)
        png = plot or out.with_suffix(".png")
        plot_learning_curves([result, *others], png)
        console.print(f"wrote {out} and {png}")

    @sim.command("plot")
    def plot_cmd(
        results: list[Path] = typer.Argument(..., help="result JSONs written by molal simulate"),
        out: Path = typer.Option(Path("learning-curves.png"), "--out", "-o", help="PNG path"),
        metric: str = typer.Option("micro_f1", help="micro_f1 | macro_f1 | batch_label_acc | train_label_acc"),
        title: str | None = typer.Option(None, help="plot title"),
    ) -> None:
        """Overlay several runs' learning curves in one PNG (same mode/strategy over seeds: mean ± std)."""
        from molal.data import DataError
        from molal.simulate import SimulationResult, plot_learning_curves

        try:
            runs = [SimulationResult.load(p) for p in results]
        except DataError as exc:
            raise typer.BadParameter(str(exc)) from None
        if metric not in runs[0].records[0]:
            raise typer.BadParameter(f"unknown metric {metric!r}")
        plot_learning_curves(runs, out, metric=metric, title=title)
        typer.echo(f"wrote {out}")

    app.add_typer(sim, name="simulate")
