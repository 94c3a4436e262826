"""How far to trust molal on a project, measured from its people's labels, and the labels it may give alone.

**The quality report** (:func:`measure`, kept in the project's state by every training and ``certify`` job:
``GET /projects/N`` → ``quality``, ``molal project report``, a line of molal's status block in Label Studio).
How often MoLAM's pre-annotation — the label a person found pre-ticked, by the model version that wrote the
task's line (``data.molal_label``, ``data.molal_model``) — and each LLM's vote agreed with the label the
person submitted: overall and per class (by the person's label), with 95% Clopper–Pearson intervals and
counts, and the confusion matrix (:func:`molal.trust.agreement_by_source`). Two estimates side by side:

* **audit** — the tasks of the audit slice (:mod:`molal.service.audit`), drawn uniformly at random from the
  unlabeled pool: an estimate for the whole pool. Also the *current* model's agreement there: it was never
  trained on these labels, so this is its held-out accuracy on the pool;
* **queue** — every other task people labelled after molal pre-annotated it: what the strategy picked (the
  hard tasks, usually), so it is biased low as an estimate for the pool.

``by_version``: the pre-annotation's agreement per model version that wrote it (how it moved).

**Certified labels** (:func:`certificate`, :func:`label_certified`, the ``certify`` job). The served MoLAM's
confidence on the audit tasks (held out) and on the *frame* — every task people have not labelled outside the
audit: unlabeled tasks, the audit's, those molal labelled — gives :func:`molal.trust.certify` (Learn-then-Test,
fixed sequence, hypergeometric p-values) a threshold t: with probability at least 1 − δ, at most a share ε
of the frame's tasks at confidence ≥ t carry a wrong label once molal labels those nobody labelled (people's
labels, where given, are kept). The assumption: the audit is a uniform random sample of the frame. It is
drawn uniformly from the unlabeled tasks, but the frame shrinks as people label the queue, so it holds
exactly only for tasks drawn when the frame was what it is now; the tasks the queue took since were
mostly hard ones (the strategy's), which leaves the audit more pessimistic than the frame, not less.

The write (``molal project certify --project N``, or after each training job with the project setting
``auto_label=true``) creates one annotation per certified task nobody labelled (pending audit tasks are
left to people), marked as molal's: ``last_action="prediction"`` (Label Studio's "Created from prediction")
and ``data.molal_certified`` = the model version, threshold, ε and δ. molal remembers their ids and labels and
never reads them back as human labels (:func:`molal.service.train.molal_wrote`); a person who changes one's
label, or adds an annotation to the task, makes the task's label theirs. Without a certificate the
command refuses and says why (e.g. too few audit labels: :func:`molal.trust.min_audit_items`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from molal.service.audit import audit_tasks, held_out

if TYPE_CHECKING:
    from molal.service.jobs import JobContext
    from molal.service.labelconfig import LabelSpec
    from molal.service.lsclient import LSClient
    from molal.service.pool import Pool
    from molal.service.runtime import Runtime
    from molal.service.store import ProjectState
    from molal.trust import Certificate

log = logging.getLogger("molal.quality")

QUALITY_KEY = "quality"  # the last report (GET /projects/N, molal project report, the status line)
CERTIFIED_KEY = "certified_annotations"  # task id -> {annotation, label, version, threshold, epsilon, delta, at}
AUDITED_KEY = "audited"  # task id -> {label, prefill, version}: which model pre-annotated each audited task
MOLAM = "molam"  # the report's name for MoLAM's pre-annotation (the LLMs: llm:<name> / scorer:<name>)


class CertifyRefused(RuntimeError):
    """No certified label can be written (no certificate, no model, no audit label...); the message says why."""


def certified_annotations(state: ProjectState) -> dict[int, dict]:
    return {int(t): v for t, v in (state.get(CERTIFIED_KEY) or {}).items()}


def molal_annotations(state: ProjectState) -> dict[int, str]:
    """The annotations molal wrote: id -> the class it wrote (:func:`molal.service.train.molal_wrote`: never
    read as a person's label unless a person changed it)."""
    return {int(v["annotation"]): str(v["label"]) for v in certified_annotations(state).values()}


def _prefill(pool: Pool, r: int, classes: list[str]) -> tuple[int, str | None]:
    d = pool.data[r]
    lab = d.get("molal_label")
    return (classes.index(lab) if isinstance(lab, str) and lab in classes else -1), d.get("molal_model")


def _votes(llm_probs: np.ndarray | None, at: dict[int, int], rows: list[int], j: int) -> np.ndarray:
    out = np.full(len(rows), -1, dtype=np.int64)
    if llm_probs is None:
        return out
    for i, r in enumerate(rows):
        p = at.get(r)
        if p is not None:
            v = llm_probs[p, j]
            if np.all(np.isfinite(v)):
                out[i] = int(np.argmax(v))
    return out


def certificate(pool: Pool, rows: list[int], probs: np.ndarray, held: set[int], epsilon: float,
                delta: float) -> Certificate:
    """:func:`molal.trust.certify_probs` for MoLAM's probabilities ``probs`` (aligned with ``rows``): the labelled
    audit rows (``held``) against the frame (``rows`` people did not label outside the audit)."""
    from molal.trust import certify_probs

    audit = [i for i, r in enumerate(rows) if r in held]
    frame = [i for i, r in enumerate(rows) if r not in pool.human or r in held]
    cert = certify_probs(probs, audit, [pool.human[rows[i]] for i in audit], frame, epsilon, delta)
    if not audit:
        from dataclasses import replace

        cert = replace(cert, reason="no audit label yet: people have not labelled any task of the audit slice "
                                    "(1 task in audit_every of the queue), so nothing can be certified")
    return cert


def measure(state: ProjectState, pool: Pool, spec: LabelSpec, rows: list[int], probs: np.ndarray,
            llm_probs: np.ndarray | None, member_versions: list[str], version: str, ps: Any) -> dict:
    """The quality report (module docstring) from a pulled ``pool``; ``probs``: MoLAM's (current ``version``)
    probabilities on ``rows``; ``llm_probs``: (len(rows), L, K) each member's. Kept in the project's state."""
    from molal.trust import Rate, agreement, agreement_by_source

    classes = list(spec.classes)
    held = held_out(state, pool)
    at = {int(r): i for i, r in enumerate(rows)}
    audit_rows = sorted(held, key=lambda r: pool.task_ids[r])
    queue_rows = sorted((r for r in pool.human if r not in held and pool.data[r].get("molal_model")),
                        key=lambda r: pool.task_ids[r])
    record = {str(k): v for k, v in (state.get(AUDITED_KEY) or {}).items()}

    def sources(rs: list[int]) -> tuple[dict, list]:
        pre = [_prefill(pool, r, classes) for r in rs]
        preds: dict[str, Any] = {MOLAM: np.array([p for p, _ in pre], dtype=np.int64)}
        for j, name in enumerate(member_versions):
            preds[name] = _votes(llm_probs, at, rs, j)
        human = np.array([pool.human[r] for r in rs], dtype=np.int64)
        return {k: a.to_dict() for k, a in agreement_by_source(preds, human, classes).items()}, pre

    audit_rep, audit_pre = sources(audit_rows)
    queue_rep, queue_pre = sources(queue_rows)
    for r, (p, v) in zip(audit_rows, audit_pre, strict=True):
        record[str(pool.task_ids[r])] = {"label": classes[pool.human[r]], "prefill": classes[p] if p >= 0 else None,
                                         "version": v}
    state.put(AUDITED_KEY, record)
    probs = np.asarray(probs, dtype=np.float64)
    cur_rows = [r for r in audit_rows if r in at]
    current = agreement(np.array([int(np.argmax(probs[at[r]])) for r in cur_rows], dtype=np.int64),
                        np.array([pool.human[r] for r in cur_rows], dtype=np.int64), classes).to_dict()
    by_version: dict[str, dict] = {}
    for where, rs, pre in (("audit", audit_rows, audit_pre), ("queue", queue_rows, queue_pre)):
        for r, (p, v) in zip(rs, pre, strict=True):
            if v and p >= 0:
                k, n = by_version.setdefault(v, {}).get(where, (0, 0))
                by_version[v][where] = (k + int(p == pool.human[r]), n + 1)
    versions = [{"version": v, **{w: Rate.of(*kn).to_dict() for w, kn in d.items()}}
                for v, d in sorted(by_version.items(), key=lambda kv: _version_key(kv[0]))]
    cert = certificate(pool, rows, probs, held, ps.certify_epsilon, ps.certify_delta)
    drawn = audit_tasks(state)
    labelled_tasks = {pool.task_ids[r] for r in pool.human} | {pool.task_ids[r] for r in pool.machine}
    report = {
        "at": time.time(), "version": version, "classes": classes, "audit_every": ps.audit_every,
        "audit": {"drawn": len(drawn), "labelled": len(audit_rows),
                  "pending": sum(1 for t in drawn if t not in labelled_tasks),
                  "prefill": audit_rep, "current": current},
        "queue": {"labelled": len(queue_rows), "prefill": queue_rep},
        "by_version": versions,
        "certificate": {**cert.to_dict(), "model": version,
                        "unlabelled_certified": len(certifiable(pool, rows, probs, cert, state))},
    }
    state.put(QUALITY_KEY, report)
    return report


def _version_key(v: str) -> tuple[int, str]:
    parts = v.split("-")
    return (int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else -1, v)


def certifiable(pool: Pool, rows: list[int], probs: np.ndarray, cert: Certificate, state: ProjectState) -> list[int]:
    """The rows molal may label alone under ``cert``: nobody labelled them (neither a person nor molal), they
    are not pending audit tasks, and MoLAM's confidence reaches the threshold."""
    if cert.threshold is None or not len(rows):
        return []
    audit = set(audit_tasks(state))
    conf = np.asarray(probs, dtype=np.float64).max(axis=1)
    return [r for i, r in enumerate(rows) if conf[i] >= cert.threshold and r not in pool.human
            and r not in pool.machine and pool.task_ids[r] not in audit]


def label_certified(state: ProjectState, client: LSClient, spec: LabelSpec, pool: Pool, rows: list[int],
                    probs: np.ndarray, version: str, cert: Certificate, ctx: JobContext | None = None) -> dict:
    """Write MoLAM's certified labels into Label Studio as annotations marked as molal's (module docstring).
    Raises :class:`CertifyRefused` without a certificate. Returns what was written."""
    if cert.threshold is None:
        raise CertifyRefused(f"no certified labels: {cert.reason}")
    todo = certifiable(pool, rows, probs, cert, state)
    at = {int(r): i for i, r in enumerate(rows)}
    probs = np.asarray(probs, dtype=np.float64)
    mark = (f"labelled by molal: {version}, confidence >= {cert.threshold:.4f}, certified error <= "
            f"{cert.epsilon:g} with probability >= {1 - cert.delta:g} (audit of {cert.n_audit})")
    items, data = [], []
    from molal.service.lsclient import CERTIFIED_FLAG

    for r in todo:
        label = spec.classes[int(np.argmax(probs[at[r]]))]
        items.append((pool.task_ids[r], [{"from_name": spec.from_name, "to_name": spec.to_name, "type": "choices",
                                          "value": {"choices": [label]}, "origin": "prediction"}]))
        data.append((pool.task_ids[r], {**pool.data[r], CERTIFIED_FLAG: mark}))
    if ctx is not None:
        ctx.progress(None, f"writing {len(items)} certified labels into Label Studio ({mark})")
    done = certified_annotations(state)

    def keep(n: int) -> None:
        if ctx is not None:
            ctx.progress(None, f"certified labels: {n} of {len(items)} written")

    client.update_task_data(data)  # the mark first: an annotation is never there without it
    made = client.create_annotations(state.id, items, on_batch=keep)
    now = time.time()
    label_of = {t: res[0]["value"]["choices"][0] for t, res in items}
    row_of = {pool.task_ids[r]: r for r in todo}
    for t, aid in made.items():
        pool.machine[row_of[t]] = spec.classes.index(label_of[t])  # labelled now: out of the queue
        done[t] = {"annotation": aid, "label": label_of[t], "version": version, "threshold": cert.threshold,
                   "epsilon": cert.epsilon, "delta": cert.delta, "at": now}
    state.put(CERTIFIED_KEY, {str(t): v for t, v in done.items()})
    return {"written": len(made), "threshold": cert.threshold, "epsilon": cert.epsilon, "delta": cert.delta,
            "model": version, "total_certified_by_molal": len(done)}


def _certificate_of(report: dict) -> Certificate:
    """The report's certificate as :class:`molal.trust.Certificate` (without the report's own entries)."""
    from molal.trust import Certificate

    keys = set(Certificate.__dataclass_fields__)
    return Certificate(**{k: v for k, v in report["certificate"].items() if k in keys})


def certify_job(svc: Runtime, state: ProjectState, ctx: JobContext) -> dict:
    """The ``certify`` job (``molal project certify``): pull the project, the serving MoLAM's probabilities
    on every task (the mixture's answers come from the cache), the report; with payload ``write`` the
    certified labels go into Label Studio, and without a certificate the job fails with the reason."""
    from molal.service.train import TrainingError, _pull, annotate_pool

    client, spec, pool = _pull(svc, state, ctx)
    ps = svc.project_settings(state)
    m = svc.loaded_model(state)
    if m is None:
        raise CertifyRefused(f"project {state.id}: no model serves yet: label about 50 tasks and train first")
    mixture, res = annotate_pool(svc, state, spec, pool.texts, ctx, 0.05, 0.6)
    rows = res.done_idx.tolist()
    if not rows:
        raise TrainingError(f"project {state.id}: the mixture annotated none of the {len(pool)} texts")
    probs = np.asarray(m.molam.predict_proba(res.outputs), dtype=np.float64)
    version = m.pointer["molam"]
    ctx.progress(0.8, f"measuring {version} against people's labels")
    report = measure(state, pool, spec, rows, probs, res.outputs.normalized_probs(), mixture.member_versions(),
                     version, ps)
    cert_d = report["certificate"]
    out = {"version": version, "certificate": cert_d, "audit_labelled": report["audit"]["labelled"]}
    if ctx.job.get("payload", {}).get("write"):
        cert = _certificate_of(report)
        out["certified"] = label_certified(state, client, spec, pool, rows, probs, version, cert, ctx)
        ctx.progress(1.0, f"wrote {out['certified']['written']} certified labels ({version})")
    else:
        ctx.progress(1.0, f"report: {summary_line(report) or 'nothing measured yet'}")
    from molal.service.queue import resume

    job = resume(svc, state)  # a queue writer that gave way to this job goes on
    if job is not None:
        out["queue_job"] = job
    return out


def after_round(state: ProjectState, client: LSClient, spec: LabelSpec, pool: Pool, rows: list[int],
                molam_probs: np.ndarray, llm_outputs: Any, member_versions: list[str], version: str, ps: Any,
                ctx: JobContext | None = None) -> dict:
    """A training job's part: the report on its new MoLAM, and with ``auto_label`` the certified labels
    written (or why none). Returns the job result's entries (``quality``, ``certified``)."""
    llm = llm_outputs.normalized_probs() if llm_outputs is not None else None
    report = measure(state, pool, spec, rows, molam_probs, llm, member_versions, version, ps)
    out: dict[str, Any] = {"quality": summary_line(report)}
    if ps.auto_label:
        cert = _certificate_of(report)
        try:
            out["certified"] = label_certified(state, client, spec, pool, rows, molam_probs, version, cert, ctx)
        except CertifyRefused as exc:
            out["certified"] = {"written": 0, "refused": str(exc)}
            if ctx is not None:
                ctx.progress(None, f"auto_label: {exc}")
    return out


def _pct(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "–"
    return f"{100 * r['rate']:.0f}% ({100 * r['low']:.0f}–{100 * r['high']:.0f}%, n={r['n']})"


def summary_line(report: dict | None) -> str | None:
    """One sentence for molal's status block (None before anything was measured)."""
    if not report:
        return None
    a, q = report.get("audit") or {}, report.get("queue") or {}
    if not a.get("labelled") and not q.get("labelled"):
        return None
    parts = []
    if a.get("labelled"):
        parts.append(f"on the random audit (1 task in {report.get('audit_every')}), molal's pre-fill agreed with "
                     f"your labels {_pct(a['prefill'][MOLAM]['overall'])}")
    else:
        parts.append("no audit task labelled yet")
    if q.get("labelled"):
        parts.append(f"on the rest of the queue {_pct(q['prefill'][MOLAM]['overall'])}")
    cert = report.get("certificate") or {}
    if cert.get("threshold") is not None:
        parts.append(f"certified: {cert.get('unlabelled_certified')} unlabeled tasks at confidence >= "
                     f"{cert['threshold']:.2f} (error <= {100 * cert['epsilon']:g}%, {100 * (1 - cert['delta']):g}% sure)")
    else:
        parts.append("nothing certified yet")
    return "Quality: " + "; ".join(parts) + "."


__all__ = ["AUDITED_KEY", "CERTIFIED_KEY", "QUALITY_KEY", "CertifyRefused", "after_round", "certificate",
           "certifiable", "certify_job", "label_certified", "measure", "molal_annotations", "summary_line"]
