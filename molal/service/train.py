"""The jobs: ``train`` (one round of the loop), ``sync``, ``query`` and ``annotate``.

A training job, step by step (each step reports progress to the job table and the log):

1. pull every task of the project through the SDK; a task's human label is its latest non-cancelled
   annotation's choice in the served ``<Choices>`` block;
2. ensure LLM outputs for the whole pool (the annotation cache makes this free after the first time);
3. fit MoLAM on the human labels;
4. train the student with the noise-robust loss on
   * review mode: the human labels + MoLAM's labels for every other task (discrepancy weights against the
     previous student, negatives from :func:`molal.molam.negative_labels`);
   * human-free mode (the paper's loop, one AL round per job): the human labels + the MoLAM-labelled tasks
     of earlier rounds; then query ``query_batch`` tasks with the project's strategy, label them with
     MoLAM (with negatives and discrepancy weights) and add them to the training set for the next round —
     they are marked in Label Studio (a prediction + ``data.molal_auto_label``) for audit, and a human
     annotation on such a task always overrides MoLAM's label. With ``human_per_round`` = k > 0 (the
     *hybrid* loop of ``molal simulate``), the k queried tasks with MoLAM's least confident labels go to
     people instead: they are not auto-labelled and head the "molal queue" tab until the next round;
5. publish a new model version atomically (files → manifest with checksums → ``current.json``);
6. push fresh predictions for unlabeled tasks (bulk import), set the project's model_version, and write
   the query priorities (``data.<priority_field>`` + the Data Manager tab "molal queue").
   The per-member predictions (``llm:<name>``, ``scorer:<name>``, when enabled) do not depend on the trained model: they are
   imported in a background thread from step 3 on, while MoLAM and the student train.

A job that fails before step 5 changes nothing that serves (per-LLM predictions it imported stay: they are
the mixture's answers, not a model version).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from molal.learner import Learner, StoppingRule
from molal.service.audit import audit_rows, held_out
from molal.service.labelconfig import LabelSpec, task_framing
from molal.service.lsclient import AUTO_FLAG, CERTIFIED_FLAG, LSClient, LSConnectionError
from molal.service.lsclient import client_for as ls_client_for
from molal.service.pool import Pool
from molal.service.predict import entry, llm_entries, mean_probs
from molal.service.quality import after_round, certify_job
from molal.service.queue import (
    head_limit,
    plan_queue,
    queue_head,
    queue_job,
    rank_by_confidence,
    rank_queue,
    resume,
    retire_later,
    retire_superseded,
    write_head,
)
from molal.service.review import voters_of
from molal.service.runtime import TASK_FRAMING_KEY
from molal.service.store import FOR_HUMANS_KEY
from molal.service.taskdata import task_text_resolver

if TYPE_CHECKING:
    from molal.service.jobs import JobContext
    from molal.service.runtime import Runtime
    from molal.service.store import ProjectState

log = logging.getLogger("molal.train")


class TrainingError(RuntimeError):
    """A training round cannot run (too few labels, no texts...); the previous model keeps serving."""


# -- Label Studio tasks → a pool --------------------------------------------------------------------------
def human_label(annotations: list, spec: LabelSpec, skip: set[int] | frozenset[int] = frozenset()) -> int | None:
    """Class index of the latest non-cancelled annotation's choice in ``spec.from_name`` (None if none);
    annotations whose id is in ``skip`` (molal's own certified labels) are not a person's."""
    best, best_key = None, None
    for a in annotations or []:
        if not isinstance(a, dict) or a.get("was_cancelled") or a.get("id") in skip:
            continue
        label = None
        for r in a.get("result") or []:
            if isinstance(r, dict) and r.get("from_name") == spec.from_name and r.get("type", "choices") == "choices":
                ch = (r.get("value") or {}).get("choices") or []
                if len(ch) == 1 and ch[0] in spec.classes:
                    label = spec.classes.index(ch[0])
        if label is None:
            continue
        key = (str(a.get("updated_at") or a.get("created_at") or ""), int(a.get("id") or 0))
        if best_key is None or key > best_key:
            best, best_key = label, key
    return best


def molal_wrote(annotation: dict, data: dict, spec: LabelSpec, mine: Mapping[int, str]) -> bool:
    """Whether ``annotation`` (of a task whose data is ``data``) is molal's certified label, untouched: its id
    is one molal wrote (``mine``: annotation id -> the class it wrote) and it still holds that class (a person
    who changed it made it theirs); or, with no record of it (a certify job stopped between the write and the
    record), it is "Created from prediction" on a task molal marked certified (``data.molal_certified``)."""
    aid = annotation.get("id")
    if aid in mine:
        lab = human_label([annotation], spec)
        return lab is not None and spec.classes[lab] == mine[aid]
    return annotation.get("last_action") == "prediction" and CERTIFIED_FLAG in data


def pool_from_tasks(tasks: list[dict], spec: LabelSpec, resolve: Callable[[str], str | None] | None = None,
                    max_chars: int | None = None, molal_annotations: Mapping[int, str] | None = None) -> Pool:
    """``resolve`` maps a task's text value to the text to use (a Label Studio-hosted file's content), None
    to skip the task; ``data`` keeps the value as Label Studio holds it. Texts over ``max_chars`` characters
    (``MOLAL_MAX_TEXT_CHARS``) are skipped like tasks without text (counted in ``too_long``).
    ``molal_annotations`` (annotation id -> the class molal wrote, :func:`molal.service.quality.
    molal_annotations`): molal's own certified labels (:func:`molal_wrote`) are not human labels; a task with
    only those is in ``pool.machine``."""
    mine = molal_annotations or {}
    pool = Pool([], [], [])
    for t in tasks:
        data = t.get("data") or {}
        text = data.get(spec.value_key)
        if isinstance(text, str) and text.strip() and resolve is not None:
            text = resolve(text)
        if not isinstance(text, str) or not text.strip():
            pool.skipped += 1
            continue
        if max_chars is not None and len(text) > max_chars:
            pool.skipped += 1
            pool.too_long += 1
            continue
        row = len(pool.texts)
        pool.task_ids.append(int(t["id"]))
        pool.texts.append(text)
        pool.data.append(dict(data))
        pool.prediction_versions.append(list(t.get("prediction_versions") or []))
        anns = [a for a in t.get("annotations") or [] if isinstance(a, dict)]
        ours = ({a.get("id") for a in anns if molal_wrote(a, data, spec, mine)}
                if mine or CERTIFIED_FLAG in data else set())
        lab = human_label(anns, spec, ours)
        if lab is not None:
            pool.human[row] = lab
        elif ours:
            lab = human_label([a for a in anns if a.get("id") in ours], spec)
            if lab is not None:
                pool.machine[row] = lab
    return pool


def client_for(svc: Runtime, state: ProjectState) -> LSClient:
    """The SDK client for the project's Label Studio (:func:`molal.service.lsclient.client_for`)."""
    return ls_client_for(svc.settings, state)


# -- annotation ---------------------------------------------------------------------------------------------
def seed_examples(pool: Pool, spec: LabelSpec, per_class: int = 8, skip: set[int] | None = None) -> list[dict[str, str]]:
    """The project's human-labelled tasks as few-shot examples, lowest task id first, at most ``per_class`` of
    each class: what a prompt with ``examples = "seeds"`` takes its examples from (rows of ``skip``, the
    audit's, never)."""
    out, per = [], {}
    for r in sorted(set(pool.human) - (skip or set()), key=lambda r: pool.task_ids[r]):
        label = spec.classes[pool.human[r]]
        if per.get(label, 0) < per_class:
            per[label] = per.get(label, 0) + 1
            out.append({"text": pool.texts[r], "label": label})
    return out


def job_lines(ctx: JobContext | None):
    """Inside it, progress displays (:mod:`molal.progress`) send plain lines (done/total, rate, time left) to
    the job's progress messages, so its log and ``GET /jobs`` show them (nothing without a job)."""
    import contextlib

    from molal.progress import progress_lines

    return progress_lines(lambda line: ctx.progress(None, line)) if ctx is not None else contextlib.nullcontext()


def annotate_pool(svc: Runtime, state: ProjectState, spec: LabelSpec, texts: list[str], ctx: JobContext | None,
                  lo: float = 0.0, hi: float = 0.4, examples: list[dict[str, str]] | None = None,
                  task: str | None = None):
    """Mixture outputs for ``texts`` (cached). The label config's class descriptions (``spec``) reach every
    member. ``examples``: the project's labelled tasks for prompts with ``examples = "seeds"``, ``task``: the
    task framing (default for both: those the serving model was trained with). Returns (mixture, result)."""
    mixture = svc.mixture_for(state, spec.classes, texts, examples=examples, descriptions=spec.description_map,
                              task=task)
    if mixture is None:
        raise TrainingError(f"project {state.id}: no texts to annotate")
    last = [0.0]

    def on_progress(done: int, total: int) -> None:  # the job's fraction; its lines: progress_lines below
        now = time.monotonic()
        if ctx is not None and (now - last[0] > 2.0 or done == total):
            last[0] = now
            frac = done / total if total else 1.0
            ctx.progress(lo + (hi - lo) * frac)

    s = svc.settings
    if s.max_annotate_usd is not None or s.max_annotate_hours is not None:
        from molal.annotators.cost import estimate

        if ctx is not None:
            ctx.progress(lo, f"estimating the cost of annotating {len(texts)} texts")
        est = estimate(mixture, texts, list(spec.classes), cache=svc.cache,
                       sample=8 if s.max_annotate_hours is not None else 0)
        why = est.over_budget(s.max_annotate_usd, s.max_annotate_hours)
        if why is not None:
            raise TrainingError(f"project {state.id}: {why} (MOLAL_MAX_ANNOTATE_USD / MOLAL_MAX_ANNOTATE_HOURS); "
                                "nothing was sent beyond the timing sample")
        if ctx is not None:
            secs = est.seconds
            ctx.progress(lo, f"estimate within budget: ${est.usd:.2f}, {est.prompt_tokens:,} prompt tokens"
                             + (f", {secs / 60:.1f} min" if secs is not None else ""))
    if ctx is not None:
        ctx.progress(lo, f"annotating {len(texts)} texts with {mixture!r}")
    if s.engine == "ray" and len(texts) >= s.engine_min_texts:
        from molal.annotators.engine import RayEngine

        engine = RayEngine(address=s.ray_address, workers=s.ray_workers, gpus_per_worker=s.ray_gpus_per_worker)
        if ctx is not None:
            ctx.progress(lo, f"annotating {len(texts)} texts on Ray ({s.ray_workers} workers)")
        with job_lines(ctx):
            res = engine.annotate(mixture, texts, list(spec.classes), cache=svc.store.cache_target,
                                  on_progress=on_progress, progress=ctx is not None)
    else:
        # (annotator, text) pairs done, the rate and the time left: a line at least every few seconds
        with job_lines(ctx):
            res = mixture.annotate(texts, list(spec.classes), cache=svc.cache, on_progress=on_progress,
                                   progress=ctx is not None)
    st = res.stats
    if ctx is not None:
        ctx.progress(hi, f"annotated {len(res.done_idx)}/{len(texts)} texts (cache hits {st.get('cache_hits')}, "
                         f"misses {st.get('cache_misses')}, failed {len(res.failed)}) in {st.get('seconds', 0):.1f} s")
    return mixture, res


def annotate_texts(svc: Runtime, state: ProjectState, ctx: JobContext, payload: dict) -> dict:
    """The ``annotate`` job (rows /predict could not finish within its budget)."""
    texts = payload.get("texts")
    classes = payload.get("classes")
    if not isinstance(texts, list) or not isinstance(classes, list) or not classes:
        raise TrainingError("annotate job payload needs 'texts' and 'classes' lists")
    spec = LabelSpec(from_name="", to_name="", value_key="", classes=tuple(str(c) for c in classes))
    _, res = annotate_pool(svc, state, spec, [str(t) for t in texts], ctx, 0.0, 1.0)
    return {"texts": len(texts), "done": int(len(res.done_idx)), "failed": len(res.failed),
            "engine": res.stats.get("engine", "local"), "cache_hits": int(res.stats.get("cache_hits", 0)),
            "annotated": int(res.stats.get("annotated", 0)), "failed_texts": failed_texts(texts, res.failed)}


def failure_summary(n_tasks: int, failed: dict[int, str], human_lost: int = 0) -> str | None:
    """One line for a job whose mixture could not annotate some tasks: how many, the most common reason, and
    how many human labels MoLAM could therefore not use (None when every task was annotated)."""
    if not failed:
        return None
    from collections import Counter

    reason, _ = Counter(str(v).split(";")[0][:160] for v in failed.values()).most_common(1)[0]
    lost = f"; {human_lost} human label(s) on them are not used by MoLAM" if human_lost else ""
    return (f"{len(failed)} of {n_tasks} tasks could not be annotated (most often: {reason}): they get no "
            f"prediction{lost}")


def failed_texts(texts: list, failed: dict[int, str], limit: int = 200) -> list[dict]:
    """Which texts failed and why (for job records; the first ``limit``, texts cut to 300 characters)."""
    return [{"row": int(i), "text": str(texts[i])[:300], "reason": str(why)[:500]}
            for i, why in sorted(failed.items())[:limit]]


# -- one training round (no Label Studio I/O: testable on its own) -------------------------------------------
@dataclass
class RoundResult:
    pointer: dict
    version: str  # the serving version after this round
    rows: np.ndarray  # pool rows with mixture outputs
    probs: np.ndarray  # (len(rows), K) serving model's probabilities on those rows
    llm_outputs: Any  # LLMOutputs over ``rows``
    member_versions: list[str] = field(default_factory=list)  # model version of each member's predictions
    new_auto: list[int] = field(default_factory=list)  # pool rows MoLAM-labelled in this round (human-free)
    molam_probs: np.ndarray | None = None  # MoLAM's probabilities on ``rows`` (the quality report, certificates)
    to_human: list[int] = field(default_factory=list)  # queried pool rows left to people (human_per_round)
    student: Any = None
    info: dict = field(default_factory=dict)


def fit_round(svc: Runtime, state: ProjectState, spec: LabelSpec, pool: Pool, ctx: JobContext | None,
              job_id: str = "manual",
              on_annotated: Callable[[np.ndarray, Any, list[str]], None] | None = None) -> RoundResult:
    """Steps 2–5 of the module docstring on ``pool``; publishes the new version and returns it.
    ``on_annotated(rows, outputs, member_versions)`` is called once the mixture's outputs are there (before
    MoLAM)."""
    from molal.learner import MachineLabel, TrainingSet
    from molal.molam import MoLAM, negative_labels

    ps = svc.project_settings(state)
    s = svc.settings
    if len(pool) == 0:
        raise TrainingError(f"project {state.id}: no task has a text in data[{spec.value_key!r}]")
    held = held_out(state, pool)  # the audit's labels are measurements: never trained on
    examples = seed_examples(pool, spec, skip=held)
    framing, framing_why = (None, "not read") if spec.instructions is None else task_framing(spec.instructions,
                                                                                               ps.instructions)
    if ctx is not None and spec.instructions is not None:
        ctx.progress(None, f"task framing: {framing_why}" if framing else f"no task framing: {framing_why}")
    mixture, res = annotate_pool(svc, state, spec, pool.texts, ctx, examples=examples, task=framing)
    rows = res.done_idx.astype(np.int64)
    outputs = res.outputs
    if len(rows) == 0:
        raise TrainingError(f"project {state.id}: the mixture annotated none of the {len(pool)} texts")
    pos = {int(r): i for i, r in enumerate(rows.tolist())}
    human_rows = [r for r in pool.human if r in pos and r not in held]
    unannotated = failure_summary(len(pool), res.failed, len(set(pool.human) - held) - len(human_rows))
    if unannotated and ctx is not None:
        ctx.progress(None, unannotated)
    if len(human_rows) < 2 or len({pool.human[r] for r in human_rows}) < 2:
        raise TrainingError(
            f"project {state.id}: MoLAM needs human labels of at least 2 classes; have {len(human_rows)} labelled "
            "task(s). Label some tasks in Label Studio (about 50 is the recipe) and train again"
        )
    if on_annotated is not None:
        on_annotated(rows, outputs, mixture.member_versions())
    K = len(spec.classes)

    # -- MoLAM -------------------------------------------------------------------------------------------
    if ctx is not None:
        ctx.progress(0.45, f"fitting MoLAM on {len(human_rows)} human labels")
    labeled_idx = np.array([pos[r] for r in human_rows], dtype=np.int64)
    labels = np.array([pool.human[r] for r in human_rows], dtype=np.int64)
    cands = [c.strip() for c in ps.molam_candidates.split(",") if c.strip()] if ps.molam_candidates else None
    t0 = time.perf_counter()
    molam = MoLAM(candidates=cands, text_features=ps.molam_text_features, text_device=s.device).fit(
        outputs, labeled_idx, labels)
    if ctx is not None:
        ctx.progress(0.5, f"MoLAM fitted in {time.perf_counter() - t0:.1f} s (chose {molam.choice_})")
    checks, member_warnings = member_report(mixture, outputs, labeled_idx, labels, molam)
    for w in member_warnings:
        log.warning("project %s: %s", state.id, w)
        if ctx is not None:
            ctx.progress(None, f"warning: {w}")
    P = np.asarray(molam.predict_proba(outputs), dtype=np.float64)
    y_molam = P.argmax(axis=1)
    neg = np.asarray(negative_labels(outputs, predicted=P), dtype=bool)

    # -- previous student (discrepancy weights in review mode) ----------------------------------------------
    prev = None
    try:
        old = svc.loaded_model(state)
        if old is not None and list(old.manifest.get("info", {}).get("classes", [])) == list(spec.classes):
            prev_student = svc.student_of(state, old)
            if prev_student is not None:
                prev = prev_student
    except Exception as exc:  # an unusable old model only costs the discrepancy weights
        log.warning("project %s: previous student unavailable (%s)", state.id, exc)

    round_t = int(state.get("round", 0))
    auto = state.auto_labels()
    row_of_task = pool.row_of()
    new_auto: list[int] = []
    to_human: list[int] = []
    student = None
    staging = state.staging_dir(job_id)
    molam.save(staging / "molam")
    info: dict[str, Any] = {
        "classes": list(spec.classes), "from_name": spec.from_name, "mixture": repr(mixture),
        "mixture_fingerprint": mixture.fingerprint(), "llm_names": list(outputs.llm_names),
        "n_tasks": len(pool), "n_annotated": int(len(rows)), "n_human": len(human_rows), "loop_mode": ps.loop_mode,
        "audit_held_out": len(held),
        "unannotated": unannotated,
        "described_classes": sorted(mixture.descriptions), "task_framing": framing_why if framing else None,
        "members": [c.as_dict() for c in checks], "member_warnings": member_warnings,
        "round": round_t, "job_id": job_id, "student": False, "labels_fingerprint": labels_fingerprint(pool, spec),
    }
    if hasattr(molam, "metadata") and isinstance(getattr(molam, "metadata", None), dict):
        info["molam"] = {k: v for k, v in molam.metadata.items() if isinstance(v, (int, float, str, bool))}

    if ps.student:
        from molal.student import Student, epoch_count

        # MoLAM's probabilities and negatives indexed by pool row (rows without mixture outputs stay 0)
        P_rows = np.zeros((len(pool), K))
        P_rows[rows] = P
        neg_rows = np.zeros((len(pool), K), dtype=bool)
        neg_rows[rows] = neg
        learner = round_learner(ps)
        ts = TrainingSet()
        for r in human_rows:  # human labels first (weight 1, no negatives) ...
            ts.add_human(r, pool.human[r])
        if ps.loop_mode == "review":  # ... then MoLAM's current labels of every other row (refit on every correction)
            for r in rows.tolist():
                if r not in pool.human:
                    ts.add_machine(r, MachineLabel(int(y_molam[pos[r]]), 1.0,
                                                   tuple(np.flatnonzero(neg[pos[r]]).tolist()), round_t))
            mol_rows = [r for r in ts.rows() if r not in ts.human]
            if prev is not None and mol_rows:  # weights against the last published student
                ts.prev_pred.update(zip(mol_rows, prev.predict([pool.texts[r] for r in mol_rows]).tolist(),
                                        strict=True))
        else:  # ... or the labels MoLAM gave when the row was queried, as in the paper's loop
            for t, a in auto.items():
                r = row_of_task.get(t)
                if r is not None and r not in pool.human and r in pos:
                    ts.add_machine(r, MachineLabel(a["label"], a["weight"], tuple(a["negatives"]), a["round"]))
        n_mol = len(ts) - len(ts.human)
        student = Student(list(spec.classes), encoder=s.student_encoder, max_length=s.student_max_length,
                          epochs=s.student_epochs, lr=s.student_lr, device=s.device,
                          freeze_encoder=s.student_freeze_encoder, max_steps=s.student_max_steps)
        if ctx is not None:
            n_ep = epoch_count(student.epochs, -(-len(ts) // student.batch_size), student.min_steps, student.max_steps)
            capped = f", capped by MOLAL_STUDENT_MAX_STEPS={s.student_max_steps}" if n_ep < student.epochs else ""
            ctx.progress(0.5, f"training the student on {len(ts.human)} human + {n_mol} MoLAM labels "
                              f"(round {round_t}, {n_ep} epochs{capped})")
        with job_lines(ctx):  # the student's epochs as the job's progress lines (without a job: a bar in a terminal)
            learner.fit(student, pool.texts, ts, round_t, progress=ctx is not None or sys.stderr.isatty())
        student.save(staging / "student")
        info["student"] = True
        info["student_train"] = {"human": len(ts.human), "molam": n_mol}
        info["learner"] = learner.params()

        info["stop"] = stop_check(state, student, pool, K)
        if info["stop"]["met"] and ps.loop_mode == "human_free" and ps.stop_when_stable:
            state.put(FOR_HUMANS_KEY, [])
            info["stopped"] = True
            if ctx is not None:
                ctx.progress(0.8, f"stopping rule met (κ >= {info['stop']['threshold']} for {info['stop']['window']} "
                                  "rounds): no new tasks queried (stop_when_stable)")
        elif ps.loop_mode == "human_free":
            # one AL round: query among the rows neither human- nor MoLAM-labelled yet
            if ctx is not None:
                ctx.progress(0.8, f"querying {ps.query_batch} tasks with {ps.strategy}")
            certified = None
            if ps.auto_label:  # only certified labels go to the student unreviewed; the rest to people
                from molal.service.quality import certificate

                cert = certificate(pool, rows.tolist(), P, held, ps.certify_epsilon, ps.certify_delta)
                info["certificate"] = {"threshold": cert.threshold, "reason": cert.reason}
                certified = np.zeros(len(pool), dtype=bool)
                if cert.threshold is not None:
                    certified[rows] = P.max(axis=1) >= cert.threshold
            audit = audit_rows(state, pool)  # labelled or pending: people's
            q = learner.query(student, pool.texts, ts, P_rows, np.random.default_rng(round_t),
                              pool_rows=[r for r in rows.tolist() if r not in audit], certified=certified)
            to_human = q.to_human  # hybrid: MoLAM's least confident labels go to people
            state.put(FOR_HUMANS_KEY, [pool.task_ids[r] for r in to_human])  # replaces the last round's
            info["to_human"] = len(to_human)
            new_auto = learner.label_batch(ts, q, P_rows, neg_rows, round_t)
            state.add_auto_labels([
                (pool.task_ids[r], ts.machine[r].label, ts.machine[r].weight, list(ts.machine[r].negatives),
                 ts.machine[r].round) for r in new_auto
            ])
            info["queried"] = len(new_auto)
    state.put("round", round_t + 1)

    n = state.next_version_number()
    pointer = state.publish(staging, n, info, job_id=job_id, has_student=student is not None)
    if mixture.seed_examples is not None and mixture.seed_examples != state.get("seed_examples"):
        # the few-shot examples go with the model they were trained with: /predict uses these from now on
        state.put("seed_examples", mixture.seed_examples)
    if framing is not None and framing != (state.get(TASK_FRAMING_KEY) or ""):
        state.put(TASK_FRAMING_KEY, framing)  # likewise the task framing
    if ctx is not None:
        ctx.progress(0.85, f"published {pointer['molam']}" + (f" and {pointer['student']}" if student else ""))
    serve_student = ps.serve_model == "student" and student is not None
    if serve_student:
        probs = student.predict_proba([pool.texts[r] for r in rows.tolist()])
    else:
        probs = P
    return RoundResult(pointer=pointer, version=pointer["student"] if serve_student else pointer["molam"],
                       rows=rows, probs=np.asarray(probs), llm_outputs=outputs,
                       member_versions=mixture.member_versions(), new_auto=new_auto, molam_probs=P,
                       to_human=to_human, student=student, info=info)


def member_report(mixture, outputs, labeled_idx: np.ndarray, labels: np.ndarray, molam=None) -> tuple[list, list[str]]:
    """Each member measured on the seeds (:func:`molal.aggregation.members.check_members`) and one warning
    line per flagged member: what is wrong, what to try, and whether MoLAM kept it."""
    from molal.aggregation.members import check_members

    kinds = {a.name: a.kind for a in mixture.annotators}
    checks = check_members(outputs, labeled_idx, labels, kinds=kinds,
                           calibrated=[a.name for a in mixture.annotators if getattr(a, "calibrate", None)])
    dropped = set(((getattr(molam, "metadata", None) or {}).get("members") or {}).get("dropped") or [])
    warnings = []
    for c in checks:
        if c.problem is not None:
            fate = ("MoLAM dropped it (better without it on the seeds)" if c.name in dropped else
                    "MoLAM kept it (it helped on the seeds)")
            warnings.append(f"{c.kind} {c.line()}; {fate}")
    return checks, warnings


def stop_check(state: ProjectState, student, pool: Pool, n_classes: int, rule: StoppingRule | None = None) -> dict:
    """The stopping rule of :class:`molal.learner.StoppingRule` for a project: the stop set (task ids drawn at
    the first job, kept), this job's student's predictions on it, κ against the last job's; the history is
    kept in the project's state (``GET /projects/N`` shows it)."""
    rule = rule or StoppingRule()
    tasks = state.get("stop_set")
    if not tasks:
        tasks = [pool.task_ids[r] for r in rule.stop_set(len(pool), seed=state.id).tolist()]
        state.put("stop_set", tasks)
    row_of = pool.row_of()
    rows = [row_of[t] for t in tasks if t in row_of]
    pred = student.predict([pool.texts[r] for r in rows]) if rows else np.zeros(0, dtype=np.int64)
    now = {pool.task_ids[r]: int(p) for r, p in zip(rows, pred.tolist(), strict=True)}
    prev = {int(t): int(p) for t, p in (state.get("stop_pred") or {}).items()}
    kappa = rule.agreement(prev, now, n_classes)
    history = [*state.get("stop_kappas", []), None if kappa is None else round(kappa, 4)]
    state.put("stop_pred", now)
    state.put("stop_kappas", history[-50:])
    return {"kappa": history[-1], "met": rule.check(history), "threshold": rule.kappa, "window": rule.window,
            "stop_set": len(rows)}


def ensure_review_panel(client: LSClient, project: int, remove: bool = False) -> str:
    """Add (or remove) the review panel of :mod:`molal.service.review` in the project's label config in
    Label Studio; the config must be one molal serves, and the edited one is parsed again and must serve the
    same classes before it is sent (:func:`molal.service.review.check_edit`: LabelConfigError or
    ReviewPanelError say why, and nothing is sent). Returns "added", "removed" or "unchanged"."""
    from molal.service.labelconfig import parse_label_config
    from molal.service.review import add_review_panel, check_edit, remove_review_panel

    config = client.label_config(project)
    parse_label_config(config)  # a config molal cannot serve gets no panel (LabelConfigError says why)
    new = remove_review_panel(config) if remove else add_review_panel(config)
    if new == config:
        return "unchanged"
    check_edit(config, new)
    client.set_label_config(project, new)
    return "removed" if remove else "added"


def round_learner(ps) -> Learner:
    """The :class:`molal.learner.Learner` of a project's training job: its strategy and batch, the hybrid
    split, and the weighting: in review mode MoLAM relabels every row each job, so a label's weight is
    recomputed against the last student (``each_round``); in the human-free loop it is kept from the round
    that queried the row (``at_add``, as the paper's code)."""
    return Learner(ps.strategy, budget=ps.query_batch, human_per_round=ps.human_per_round,
                   weights="each_round" if ps.loop_mode == "review" else "at_add")


# -- pushing predictions ---------------------------------------------------------------------------------------
def push_predictions(svc: Runtime, client: LSClient, state: ProjectState, spec: LabelSpec, pool: Pool,
                     rows: list[int], probs: np.ndarray | None, version: str | None, outputs=None,
                     versions: list[str] | None = None, ctx: JobContext | None = None,
                     head: set[int] | None = None, publish: bool = True) -> int:
    """Bulk-import the serving model's prediction (and per-member ones not yet there, ``outputs`` with the
    members' model ``versions``) for unlabeled rows. ``version=None``: only the per-member ones (they do not
    depend on the model; the project's model_version is left alone). ``head`` (rows, :func:`queue_head`):
    only those rows get a prediction, and no per-member ones are imported (Label Studio calls ``/predict``
    for a task only when it holds no prediction at all; ``/predict`` answers the served and the per-member
    ones together). ``publish=False``: the project's model_version is left for the caller to set
    (:func:`publish_version`)."""
    ps = svc.project_settings(state)
    limit = svc.settings.per_llm_max_tasks
    wanted = bool(ps.per_llm_predictions and outputs is not None)
    too_big = bool(limit and len(pool) > limit)
    if wanted and (too_big or head is not None):
        wanted = False
        if ctx is not None:
            why = (f"{len(pool)} tasks > MOLAL_PER_LLM_MAX_TASKS={limit}" if too_big else
                   f"only the head of the queue gets predictions (predictions_top={ps.predictions_top})")
            ctx.progress(None, f"per-LLM predictions not imported: {why} (Label Studio's import slows with every "
                               "prediction a project holds); the review fields still show each LLM's vote, and "
                               "/predict answers them when a task is opened")
    llm_p = outputs.normalized_probs() if wanted else None  # once
    members = list(versions or []) if llm_p is not None else []
    # (row position, whether the served version is missing, the members missing): a pass over the rows that
    # builds no prediction, so the predictions themselves are built one import request at a time (at 100k
    # tasks with 4 members, 500k prediction dicts would otherwise sit in memory at once)
    todo: list[tuple[int, bool, list[str]]] = []
    for i, r in enumerate(rows):
        if r in pool.human or (head is not None and r not in head):
            continue
        have = set(pool.prediction_versions[r]) if r < len(pool.prediction_versions) else set()
        served = version is not None and version not in have
        missing = [v for v in members if v not in have]
        if served or missing:
            todo.append((i, served, missing))
    total = sum(int(served) + len(missing) for _, served, missing in todo)

    def predictions():
        for i, served, missing in todo:
            task = pool.task_ids[rows[i]]
            if served:
                yield {"task": task, **entry(spec, probs[i], version)}
            if missing:
                yield from ({"task": task, **e} for e in llm_entries(spec, members, llm_p[i])
                            if e["model_version"] in missing)

    what = "predictions" if version is not None else "per-LLM predictions"
    if ctx is not None:
        n_unl = sum(1 for r in rows if r not in pool.human)
        where = (f" for the head of the queue ({len(head)} of {n_unl} unlabeled tasks; Label Studio asks "
                 "/predict for the others when a person opens one)" if head is not None else "")
        ctx.progress(None, f"importing {total} {what} into Label Studio{where}")
    n = client.import_predictions(state.id, predictions(), total=total)
    if ctx is not None:
        ctx.progress(None, f"imported {n} {what}")
    if version is not None and publish:
        publish_version(svc, client, state, version)
    return n


def publish_version(svc: Runtime, client: LSClient, state: ProjectState, version: str) -> None:
    """Make ``version`` the project's model_version: what Label Studio pre-fills from, scores the tab's
    predictions by and samples uncertainty on (Label Studio refuses a version with no prediction yet)."""
    if client.set_model_version(state.id, version) and svc.project_settings(state).uncertainty_sampling:
        client.set_uncertainty_sampling(state.id)


def _pull(svc: Runtime, state: ProjectState, ctx: JobContext) -> tuple[LSClient, LabelSpec, Pool]:
    client = client_for(svc, state)
    ctx.progress(0.01, f"pulling project {state.id} from Label Studio")
    config = client.label_config(state.id)
    if config != state.get("label_config"):
        state.put("label_config", config)
    spec = svc.spec_for(state, config)
    try:  # the labelling instructions may frame the LLMs' task (a training job decides: fit_round)
        spec = dataclasses.replace(spec, instructions=client.instructions(state.id))
    except LSConnectionError as exc:
        log.warning("project %s: could not read the labelling instructions (%s); the task framing stays", state.id, exc)
    tasks = client.tasks(state.id, on_page=lambda n: ctx.progress(None, f"pulled {n} tasks"))
    from molal.service.quality import molal_annotations

    pool = pool_from_tasks(tasks, spec, resolve=task_text_resolver(svc.settings, state),
                           max_chars=svc.settings.max_text_chars, molal_annotations=molal_annotations(state))
    too_long = (f" ({pool.too_long} over MOLAL_MAX_TEXT_CHARS={svc.settings.max_text_chars} characters)"
                if pool.too_long else "")
    ctx.progress(0.02, f"{len(tasks)} tasks: {len(pool)} with a text, {len(pool.human)} human-labelled, "
                       f"{pool.skipped} without a usable text{too_long}")
    return client, spec, pool


def labels_fingerprint(pool: Pool, spec: LabelSpec) -> str:
    """sha256 of the project's human labels (task id, class) and classes: what a review-mode round learns from."""
    import hashlib
    import json

    labels = sorted((pool.task_ids[r], spec.classes[c]) for r, c in pool.human.items())
    return hashlib.sha256(json.dumps([list(spec.classes), labels]).encode()).hexdigest()


def nothing_new(svc: Runtime, state: ProjectState, spec: LabelSpec, pool: Pool) -> dict | None:
    """In review mode, the serving model when it was trained on exactly these human labels (a new round would
    publish the same model again and rewrite the priorities); else None. The human-free loop always runs
    (each round queries and labels new tasks)."""
    if svc.project_settings(state).loop_mode != "review":
        return None
    try:
        m = svc.loaded_model(state)
    except Exception:  # noqa: BLE001 - an unusable model: train a new one
        return None
    if m is None or m.manifest.get("info", {}).get("labels_fingerprint") != labels_fingerprint(pool, spec):
        return None
    return m.pointer


def query_project(svc: Runtime, state: ProjectState, ctx: JobContext, strategy: str | None = None) -> dict:
    """The ``query`` job: rank every unlabeled task with the current student (``strategy``, default the
    project's) and write the queue: the serving model's review lines (its mixture's answers come from the
    cache), the ranks and priorities."""
    client, spec, pool = _pull(svc, state, ctx)
    ps = svc.project_settings(state)
    strategy = strategy or ps.strategy
    m = svc.loaded_model(state)
    student = svc.student_of(state, m) if m is not None else None
    if student is None:
        raise TrainingError(f"project {state.id}: no trained student yet; run a training job first (molal train)")
    mixture, res = annotate_pool(svc, state, spec, pool.texts, ctx, 0.05, 0.5)
    srv = svc.serving(state, spec, pool.texts)
    rows = res.done_idx.tolist()
    probs = (srv.probs_from_outputs(res.outputs) if srv.needs_llms
             else student.predict_proba([pool.texts[r] for r in rows]))
    served = {r: np.asarray(probs[i], dtype=np.float64) for i, r in enumerate(rows)}
    ranking = rank_queue(state, student, pool, range(len(pool)), strategy, ps.priority_top,
                         on_rows=lambda n: ctx.progress(0.6, f"ranking {n} unlabeled tasks with {strategy}"))
    norm = res.outputs.normalized_probs() if len(rows) else None
    llm = {r: norm[i] for i, r in enumerate(rows)} if norm is not None else None
    plan = plan_queue(state, pool, spec, ranking, version=srv.version, field=ps.priority_field,
                      head=ps.priority_top, served=served, llm=llm, voters=voters_of(mixture.member_versions()),
                      failed=res.failed and {int(k): v for k, v in res.failed.items()}, audit_every=ps.audit_every)
    out = write_head(svc, client, state, plan, pool, ctx, value_key=spec.value_key)
    out.update({"strategy": strategy, "ranked": len(ranking.rows)})
    ctx.progress(1.0, f"ranked {len(ranking.rows)} tasks with {strategy}")
    return out


def train_project(svc: Runtime, state: ProjectState, ctx: JobContext) -> dict:
    """The ``train`` job (the START_TRAINING button, every N annotations, ``molal train``). Without new or
    changed human labels since the serving model (review mode) it says so and publishes nothing, unless the
    job's payload says ``force``."""
    from molal.service.status import announce

    announce(svc, state)  # "training…" in Label Studio, within seconds of Start Training
    seen = int(state.get("new_annotations", 0) or 0)  # the labels counted so far are in this job's pull
    client, spec, pool = _pull(svc, state, ctx)
    ps = svc.project_settings(state)
    same = None if ctx.job.get("payload", {}).get("force") else nothing_new(svc, state, spec, pool)
    if same is not None:
        msg = (f"no new or changed human labels since {same['molam']} was trained: nothing to do "
               "(molal train --force retrains anyway)")
        out = {"skipped": msg, "version": same["molam"], "n_human": len(pool.human), "n_tasks": len(pool)}
        job = resume(svc, state)  # a queue writer that gave way to this job goes on
        if job is not None:
            out["queue_job"] = job
        ctx.progress(1.0, msg)
        return out
    # The per-LLM votes (llm:<name>) do not depend on the model being trained: Label Studio imports them
    # while MoLAM and the student train (its server and this job each keep a core busy).
    # In a project of more unlabeled tasks than predictions_top, only the head of the queue gets
    # predictions (the served one; per-member ones would keep Label Studio from asking /predict)
    top = head_limit(ps, pool)
    # the review panel goes in before anything is published: an edit Label Studio could not parse fails the job
    # here, with nothing half-done (the model, predictions and priorities come after)
    panel = ensure_review_panel(client, state.id) if ps.review_panel else None
    early: list[Future] = []
    llm_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"molal-llm-preds-{state.id}")

    def on_annotated(rows: np.ndarray, outputs: Any, versions: list[str]) -> None:
        if ps.per_llm_predictions and not top:
            early.append(llm_pool.submit(push_predictions, svc, client, state, spec, pool, rows.tolist(), None,
                                         None, outputs, versions, ctx))

    try:
        rr = fit_round(svc, state, spec, pool, ctx, job_id=ctx.id, on_annotated=on_annotated)
    finally:
        llm_pool.shutdown(wait=True)  # never leave the import running behind a failed round
    n_pred = sum(f.result() for f in early)  # raises the import's error, if any
    rows = rr.rows.tolist()
    # measured against people's labels; with auto_label, the certified labels are written before the queue is
    # planned (they leave it: molal.service.quality)
    trust = after_round(state, client, spec, pool, rows, rr.molam_probs, rr.llm_outputs, rr.member_versions,
                        rr.pointer["molam"], ps, ctx)
    served = {r: np.asarray(rr.probs[i], dtype=np.float64) for i, r in enumerate(rows)}
    if rr.student is not None:
        ctx.progress(0.9, f"query: ranking unlabeled tasks with {ps.strategy}")
        ranking = rank_queue(state, rr.student, pool, rows, ps.strategy, ps.priority_top)
    else:
        ranking = rank_by_confidence(pool, rows, served, state)
    flagged = 0
    auto_rows: dict[int, str] = {}
    if rr.new_auto or state.auto_labels():
        auto = state.auto_labels()
        row_of = pool.row_of()
        auto_rows = {row_of[t]: spec.classes[a["label"]] for t, a in auto.items() if t in row_of}
        upd = []
        for r in rr.new_auto:
            d = dict(pool.data[r])
            d[AUTO_FLAG] = auto_rows[r]
            upd.append((pool.task_ids[r], d))
            pool.data[r] = d
        flagged = client.update_task_data(upd)
    llm = None
    if rr.llm_outputs is not None:
        norm = rr.llm_outputs.normalized_probs()
        llm = {r: norm[i] for i, r in enumerate(rows)}
    plan = plan_queue(state, pool, spec, ranking, version=rr.version, field=ps.priority_field,
                      head=ps.priority_top, served=served, llm=llm, voters=voters_of(rr.member_versions),
                      auto=auto_rows, audit_every=ps.audit_every)
    # The new model's predictions first (Label Studio keeps pre-filling from the previous version, beside the
    # previous lines, until the version is published), then the head's lines, publishing the version once
    # the first few are written: a line and the pre-fill beside it are from one model (write_head)
    head = None
    if top:  # the plan's first tasks (audit places included); this round's auto-labelled rows keep theirs
        at = pool.row_of()
        head = {at[t] for t in plan.task_ids[:top]} | (set(rr.new_auto) - set(pool.human))
    n_pred += push_predictions(svc, client, state, spec, pool, rows, rr.probs, rr.version,
                               None if early else rr.llm_outputs, rr.member_versions, ctx, head=head,
                               publish=False)
    queued = write_head(svc, client, state, plan, pool, ctx, value_key=spec.value_key,
                        retire={"keep": rr.version, "members": rr.member_versions, "members_too": bool(top)},
                        publish=lambda: publish_version(svc, client, state, rr.version))
    # the superseded versions' predictions go in the background (queue_job), a few at a time: deleting a
    # version at once holds Label Studio's SQLite for seconds, and a person's submission meanwhile fails
    out: dict[str, Any] = {**trust, "version": rr.version, "pointer": rr.pointer, "predictions_pushed": n_pred,
                           "auto_labelled": flagged, "n_human": rr.info["n_human"], "n_tasks": len(pool), **queued}
    if rr.info.get("member_warnings"):  # a member that may hurt: named in the job's result, with what to try
        out["member_warnings"] = rr.info["member_warnings"]
        out["members_flagged"] = {m["name"]: m["problem"] for m in rr.info.get("members", []) if m.get("problem")}
    if "stop" in rr.info:  # the stopping rule: κ of this round's predictions against the last round's
        out["stop"] = rr.info["stop"]
    out["to_human"] = len(rr.to_human)
    out["review_fields_written"] = min(plan.head, len(plan))
    out["ranked_by"] = ranking.by
    if panel is not None:
        out["review_panel"] = panel
    state.incr("new_annotations", -min(seen, int(state.get("new_annotations", 0) or 0)))  # labels since stay
    if rr.info.get("unannotated"):  # the job succeeded, but the person reading its status must see this
        out["unannotated"] = rr.info["unannotated"]
        ctx.progress(1.0, f"done: serving {rr.version}; {rr.info['unannotated']}")
    else:
        ctx.progress(1.0, f"done: serving {rr.version}")
    return out


def sync_project(svc: Runtime, state: ProjectState, ctx: JobContext) -> dict:
    """The ``sync`` job: pull tasks, annotate the pool (cache), push the serving model's predictions."""
    client, spec, pool = _pull(svc, state, ctx)
    if len(pool) == 0:
        return {"n_tasks": 0}
    # the few-shot examples (examples = "seeds") stay those the serving model was trained with: only training
    # changes them, with the model
    mixture, res = annotate_pool(svc, state, spec, pool.texts, ctx, 0.05, 0.8)
    srv = svc.serving(state, spec, pool.texts)
    rows = res.done_idx.tolist()
    if srv.needs_llms:
        probs = srv.probs_from_outputs(res.outputs)
    else:
        probs = svc.student_of(state, srv.model).predict_proba([pool.texts[r] for r in rows])
    ps = svc.project_settings(state)
    top = head_limit(ps, pool)
    head = queue_head(pool, rows, top, field=ps.priority_field) if top else None
    n = push_predictions(svc, client, state, spec, pool, rows, np.asarray(probs), srv.version, res.outputs,
                         mixture.member_versions(), ctx, head=head)
    retire = {"keep": srv.version, "members": mixture.member_versions(), "members_too": bool(top)}
    if ps.retire_grace_s > 0:  # deleted after the grace (queue.retire_wait), by a later job
        retire_later(state, retire)
    else:
        retire_superseded(client, state.id, retire["keep"], ctx, retire["members"], retire["members_too"])
    ctx.progress(1.0, f"pushed {n} predictions ({srv.version})")
    return {"version": srv.version, "predictions_pushed": n, "n_tasks": len(pool), "annotated": len(rows),
            "n_human": len(pool.human)}


def query_job(svc: Runtime, state: ProjectState, ctx: JobContext) -> dict:
    """The ``query`` job (``molal query``): :func:`query_project` with the strategy of the job's payload."""
    return query_project(svc, state, ctx, strategy=ctx.job["payload"].get("strategy"))


def annotate_job(svc: Runtime, state: ProjectState, ctx: JobContext) -> dict:
    """The ``annotate`` job: :func:`annotate_texts` on the job's payload."""
    return annotate_texts(svc, state, ctx, ctx.job["payload"])


#: every job kind and the function that runs it (the one list: the service runs and validates kinds by it)
JOBS: dict[str, Callable[[Runtime, ProjectState, JobContext], dict]] = {
    "train": train_project,
    "sync": sync_project,
    "query": query_job,
    "annotate": annotate_job,
    "queue": queue_job,
    "certify": certify_job,
}


__all__ = ["JOBS", "Pool", "RoundResult", "TrainingError", "fit_round", "mean_probs", "molal_wrote", "pool_from_tasks",
           "query_project"]
