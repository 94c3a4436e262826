"""``molal project report``: the quality report of :mod:`molal.service.quality` as rich tables, and as a PNG
(:func:`molal.plots.quality_figure`) inside a small HTML page."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from molal.io import atomic_write_bytes


def _pct(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "–"
    return f"{100 * r['rate']:.1f}% [{100 * r['low']:.0f}–{100 * r['high']:.0f}] {r['k']}/{r['n']}"


def tables(report: dict) -> list:
    """The report's rich tables: by source (audit | queue), MoLAM's pre-fill per class, by version, the
    current model on the audit and the certificate."""
    from rich.table import Table

    out = []
    a, q = report.get("audit") or {}, report.get("queue") or {}
    t = Table(title=f"Agreement with people's labels (95% Clopper–Pearson) · current model {report.get('version')}")
    t.add_column("source")
    t.add_column(f"audit: random 1 in {report.get('audit_every')} ({a.get('labelled', 0)} labelled)")
    t.add_column(f"queue: strategy's picks ({q.get('labelled', 0)} labelled)")
    for name in (a.get("prefill") or {}):
        label = "molal's pre-fill" if name == "molam" else name
        t.add_row(label, _pct(a["prefill"][name]["overall"]), _pct(((q.get("prefill") or {}).get(name) or {})
                                                                     .get("overall")))
    t.add_row(f"{report.get('version')} now (held out)", _pct((a.get("current") or {}).get("overall")), "")
    out.append(t)
    t = Table(title="molal's pre-fill per class (by the person's label)")
    t.add_column("class")
    t.add_column("audit")
    t.add_column("queue")
    pa = ((a.get("prefill") or {}).get("molam") or {}).get("per_class") or {}
    pq = ((q.get("prefill") or {}).get("molam") or {}).get("per_class") or {}
    for c in report.get("classes") or []:
        t.add_row(c, _pct(pa.get(c)), _pct(pq.get(c)))
    out.append(t)
    conf = ((a.get("prefill") or {}).get("molam") or {}).get("confusion") or {}
    if conf.get("counts"):
        t = Table(title="Confusion on the audit (rows: the person's label, columns: molal's pre-fill)")
        t.add_column("")
        for c in conf["class_names"]:
            t.add_column(c[:10], justify="right")
        for c, row in zip(conf["class_names"], conf["counts"], strict=True):
            t.add_row(c, *(str(x) for x in row))
        out.append(t)
    if report.get("by_version"):
        t = Table(title="molal's pre-fill by the model version that wrote it")
        t.add_column("version")
        t.add_column("audit")
        t.add_column("queue")
        for v in report["by_version"]:
            t.add_row(v["version"], _pct(v.get("audit")), _pct(v.get("queue")))
        out.append(t)
    c = report.get("certificate") or {}
    t = Table(title=f"Certified labels (ε = {c.get('epsilon')}, δ = {c.get('delta')}, {c.get('method')})")
    t.add_column("")
    t.add_column("")
    if c.get("threshold") is not None:
        t.add_row("threshold", f"confidence >= {c['threshold']:.4f}")
        t.add_row("pool certified", f"{c.get('pool_certified')} of {c.get('pool_size')} "
                                    f"({100 * (c.get('coverage') or 0):.1f}%)")
        t.add_row("unlabeled tasks molal may label", str(c.get("unlabelled_certified")))
    else:
        t.add_row("no certificate", str(c.get("reason")))
    t.add_row("audit", f"{c.get('n_audit')} labelled, {c.get('n_audit_wrong')} where {report.get('version')} "
                       "disagrees")
    out.append(t)
    return out


def print_report(report: dict) -> None:
    from rich.console import Console

    console = Console()
    for t in tables(report):
        console.print(t)


def write_pages(report: dict, folder: Path, project: int) -> tuple[Path, Path]:
    """``report-<project>.png`` and ``report-<project>.html`` (the PNG inline, the tables as text) in ``folder``."""
    from rich.console import Console

    from molal.plots import quality_figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = quality_figure(report, folder / f"report-{project}.png")
    console = Console(record=True, width=140, file=io.StringIO())  # recorded, not shown
    for t in tables(report):
        console.print(t)
    text = console.export_text()
    img = base64.b64encode(png.read_bytes()).decode()
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>molal · project {project} · quality</title>"
            f"</head><body style='font-family:sans-serif;margin:2em'><h2>molal · project {project} · quality "
            f"({html.escape(str(report.get('version')))})</h2><img alt='quality plots' "
            f"src='data:image/png;base64,{img}' style='max-width:100%'/><pre>{html.escape(text)}</pre></body></html>")
    path = atomic_write_bytes(folder / f"report-{project}.html", page.encode(), mode=0o644)
    return png, path


__all__ = ["print_report", "tables", "write_pages"]
