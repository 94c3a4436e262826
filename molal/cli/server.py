"""``molal serve | sync | train | query | jobs | worker | project`` — the Label Studio backend and its jobs.

Environment (molal.config.Settings): ``MODEL_DIR``, ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``,
``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``, ``REDIS_URL``, ``MOLAL_*``. ``sync``/``train``/``query`` run the job
in this process by default (recorded in the job table like server jobs; one job per project at a time);
``--queue`` only queues it for the server's worker thread or the RQ workers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer

from molal.service.store import ProjectSettings

_MODEL_DIR = typer.Option(None, "--model-dir", envvar="MODEL_DIR", help="State directory (MODEL_DIR).")


def _service(model_dir: Path | None):
    from molal.config import get_settings

    settings = get_settings(model_dir=model_dir)  # a bad setting fails before the service's imports
    from molal.service.pipeline import Service

    return Service(settings)


def _run_job(kind: str, project: int, model_dir: Path | None, queue: bool, payload: dict | None = None,
             wait_s: float = 3600.0, quiet: bool = False) -> None:
    from rich.console import Console

    from molal.service.jobs import execute

    console = Console(stderr=True)
    svc = _service(model_dir)
    try:
        svc.project(project)
    except Exception as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    job, created = svc.submit(project, kind, payload, source="cli")
    if queue:
        console.print(f"{'queued' if created else 'coalesced into'} {kind} job {job['id']} for project {project}")
        typer.echo(json.dumps({"job": job["id"], "created": created}))
        return
    deadline = time.monotonic() + wait_s
    shown = False
    elsewhere = None
    while True:
        svc.jobs.reap_stale()
        claimed = svc.jobs.claim(job["id"])
        if claimed is not None:
            break
        row = svc.jobs.get(job["id"])
        if row is None or row["status"] != "queued":
            elsewhere = row
            break
        if not shown:
            console.print(f"waiting: project {project} has another job running (see `molal jobs`)")
            shown = True
        if time.monotonic() > deadline:
            console.print("[red]gave up waiting[/red]; the job stays queued")
            raise typer.Exit(1)
        time.sleep(1.0)
    if elsewhere is None:
        console.print(f"running {kind} job {job['id']} for project {project} (progress in the log / `molal jobs`)")
        import logging

        from molal.logging import setup_logging

        if logging.getLogger().level > logging.INFO:
            setup_logging("INFO")
        row = execute(svc.jobs, claimed, svc.run_job)
    else:  # a server's worker took it first: follow it there
        console.print(f"job {job['id']} runs in the server's worker; waiting for it")
        row = elsewhere
        while row is not None and row["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(1.0)
            row = svc.jobs.get(job["id"])
        if row is None or row["status"] in ("queued", "running"):
            console.print(f"[red]gave up waiting[/red] for job {job['id']}")
            raise typer.Exit(1)
    if not quiet or row["status"] != "succeeded":
        typer.echo(json.dumps({k: row.get(k) for k in ("id", "status", "message", "result", "error")}, default=str,
                              indent=1), err=quiet)
    if row["status"] != "succeeded":
        if row.get("message"):
            console.print(f"[red]{kind} failed:[/red] {row['message']}")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command()
    def serve(
        host: str = typer.Option("127.0.0.1", "--host", help="Bind address."),
        port: int = typer.Option(9090, "--port", help="Port."),
        workers: int = typer.Option(2, "--workers", help="gunicorn worker processes."),
        threads: int = typer.Option(4, "--threads", help="Threads per worker."),
        model_dir: Path | None = _MODEL_DIR,
        insecure_no_auth: bool = typer.Option(
            False, "--insecure-no-auth",
            help="Listen beyond loopback without basic auth (anyone who reaches the port can change project "
                 "settings and start training). Same as MOLAL_INSECURE_NO_AUTH=true."),
    ) -> None:
        """Run the Label Studio ML backend under gunicorn (backend.wsgi:app).

        In Label Studio: project Settings → Model → Connect Model, URL http://HOST:PORT (with basic auth
        if BASIC_AUTH_USER/BASIC_AUTH_PASS are set). Beyond 127.0.0.1 basic auth is required (see
        README, "Deploying safely")."""
        import backend
        from molal.config import exposure_refusal, get_settings

        s = get_settings(insecure_no_auth=True if insecure_no_auth else None)
        why = exposure_refusal(s, [host])
        if why:
            typer.echo(f"error: {why}", err=True)
            raise typer.Exit(2)
        # (an editable install may map ``backend`` as a namespace package: use __path__, not __file__)
        backend_dir = Path(next(iter(backend.__path__))).resolve()
        conf = backend_dir / "gunicorn.conf.py"
        env = dict(os.environ)
        if model_dir is not None:
            env["MODEL_DIR"] = str(model_dir)
        if insecure_no_auth:
            env["MOLAL_INSECURE_NO_AUTH"] = "true"
        repo_root = str(backend_dir.parent)
        env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        argv = [sys.executable, "-m", "gunicorn", "-c", str(conf), "--bind", f"{host}:{port}",
                "--workers", str(workers), "--threads", str(threads), "backend.wsgi:app"]
        typer.echo(f"molal backend on http://{host}:{port} ({workers} workers x {threads} threads)", err=True)
        os.execvpe(argv[0], argv, env)

    @app.command()
    def sync(
        project: int = typer.Option(..., "--project", help="Label Studio project id."),
        queue: bool = typer.Option(False, "--queue", help="Only queue the job for the server / RQ workers."),
        model_dir: Path | None = _MODEL_DIR,
    ) -> None:
        """Pull the project's tasks, annotate them all (cached), push the serving model's predictions."""
        _run_job("sync", project, model_dir, queue)

    @app.command()
    def train(
        project: int = typer.Option(..., "--project", help="Label Studio project id."),
        queue: bool = typer.Option(False, "--queue", help="Only queue the job for the server / RQ workers."),
        force: bool = typer.Option(False, "--force", help="Train even without new or changed human labels."),
        model_dir: Path | None = _MODEL_DIR,
    ) -> None:
        """One training round: MoLAM on the human labels, the student, publish, push predictions, query.

        In review mode a round without new or changed human labels since the serving model does nothing
        (--force retrains)."""
        _run_job("train", project, model_dir, queue, payload={"force": True} if force else None)

    @app.command()
    def query(
        project: int = typer.Option(..., "--project", help="Label Studio project id."),
        strategy: str | None = typer.Option(None, "--strategy", help="coreset|entropy|bemps|noise_stability|random|..."),
        queue: bool = typer.Option(False, "--queue", help="Only queue the job for the server / RQ workers."),
        model_dir: Path | None = _MODEL_DIR,
    ) -> None:
        """Rank unlabeled tasks with the student and write data.<priority field> + the tab "molal queue".

        Annotators open that tab and press "Label Tasks As Displayed" (plain "Label All Tasks" ignores tabs)."""
        if strategy is not None:
            from molal.service.store import coerce_setting

            try:
                coerce_setting("strategy", strategy)
            except ValueError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
        _run_job("query", project, model_dir, queue, payload={"strategy": strategy} if strategy else None)

    @app.command()
    def jobs(
        project: int | None = typer.Option(None, "--project", help="Only this project."),
        job_id: str | None = typer.Argument(None, help="Show one job in full."),
        limit: int = typer.Option(20, "--limit"),
        as_json: bool = typer.Option(False, "--json", help="JSON output."),
        model_dir: Path | None = _MODEL_DIR,
    ) -> None:
        """List jobs (status, progress, message) or show one."""
        svc = _service(model_dir)
        svc.jobs.reap_stale()
        if job_id:
            row = svc.jobs.get(job_id)
            if row is None:
                typer.echo(f"error: no job {job_id}", err=True)
                raise typer.Exit(1)
            typer.echo(json.dumps(row, indent=1, default=str))
            return
        rows = svc.jobs.list(project=project, limit=limit)
        if as_json:
            typer.echo(json.dumps(rows, indent=1, default=str))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table("id", "project", "kind", "status", "progress", "created", "message")
        for r in rows:
            t.add_row(r["id"], str(r["project"]), r["kind"], r["status"], f"{100 * r['progress']:.0f}%",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])), (r["message"] or "")[:80])
        Console().print(t)

    @app.command()
    def worker(
        model_dir: Path | None = _MODEL_DIR,
        burst: bool = typer.Option(False, "--burst", help="Exit when the queue is empty."),
    ) -> None:
        """Run an RQ worker for the queue 'molal' (needs REDIS_URL); the server then only queues jobs."""
        from molal.config import get_settings

        s = get_settings(model_dir=model_dir)
        if s.redis_url is None:
            typer.echo("error: REDIS_URL is not set (without it the server runs jobs in-process)", err=True)
            raise typer.Exit(2)
        if model_dir is not None:
            os.environ["MODEL_DIR"] = str(model_dir)
        from redis import Redis
        from rq import Worker

        from molal.service.jobs import RQ_QUEUE, start_reaper
        from molal.service.store import ServiceStore

        conn = Redis.from_url(s.redis_url.get_secret_value())
        # a job left `running` by a worker that was killed (its heartbeat stops) is marked failed within
        # STALE_S, whether or not another job comes: the person sees why, and the project takes jobs again
        start_reaper(ServiceStore.from_settings(s).jobs_target)
        if s.job_nice and hasattr(os, "nice"):
            os.nice(s.job_nice)  # the whole worker runs jobs: nicer than the web processes (MOLAL_JOB_NICE)
        typer.echo(f"RQ worker on queue {RQ_QUEUE!r} (MODEL_DIR={s.model_dir})", err=True)
        Worker([RQ_QUEUE], connection=conn).work(burst=burst)

    project_app = typer.Typer(help="Per-project settings (stored in MODEL_DIR/projects/<id>/state.db, or in MOLAL_DATABASE_URL).",
                              no_args_is_help=True)
    app.add_typer(project_app, name="project")

    @project_app.command("show")
    def project_show(project: int = typer.Option(..., "--project"), model_dir: Path | None = _MODEL_DIR) -> None:
        """Settings (env defaults + stored), current model, versions."""
        svc = _service(model_dir)
        typer.echo(json.dumps(svc.project_info(project), indent=1, default=str))

    @project_app.command("review-panel")
    def project_review_panel(
        project: int = typer.Option(..., "--project"),
        remove: bool = typer.Option(False, "--remove", help="Take the panel out again (and stop keeping it)."),
        instructions: bool = typer.Option(False, "--instructions",
                                          help="Also set the project's labeling instructions to molal's."),
        model_dir: Path | None = _MODEL_DIR,
    ) -> None:
        """Add molal's read-only review panel (its label, confidence, the LLM votes, a flag when it overrides the
        LLMs) above the text in the project's label config in Label Studio, and keep it there (project setting
        review_panel). It adds no control: annotations and exports are unchanged. --remove takes it out."""
        from molal.service.labelconfig import LabelConfigError
        from molal.service.lsclient import LSConnectionError
        from molal.service.review import INSTRUCTIONS
        from molal.service.train import client_for, ensure_review_panel

        svc = _service(model_dir)
        state = svc.project(project)
        try:
            client = client_for(svc, state)
            done = ensure_review_panel(client, project, remove=remove)
            if instructions and not remove:
                client.set_instructions(project, INSTRUCTIONS)
        except LabelConfigError as exc:
            typer.echo(f"error: the project's label config is not one molal serves, so it gets no panel: {exc}",
                       err=True)
            raise typer.Exit(2) from None
        except LSConnectionError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        if remove:
            state.unset_setting("review_panel")
        else:
            state.set_setting("review_panel", True)
        typer.echo(json.dumps({"project": project, "review_panel": done, "instructions": instructions and not remove}))

    @project_app.command("report")
    def project_report(
        project: int = typer.Option(..., "--project"),
        out: Path | None = typer.Option(None, "--out", help="Write report-<N>.png and report-<N>.html (plots) "
                                                            "into this folder."),
        refresh: bool = typer.Option(False, "--refresh", help="Measure now (a certify job without writing: pulls "
                                                              "the project; the LLMs' answers come from the cache)."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
        model_dir: Path | None = _MODEL_DIR,
    ) -> None:
        """How far to trust molal on this project: how often its pre-fill and each LLM's vote agreed with the
        labels people submitted — on the random audit slice (an estimate for the whole pool) and on the rest
        of the queue — overall and per class with 95% intervals, the confusion matrix, by model version, and
        the certificate for labelling without a person. Measured by every training job (--refresh: now)."""
        from molal.service.quality import QUALITY_KEY

        if refresh:
            _run_job("certify", project, model_dir, False, payload={"write": False}, quiet=True)
        svc = _service(model_dir)
        state = svc.known_project(project)
        report = state.get(QUALITY_KEY)
        if not report:
            typer.echo(f"error: project {project} has no quality report yet: it is measured by each training "
                       "job once a model serves (or run with --refresh)", err=True)
            raise typer.Exit(1)
        if as_json:
            typer.echo(json.dumps(report, indent=1))
        else:
            from molal.cli.report import print_report

            print_report(report)
        if out is not None:
            from molal.cli.report import write_pages

            png, page = write_pages(report, out, project)
            typer.echo(f"wrote {png} and {page}", err=True)

    @project_app.command("certify")
    def project_certify(
        project: int = typer.Option(..., "--project"),
        dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be certified."),
        model_dir: Path | None = _MODEL_DIR,
    ) -> None:
        """Write the serving MoLAM's certified labels into Label Studio, as annotations marked as molal's
        ("Created from prediction", data.molal_certified), for every task nobody labelled whose confidence
        reaches the certified threshold: with probability >= 1 - certify_delta, at most a share certify_epsilon
        of the pool's tasks at or above it carry a wrong label (Learn-then-Test on the audit slice). Refuses,
        and says why, without a certificate (e.g. too few audit labels)."""
        _run_job("certify", project, model_dir, False, payload={"write": not dry_run})

    @project_app.command("set")
    def project_set(
        project: int = typer.Option(..., "--project"),
        pairs: list[str] = typer.Argument(..., help="KEY=VALUE ... (" + ", ".join(ProjectSettings.keys())
                                                    + "); VALUE 'default' unsets"),
        model_dir: Path | None = _MODEL_DIR,
    ) -> None:
        """Change project settings, e.g. `molal project set --project 3 loop_mode=human_free strategy=coreset`."""
        svc = _service(model_dir)
        state = svc.project(project)
        for p in pairs:
            if "=" not in p:
                typer.echo(f"error: expected KEY=VALUE, got {p!r}", err=True)
                raise typer.Exit(2)
            k, v = p.split("=", 1)
            try:
                if v == "default":
                    state.unset_setting(k)
                else:
                    state.set_setting(k, v)
            except ValueError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
        typer.echo(json.dumps(svc.project_info(project)["settings"], indent=1))
