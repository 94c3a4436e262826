"""What happened after *Start Training*, where the person in front of Label Studio looks — not in a terminal.

Label Studio shows "Request Sent! Response: {}" whatever its ML backend answers, so molal says it in three
places of its own, each kept to the truth of the job table and the project's state (:func:`project_status`):

* the name on molal's card in *Settings → Model*, where Start Training is pressed: the name the team gave it,
  then ``· training…``, ``· training queued``, ``· model 5``, ``· model 5 · nothing new to learn`` or
  ``· training failed`` (only when molal is the project's one model connection: with several, molal cannot
  tell which card is its own);
* with the review panel on, a block at the top of the labelling instructions (the *Instructions* button of
  every labelling screen, and before the first task of the stream; between two comments, so it is replaced
  exactly and the team's own text stays): what serves, when it was trained and on how many labels, what is
  running or queued, when the queue changes next, and a link to the page below;
* ``GET /projects/<id>/status``: the same as an HTML page, behind the backend's authentication.

(The Data Manager tab keeps its name, "molal queue": Label Studio cuts tab names at ~15 characters.)

:func:`announce` writes the first two; the web process calls it when a training job is queued (in a thread:
Label Studio's webhook call waits for nobody), and the jobs when they start, and when they end. Every call
writes the state as it is then, so the last one wins with the truth.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from molal.service.lsclient import LSClient
    from molal.service.runtime import Runtime
    from molal.service.store import ProjectState

log = logging.getLogger("molal.status")

STATUS_BEGIN = "<!-- molal:status -->"
STATUS_END = "<!-- /molal:status -->"
WRITTEN_KEY = "status_written"  # what was last written to Label Studio: (card name, instructions block)
CARD_BASE_KEY = "card_name"  # the name the team gave molal's model connection (before molal's state)
STATE_SEP = " · "
BACKEND_URL_KEY = "backend_url"  # how Label Studio reaches this backend (the status page link)


def _when(ts: float | None) -> str:
    return time.strftime("%H:%M", time.localtime(ts)) if ts else "?"


def project_status(svc: Runtime, state: ProjectState) -> dict[str, Any]:
    """The project's state as people should see it: the serving model, the training job running or queued
    (or the last one: done, skipped with its reason, failed), the next retrain, the queue's progress."""
    from molal.service.queue import progress

    ps = svc.project_settings(state)
    cur = state.current()
    out: dict[str, Any] = {"project": state.id, "model": None, "training": None, "last": None,
                           "queue": progress(state), "train_every": ps.train_every,
                           "new_labels": int(state.get("new_annotations", 0) or 0)}
    if cur is not None:
        try:
            info = state.read_manifest(cur["dir"], verify=False).get("info") or {}
        except Exception:  # noqa: BLE001 - the pointer is enough to say what serves
            info = {}
        version = cur["student"] if ps.serve_model == "student" and cur.get("student") else cur["molam"]
        out["model"] = {"version": version, "number": cur.get("n"), "trained_at": cur.get("published"),
                        "labels": info.get("n_human"), "tasks": info.get("n_tasks")}
    from molal.service.quality import QUALITY_KEY, summary_line

    out["quality"] = summary_line(state.get(QUALITY_KEY))
    jobs = [j for j in svc.jobs.list(project=state.id, limit=20) if j.get("kind") in ("train", "queue")]
    train = [j for j in jobs if j["kind"] == "train"]
    active = next((j for j in train if j["status"] in ("running", "queued")), None)
    if active is not None:
        out["training"] = {"status": active["status"], "job": active["id"], "message": active.get("message") or "",
                           "progress": active.get("progress"), "since": active.get("started") or active.get("created")}
    done = next((j for j in train if j["status"] in ("succeeded", "failed")), None)
    if done is not None:
        result = done.get("result") or {}
        out["last"] = {"status": "skipped" if result.get("skipped") else done["status"], "job": done["id"],
                       "at": done.get("finished"), "message": (result.get("skipped") or done.get("message") or "")}
    return out


def _model_words(st: dict) -> str:
    m = st.get("model")
    if not m:
        return "no model yet: label about 50 tasks, then press Start Training"
    labels = f" on {m['labels']} of your labels" if m.get("labels") is not None else ""
    return f"model {m['number']} ({m['version']}) serves, trained at {_when(m.get('trained_at'))}{labels}"


def short_state(st: dict) -> str:
    """A few words for the name of molal's card in Settings → Model."""
    t, last, m = st.get("training"), st.get("last"), st.get("model")
    if t is not None:
        return "training…" if t["status"] == "running" else "training queued"
    if last is not None and last["status"] == "failed":
        return "training failed"
    words = f"model {m['number']}" if m else "no model yet"
    if last is not None and last["status"] == "skipped":
        words += " · nothing new to learn"
    return words


def status_lines(st: dict) -> list[str]:
    """The state in sentences (plain text; :func:`instructions_block` and the page escape them)."""
    lines = [_model_words(st) + "."]
    t, last = st.get("training"), st.get("last")
    if t is not None:
        if t["status"] == "running":
            pct = f", {round(100 * t['progress'])}%" if isinstance(t.get("progress"), (int, float)) else ""
            lines.append(f"Training: job {t['job']} running since {_when(t.get('since'))}{pct} — {t['message']}. "
                         "The current model serves until it is done.")
        else:
            lines.append(f"Training: job {t['job']} is queued (since {_when(t.get('since'))}); it starts when the "
                         "project's running job ends.")
    elif last is not None:
        if last["status"] == "skipped":
            lines.append(f"Last Start Training ({_when(last.get('at'))}): skipped — {last['message']}.")
        elif last["status"] == "failed":
            lines.append(f"Last training ({_when(last.get('at'))}) failed: {last['message']}. The model above "
                         "still serves.")
        else:
            lines.append(f"Last training: done at {_when(last.get('at'))}.")
    every, new = st.get("train_every") or 0, st.get("new_labels") or 0
    if st.get("model") and every:
        lines.append(f"The queue changes next after {max(0, every - new)} more labels (molal retrains every "
                     f"{every}), or when you press Start Training.")
    elif st.get("model"):
        lines.append("The queue changes next when you press Start Training.")
    q = st.get("queue") or {}
    if q.get("total"):
        if q.get("upto", 0) >= q["total"]:
            lines.append(f"The queue: all {q['total']} unlabeled tasks ranked and explained.")
        else:
            lines.append(f"The queue: {q['total']} tasks ranked; ranks and review lines written for the first "
                         f"{q.get('upto', 0)}, the rest in the background.")
    if st.get("quality"):  # molal.service.quality
        lines.append(st["quality"])
    return lines


def instructions_block(st: dict, link: str | None) -> str:
    body = "<br/>".join(html.escape(x) for x in status_lines(st))
    more = f' <a href="{html.escape(link, quote=True)}" target="_blank">Status page</a>' if link else ""
    return (f'{STATUS_BEGIN}<div style="padding:6px 10px;margin-bottom:8px;background:#f4f6fb;'
            f'border-left:4px solid #5b7bd5"><b>molal:</b> {body}{more}</div>{STATUS_END}')


def with_block(instructions: str | None, block: str) -> str:
    """``instructions`` with molal's status block in front, in place of an earlier one."""
    text = instructions or ""
    i, j = text.find(STATUS_BEGIN), text.find(STATUS_END)
    if i >= 0 and j > i:
        text = text[:i] + text[j + len(STATUS_END):]
    return block + text


def status_page(svc: Runtime, state: ProjectState) -> str:
    """``GET /projects/<id>/status``: the project's state as a small HTML page (every value escaped)."""
    st = project_status(svc, state)
    rows = "".join(f"<li>{html.escape(x)}</li>" for x in status_lines(st))
    title = f"molal · project {state.id} · {html.escape(short_state(st))}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='10'>"
            f"<title>{title}</title></head><body style='font-family:sans-serif;max-width:48em;margin:2em'>"
            f"<h2>{title}</h2><ul>{rows}</ul><p style='color:#666'>This page refreshes every 10 s.</p>"
            f"</body></html>")


def announce(svc: Runtime, state: ProjectState, client: LSClient | None = None) -> bool:
    """Write the project's state into Label Studio (the name on molal's card in Settings → Model; with the
    review panel on, the instructions' block), where it changed. Best effort: a failure is logged, never raised. Returns whether
    anything was written."""
    from molal.service.lsclient import client_for

    try:
        ps = svc.project_settings(state)
        st = project_status(svc, state)
        client = client or client_for(svc.settings, state)
        card = client.model_connection(state.id)  # when molal is the project's only model connection
    except Exception as exc:  # noqa: BLE001 - the state shown in Label Studio is no reason to fail anything
        log.info("project %s: could not show molal's state in Label Studio: %s", state.id, exc)
        return False
    link = None
    base_url = state.get(BACKEND_URL_KEY)
    if base_url is None and card is not None:
        base_url = card["url"]
        state.put(BACKEND_URL_KEY, base_url)
    if base_url:
        link = f"{base_url.rstrip('/')}/projects/{state.id}/status"
    block = instructions_block(st, link) if ps.review_panel else None
    last = dict(state.get(WRITTEN_KEY) or {})
    wrote = False
    if card is not None:  # the card and the block each on their own: one failing leaves the other shown
        try:
            base = state.get(CARD_BASE_KEY)
            if base is None or not card["title"].startswith(base):  # named (again) by the team
                base = card["title"].split(STATE_SEP, 1)[0].strip() or "molal"
                state.put(CARD_BASE_KEY, base)
            name = f"{base}{STATE_SEP}{short_state(st)}"
            if card["title"] != name:
                client.rename_model_connection(card, name)
                wrote = True
            last["card"] = name
        except Exception as exc:  # noqa: BLE001
            log.info("project %s: could not show molal's state on its model card: %s", state.id, exc)
    if block is not None and last.get("block") != block:
        try:
            client.set_instructions(state.id, with_block(client.instructions(state.id), block), show=None)
            last["block"] = block
            wrote = True
        except Exception as exc:  # noqa: BLE001
            log.info("project %s: could not show molal's state in the instructions: %s", state.id, exc)
    state.put(WRITTEN_KEY, last)
    return wrote


def announce_later(svc: Runtime, state: ProjectState) -> None:
    """:func:`announce` in a thread (the web process, when a job is queued: Label Studio waits for nobody)."""
    threading.Thread(target=announce, args=(svc, state), daemon=True, name=f"molal-status-{state.id}").start()


__all__ = ["STATUS_BEGIN", "STATUS_END", "announce", "announce_later", "instructions_block", "project_status",
           "short_state", "status_lines", "status_page", "with_block"]
