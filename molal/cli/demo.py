"""``molal demo``: real Label Studio + the molal backend on 127.0.0.1, a project driven end to end."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import typer


def _labels(value: str | None) -> list[str] | None:
    if not value:
        return None
    out = [v.strip() for v in value.split(",") if v.strip()]
    if len(out) < 2:
        raise typer.BadParameter("give at least two labels, comma-separated")
    return out


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command()
    def demo(
        data_dir: Path = typer.Option(Path("./molal-demo"), "--data-dir", help="Where Label Studio's and the backend's data live (reused by the next run)."),
        dataset: Path | None = typer.Option(None, "--dataset", help="Your own JSONL (text, label) instead of the bundled TREC sample; annotated by the offline embedding annotators (or --mixture)."),
        labels: str | None = typer.Option(None, "--labels", help="Class names, comma-separated (default: the labels found in --dataset)."),
        mixture: Path | None = typer.Option(None, "--mixture", help="Mixture config (TOML/YAML) with real LLM endpoints."),
        tasks: int = typer.Option(2000, "--tasks", help="How many tasks to import."),
        seeds: int = typer.Option(50, "--seeds", help="How many seed tasks the simulated human labels."),
        password: str | None = typer.Option(None, "--password", help="Admin password (default: generated and printed)."),
        ls_port: int | None = typer.Option(None, "--ls-port", help="Label Studio port (default: a free one)."),
        backend_port: int | None = typer.Option(None, "--backend-port", help="Backend port (default: a free one)."),
        fresh: bool = typer.Option(False, "--fresh", help="Delete --data-dir first and start over."),
        no_wait: bool = typer.Option(False, "--no-wait", help="Exit after showing the results (stops both servers)."),
        student_epochs: int | None = typer.Option(
            None, "--student-epochs", min=1,
            help="Student epochs in the demo's training job (default: 30 for the head on frozen embeddings, 1 with --full-student).",
        ),
        full_student: bool = typer.Option(
            False, "--full-student",
            help="Fine-tune the whole student encoder (minutes on a CPU) instead of its head on frozen embeddings.",
        ),
    ) -> None:
        """Start a real Label Studio and the molal backend, label 50 seeds (simulated), train, show the results.

        Keeps serving until Ctrl-C (or exits at once with --no-wait) and stops both processes cleanly."""
        from rich.console import Console
        from rich.table import Table

        from molal.demo import Demo, DemoOptions
        from molal.progress import progress_bar

        console = Console()
        opts = DemoOptions(data_dir=data_dir, dataset=dataset, labels=_labels(labels), mixture=mixture,
                           n_tasks=tasks, n_seeds=seeds, password=password, ls_port=ls_port,
                           backend_port=backend_port, fresh=fresh, student_epochs=student_epochs,
                           student_freeze_encoder=not full_student)
        d = Demo(opts, say=lambda m: console.print(f"[cyan]•[/cyan] {m}"))
        stop_requested = False

        def _sigterm(signum, frame):  # noqa: ARG001 - stop cleanly on SIGTERM as on Ctrl-C
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _sigterm)
        t0 = time.monotonic()
        try:
            console.print(f"[cyan]•[/cyan] data directory: [bold]{data_dir.resolve()}[/bold]")
            console.print("[cyan]•[/cyan] starting Label Studio and the molal backend on 127.0.0.1 …")
            with contextlib.ExitStack() as bars:
                bar = None

                def on_progress(job: dict) -> None:
                    nonlocal bar
                    if bar is None:  # from the job's start: its timer and the job's own figures agree
                        bar = bars.enter_context(progress_bar("[cyan]•[/cyan] training job", 1.0, fraction=True,
                                                              transient=False, console=console))
                    bar.update(completed=float(job.get("progress") or 0.0),
                               description="[cyan]•[/cyan] training job: "
                                           + str(job.get("message") or job.get("status"))[:70])

                res = d.run(progress=on_progress)
                if bar is not None:
                    bar.update(completed=1.0)
            total = time.monotonic() - t0
            ev = res.evaluation["accuracy"]
            console.print()
            console.print(f"[bold]Label Studio[/bold]  {res.ls_url}    e-mail [bold]{res.username}[/bold]    "
                          f"password [bold]{res.password}[/bold]")
            console.print(f"[bold]molal backend[/bold] {res.backend_url}    project {res.project}    "
                          f"model_version {res.version}")
            console.print(f"(the {opts.n_seeds} seed labels were SIMULATED: gold labels sent through the API, "
                          "as a human would label them)")
            tab = Table(title=f"accuracy on the {res.evaluation['n_eval_tasks']} non-seed tasks "
                              "(predictions stored in Label Studio vs gold)")
            tab.add_column("model")
            tab.add_column("accuracy", justify="right")
            tab.add_column("n", justify="right")
            tab.add_column("check on the seeds")
            result = (res.job or {}).get("result") or {}
            flags = result.get("members_flagged") or {}
            for name in sorted(ev, key=lambda k: (k != "MoLAM", k)):
                a = ev[name]
                flag = flags.get(name.split(":", 1)[-1], "")
                tab.add_row(name, f"{a['acc']:.3f}" if a["acc"] is not None else "-", str(a["n"]),
                            f"[yellow]{flag}[/yellow]" if flag else "")
            console.print(tab)
            for w in result.get("member_warnings") or []:
                console.print(f"[yellow]warning:[/yellow] {w}")
            if res.next_tasks:
                nt = Table(title='first tasks of the "molal queue" tab')
                nt.add_column("task")
                nt.add_column("priority", justify="right")
                nt.add_column("text")
                for t in res.next_tasks[:8]:
                    data = t.get("data") or {}
                    nt.add_row(str(t["id"]), str(data.get("priority")), str(data.get("text"))[:80])
                console.print(nt)
            console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items())
                          + f", total {total:.1f}s" + (" (reused data directory)" if res.reused else ""))
            console.print()
            console.print("[bold]In the UI:[/bold] open the URL, log in, open the project; in the Data Manager pick "
                          "the tab [bold]molal queue[/bold] and press [bold]Label Tasks As Displayed[/bold]. "
                          "Each task shows MoLAM's label pre-filled (and one prediction per LLM, llm:<name>; embedding scorers are scorer:<name>). "
                          "Settings → Model shows the connected backend and its Start Training button.")
            if no_wait:
                return
            console.print("serving until Ctrl-C …")
            while not stop_requested:
                time.sleep(1.0)
                for p, name in ((d.ls, "Label Studio"), (d.backend, "backend")):
                    if p is not None and p.proc is not None and p.proc.poll() is not None:
                        console.print(f"[red]{name} exited (rc={p.proc.returncode}); log {p.log_path}[/red]")
                        raise typer.Exit(1)
        except KeyboardInterrupt:
            console.print("stopping …")
        except Exception as exc:
            from molal.demo import brief

            # one line: a Label Studio error's status and reason, never its response headers (session cookies)
            console.print(f"[red]demo failed:[/red] {brief(exc)}")
            raise typer.Exit(1) from None
        finally:
            d.stop()
            console.print("stopped Label Studio and the molal backend")
