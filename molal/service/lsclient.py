"""A thin wrapper over the Label Studio SDK 2.x client for what the jobs need.

Where Label Studio is and which key goes there is decided in one place, :mod:`molal.service.lstrust`
(``LABEL_STUDIO_URL`` + ``LABEL_STUDIO_API_KEY``, a legacy token or a personal access token / JWT refresh token —
the SDK handles both). Keys are never logged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("molal.lsclient")

#: the Data Manager tab molal keeps ordered by priority (short: Label Studio cuts tab titles at ~14 characters)
VIEW_TITLE = "molal queue"
#: its earlier title (a tab of that name is renamed, not duplicated)
OLD_VIEW_TITLES = ("molal: next to label",)
#: the tab's columns people need, left to right as Label Studio lists them; every other known column is hidden
#: (so Label Studio also computes the prediction score it shows: it skips columns when no list is given)
REVIEW_COLUMNS = ("id", "predictions_score", "data.molal_label", "data.molal_confidence", "data.molal_votes",
                  "data.molal_flag", "data.molal_uncertainty")
_SYSTEM_COLUMNS = ("inner_id", "completed_at", "total_annotations", "cancelled_annotations", "total_predictions",
                   "annotators", "annotations_results", "annotations_ids", "predictions_model_versions",
                   "predictions_results", "file_upload", "storage_filename", "created_at", "updated_at",
                   "updated_by", "avg_lead_time", "draft_exists", "data.molal_review", "data.molal_agreement",
                   "data.molal_audit")
AUTO_FLAG = "molal_auto_label"
#: the task data field of a task molal labelled itself with a certified label (what, by which model, at which ε, δ)
CERTIFIED_FLAG = "molal_certified"
#: what the first pass of :meth:`LSClient.tasks` asks Label Studio for
LIGHT_FIELDS = "id,data,predictions_model_versions"
#: Data Manager filter: tasks that hold an annotation (a skip included), by the annotations themselves: not by
#: the ``total_annotations`` counter, which Label Studio can leave stale (:meth:`LSClient.update_task_data`)
ANNOTATED_QUERY = json.dumps({"filters": {"conjunction": "and", "items": [
    {"filter": "filter:tasks:annotations_ids", "operator": "empty", "type": "List", "value": False}]}})
#: predictions per import request. Label Studio (1.23, default flags) recomputes the counters of *every*
#: task of the project after each import request (~1.5 s per request on 2,000 tasks, more on bigger
#: projects), so few large requests beat many small ones.
IMPORT_CHUNK = 10_000
#: Label Studio's default database is SQLite, which takes one writer at a time and makes every other write wait
#: at most 5 s (Django's busy timeout) before it fails — a person's submitted annotation included, lost with a
#: 500. molal's bulk writes therefore come in requests of about this many seconds each, with a pause between
#: them in which a waiting write gets its turn (one request deleting a version's 1,950 predictions held the
#: lock over 5 s: a submission failed).
WRITE_SLICE_S = 1.0
WRITE_PAUSE_S = 0.2


class LSConnectionError(RuntimeError):
    """No Label Studio URL/API key is known, or Label Studio could not be reached."""


def plain(obj: Any) -> Any:
    """SDK pydantic objects → plain dicts/lists (JSON types: datetimes as strings)."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "dict"):
        return obj.dict()
    return obj


def stale_counters(task: dict, predictions: bool = True) -> dict[str, Any]:
    """The counters Label Studio should hold for ``task`` (an answer to a task write: its ``annotations`` and
    ``predictions`` read after the save, its counters as saved) where they differ from those it saved; empty
    where they agree or the answer lists neither. ``is_labeled`` follows Label Studio's rule (distinct
    annotators of finished annotations ≥ ``overlap``); where annotations were added it is never turned off
    (a project that counts skips may hold it true on fewer)."""
    anns = task.get("annotations")
    if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
        return {}
    live = [a for a in anns if not a.get("was_cancelled")]
    want: dict[str, Any] = {"total_annotations": len(live), "cancelled_annotations": len(anns) - len(live)}
    preds = task.get("predictions")
    if predictions and isinstance(preds, list):
        want["total_predictions"] = len(preds)
    fix = {k: v for k, v in want.items() if isinstance(task.get(k), int) and task.get(k) != v}
    if "total_annotations" in fix or "cancelled_annotations" in fix:
        def who(a: dict) -> Any:
            c = a.get("completed_by")
            return c.get("id") if isinstance(c, dict) else c

        finished = {who(a) for a in live if a.get("result") is not None}
        overlap = task.get("overlap") if isinstance(task.get("overlap"), int) else 1
        labelled = len(finished) >= overlap
        if len(live) > (task.get("total_annotations") or 0):
            labelled = labelled or bool(task.get("is_labeled"))
        if labelled != bool(task.get("is_labeled")):
            fix["is_labeled"] = labelled
    return fix


def _prediction_versions(task: dict) -> list[str]:
    """The model versions of a task's predictions: Label Studio's ``predictions_model_versions`` (a
    comma-joined string, or a list) or, from a full task, its ``predictions``."""
    pmv = task.get("predictions_model_versions")
    if isinstance(pmv, str):
        versions = {v.strip() for v in pmv.split(",")}
    elif isinstance(pmv, list):
        versions = {str(v) for v in pmv}
    else:
        versions = {p.get("model_version") for p in task.get("predictions") or [] if isinstance(p, dict)}
    return sorted(v for v in versions if v)


def task_pages(client: Any, page_size: int = 1000, **query: Any) -> Iterator[Any]:
    """The SDK's ``tasks.list(**query)``, page by page, stopping at the last page. The SDK's own pager asks
    for one page past the end, which Label Studio answers 404 "Invalid page" — with a traceback in its log —
    on every listing."""
    page = 1
    while True:
        pager = client.tasks.list(page=page, page_size=page_size, **query)
        items = list(pager.items or [])
        yield from items
        total = getattr(pager.response, "total", None)
        if len(items) < page_size or (isinstance(total, int) and page * page_size >= total):
            return
        page += 1


def next_import_size(history: Sequence[tuple[int, float]], chunk: int, slice_s: float = WRITE_SLICE_S,
                     floor: int = 50) -> int:
    """The size of the next prediction import request, from the ``(size, seconds)`` of the ones before.

    Label Studio's time per import request is a part that does not depend on its size and grows with the
    predictions the project holds already (it recounts the touched tasks' counters with joins: 2–9 s a request,
    however small, at 20,000 tasks as their predictions came in), plus a part per prediction. Requests are sized to take
    about ``slice_s`` (:data:`WRITE_SLICE_S`: a person's write waits for at most one of them), but where the
    fixed part ``a`` is large, a smaller request only repeats it: the size is then the one whose per-prediction
    part is as long as ``a`` (each request at most twice what it must cost, the whole import at most twice the
    fewest requests' time). ``a`` and the per-prediction cost ``b`` are read from the last request and the latest
    one before it of a size at least 1.5 times apart; before there is one, the size scales by ``slice_s / dt``
    (×0.25 to ×4). Between ``floor`` and ``chunk``.

    The rule it replaces scaled by ``slice_s / dt`` only: with a fixed part of seconds it shrank every request
    towards the floor (50); at 20,000 tasks the first job's ~100,000 predictions were not in after 68 min and
    676 requests (bench/RESULTS.md), where requests of 10,000 had taken 3 min."""
    size, dt = history[-1]
    prev = next(((s, t) for s, t in reversed(history[:-1]) if max(s, size) >= 1.5 * min(s, size)), None)
    if prev is None:
        new = size * min(4.0, max(0.25, slice_s / max(dt, 1e-3)))
    else:
        b = (dt - prev[1]) / (size - prev[0])
        if b <= 0:  # a bigger request took no longer: the cost is the fixed part, so the fewest requests
            return chunk
        a = max(0.0, dt - b * size)
        new = max(slice_s - a, a) / b
    return int(min(chunk, max(floor, new)))


class LSClient:
    """What molal does to a Label Studio project through the SDK."""

    def __init__(self, url: str, api_key: str, timeout: float = 60.0, threads: int = 8, opaque: bool = False) -> None:
        """``opaque``: ``url`` came from a /setup (MOLAL_TRUST_SETUP_HOSTNAME), so every failure reads the same
        to the caller (:func:`molal.service.lstrust.logged_failure`)."""
        if not url or not api_key:
            raise LSConnectionError(
                "Label Studio is not configured: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or connect the "
                "backend from Label Studio, which sends its hostname and token in /setup)"
            )
        from label_studio_sdk.client import LabelStudio

        self.url = url.rstrip("/")
        self.client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)
        self.threads = threads
        self.opaque = opaque
        #: task writes whose stale counters were set back (:meth:`_keep_counters`)
        self.counters_repaired = 0
        self._lock = threading.Lock()

    def explain(self, what: str, exc: Exception) -> LSConnectionError:
        """A clear error for a failed Label Studio call: what, the status and what to do, and an error id
        under which the log has the address and the exception. It never names the address (a job's message is
        public: GET /jobs). For a /setup Label Studio (``opaque``) only a fixed sentence and the id."""
        from molal.service.lstrust import SETUP_LS_FAILED, logged_failure, without_urls

        status = getattr(exc, "status_code", None)
        detail = f"Label Studio at {self.url}, {what}: {type(exc).__name__}: {str(exc)[:500]}"
        if self.opaque:
            return LSConnectionError(logged_failure(log, SETUP_LS_FAILED, detail))
        if isinstance(status, int):
            hint = {401: "the API key/token was refused (check LABEL_STUDIO_API_KEY)",
                    403: "the API key/token may not access this project",
                    404: "no such project or task"}.get(status, "Label Studio failed; the job can be retried")
            return LSConnectionError(logged_failure(log, f"Label Studio answered HTTP {status} to {what}: {hint}",
                                                    detail))
        why = without_urls(str(exc)).replace(self.url, "<url>")[:200]
        return LSConnectionError(logged_failure(
            log, f"Label Studio is unreachable during {what} ({type(exc).__name__}: {why}); the job can be retried",
            detail))

    # -- reading ---------------------------------------------------------------------------------------
    def label_config(self, project: int) -> str:
        try:
            return self.client.projects.get(id=project).label_config
        except Exception as exc:  # the SDK raises ApiError or httpx errors
            raise self.explain(f"reading project {project}", exc) from exc

    def task(self, task_id: int) -> dict:
        """One task as Label Studio holds it: ``id``, ``project``, ``data`` and ``labelled`` (it holds an
        annotation that is not a skip)."""
        try:
            d = plain(self.client.tasks.get(id=task_id))
        except Exception as exc:
            raise self.explain(f"reading task {task_id}", exc) from exc
        anns = [a for a in d.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        return {"id": int(d["id"]), "project": d.get("project"), "data": d.get("data") or {},
                "labelled": bool(d.get("total_annotations") or anns)}

    def tasks(self, project: int, page_size: int = 1000, on_page: Callable[[int], None] | None = None) -> list[dict]:
        """All tasks of ``project`` as dicts with ``id``, ``data``, ``annotations`` (full) and
        ``prediction_versions`` (the model versions of the predictions it already has)."""
        try:
            return self._tasks(project, page_size, on_page)
        except Exception as exc:
            raise self.explain(f"listing the tasks of project {project}", exc) from exc

    def _tasks(self, project: int, page_size: int, on_page: Callable[[int], None] | None) -> list[dict]:
        # Two passes instead of one ``fields=all`` listing: (1) every task with only id, data and its
        # predictions' model versions (``include``: Label Studio then serialises nothing else; 8x faster
        # than fields=all on 2,000 tasks, measured), (2) the tasks holding an annotation (found by their
        # annotations, not by a counter Label Studio may have left stale) with their full annotations
        # (``include`` would reduce annotations to ids); counters found stale there are set back. A Label
        # Studio that ignores ``include``/``query`` returns full tasks, which parse the same way.
        out: list[dict] = []
        for t in task_pages(self.client, project=project, fields="all", include=LIGHT_FIELDS, page_size=page_size):
            d = plain(t)
            out.append({"id": int(d["id"]), "data": d.get("data") or {}, "annotations": d.get("annotations") or [],
                        "prediction_versions": _prediction_versions(d)})
            if on_page is not None and len(out) % page_size == 0:
                on_page(len(out))
        by_id = {t["id"]: t for t in out}
        for t in task_pages(self.client, project=project, fields="all", query=ANNOTATED_QUERY, page_size=page_size):
            d = plain(t)
            task = by_id.get(int(d["id"]))
            if task is not None:  # a task created after pass 1 waits for the next job
                task["annotations"] = [a for a in d.get("annotations") or [] if isinstance(a, dict)]
                self._keep_counters(task["id"], d, predictions=False)
        return out

    # -- writing ---------------------------------------------------------------------------------------
    def _keep_counters(self, task_id: int, saved: Any, tries: int = 3, predictions: bool = True) -> None:
        """Set back counters Label Studio holds stale (see :meth:`update_task_data`): ``saved`` is a task as
        Label Studio answered a write (its annotations and predictions as they are after it, its counters as
        saved) or listed it. Rewrites until the two agree, at most ``tries`` times. ``predictions=False``: leave
        ``total_predictions`` (a listing's predictions need not be all of them)."""
        for _ in range(tries):
            fix = stale_counters(saved, predictions=predictions) if isinstance(saved, dict) else None
            if not fix:
                return
            log.warning("task %s: Label Studio's counters disagree with the task's annotations or predictions "
                        "(a write crossed a new one); setting them back: %s", task_id,
                        ", ".join(f"{k}={v}" for k, v in sorted(fix.items())))
            with self._lock:
                self.counters_repaired += 1
            try:
                saved = plain(self.client.tasks.update(id=str(task_id), **fix))
            except Exception as exc:
                raise self.explain(f"setting back the counters of task {task_id}", exc) from exc
        log.warning("task %s: Label Studio's counters still disagree with its annotations after %d tries", task_id,
                    tries)

    def import_predictions(self, project: int, predictions: Iterable[dict], chunk: int = IMPORT_CHUNK,
                           on_chunk: Callable[[int], None] | None = None, timeout: float = 600.0,
                           total: int | None = None) -> int:
        """Bulk-create predictions (``POST /api/projects/<id>/import/predictions``), ``chunk`` per call
        (each call may take a while on Label Studio's side: ``timeout`` seconds). ``predictions`` may be a
        generator: only one request's worth is in memory at a time (``total``: its length, for messages)."""
        import itertools

        it = iter(predictions)
        if total is None and isinstance(predictions, Sized):
            total = len(predictions)
        n = 0
        size = min(chunk, 500)  # then sized by :func:`next_import_size`, up to ``chunk``
        history: list[tuple[int, float]] = []
        while True:
            part = list(itertools.islice(it, size))
            if not part:
                break
            if n:
                time.sleep(WRITE_PAUSE_S)
            t0 = time.monotonic()
            try:
                self.client.projects.import_predictions(id=project, request=part,
                                                        request_options={"timeout_in_seconds": int(timeout)})
            except Exception as exc:
                of = f" of {total}" if total is not None else ""
                raise self.explain(f"importing predictions into project {project} ({n}{of} done)", exc) from exc
            dt = time.monotonic() - t0
            n += len(part)
            history.append((len(part), dt))
            size = next_import_size(history, chunk)
            if on_chunk is not None:
                on_chunk(n)
        return n

    def update_task_data(self, updates: Iterable[tuple[int, dict]]) -> int:
        """``tasks.update(id, data=...)`` for each (task id, full new data), on a thread pool.

        Label Studio saves a PATCHed task whole, counters included, as it read them when the request began: a
        person's annotation created in between loses its count (``total_annotations`` back to 0,
        ``is_labeled`` false) and the task returns to the labelling stream, unseen by the next job. Each write's
        answer is therefore checked, and counters it left stale are set back (:meth:`_keep_counters`)."""
        updates = list(updates)
        if not updates:
            return 0

        def one(item: tuple[int, dict]) -> None:
            saved = plain(self.client.tasks.update(id=str(item[0]), data=item[1]))
            self._keep_counters(item[0], saved)

        try:
            with ThreadPoolExecutor(max_workers=self.threads) as ex:
                list(ex.map(one, updates))
        except Exception as exc:
            raise self.explain(f"updating the data of {len(updates)} tasks", exc) from exc
        return len(updates)

    def ensure_view(self, project: int, field: str, title: str = VIEW_TITLE, value_key: str = "text") -> int:
        """Create or update the Data Manager tab ``title``: unlabeled tasks only (no annotation), ordered by
        ``-tasks:data.<field>`` (numeric), the text and molal's review fields first, internal columns hidden."""
        column = f"tasks:data.{field}"
        hidden = [f"tasks:{c}" for c in _SYSTEM_COLUMNS if c not in REVIEW_COLUMNS]
        data = {
            "title": title,
            "ordering": [f"-{column}"],
            "type": "list",
            "target": "tasks",
            "columnsDisplayType": {column: "Number", "tasks:data.molal_confidence": "Number",
                                   "tasks:data.molal_uncertainty": "Number"},
            "columnsWidth": {"tasks:id": 70, "tasks:predictions_score": 110, f"tasks:data.{value_key}": 420,
                             "tasks:data.molal_label": 120, "tasks:data.molal_confidence": 120,
                             "tasks:data.molal_votes": 240, "tasks:data.molal_flag": 130,
                             "tasks:data.molal_uncertainty": 120, column: 90},
            "hiddenColumns": {"explore": hidden, "labeling": hidden},
            "filters": {"conjunction": "and", "items": [
                {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}]},
        }
        try:
            vd = self._view(project, title)
            if vd is not None:
                self.client.views.update(id=str(vd["id"]), data=data, project=project)
                return int(vd["id"])
            v = self.client.views.create(project=project, data=data)
            return int(plain(v)["id"])
        except Exception as exc:
            raise self.explain(f"writing the tab {title!r} of project {project}", exc) from exc

    def _view(self, project: int, title: str = VIEW_TITLE) -> dict | None:
        """molal's tab: titled ``title`` (or ``title · …``, as molal named it for a while), or an old title."""
        for v in self.client.views.list(project=project):
            vd = plain(v)
            t = (vd.get("data") or {}).get("title") or ""
            if t == title or t.startswith(title + " · ") or t in OLD_VIEW_TITLES:
                return vd
        return None

    def instructions(self, project: int) -> str:
        try:
            return self.client.projects.get(id=project).expert_instruction or ""
        except Exception as exc:
            raise self.explain(f"reading the instructions of project {project}", exc) from exc

    def model_connection(self, project: int) -> dict | None:
        """The project's model connection (``id``, ``title``, ``url``, and what Label Studio needs to accept a
        change of it: ``project``, ``auth_method``, ``basic_auth_user``) when it has exactly one (molal's own);
        None otherwise (several: which one is molal's cannot be told)."""
        try:
            found = [plain(b) for b in self.client.ml.list(project=project)]
        except Exception as exc:
            raise self.explain(f"listing the model connections of project {project}", exc) from exc
        if len(found) != 1 or not isinstance(found[0].get("url"), str):
            return None
        b = found[0]
        return {"id": int(b["id"]), "title": str(b.get("title") or ""), "url": b["url"],
                "project": int(b.get("project") or project), "auth_method": b.get("auth_method") or "NONE",
                "basic_auth_user": b.get("basic_auth_user")}

    def rename_model_connection(self, card: dict, title: str) -> None:
        """The name Label Studio shows on the model connection's card ``card`` (from :meth:`model_connection`;
        molal's state: molal.service.status). Label Studio validates a change of a connection as a new one
        (it checks ``url``, ``project`` and the authentication, and calls the backend's /health and /setup),
        so those go with the title, unchanged; an empty password keeps the stored one."""
        kw: dict = {"url": card["url"], "project": card["project"], "auth_method": card["auth_method"]}
        if card["auth_method"] == "BASIC_AUTH":
            kw.update(basic_auth_user=card.get("basic_auth_user") or "", basic_auth_pass="")
        try:
            self.client.ml.update(id=card["id"], title=title, **kw)
        except Exception as exc:
            raise self.explain(f"renaming model connection {card['id']}", exc) from exc

    def set_label_config(self, project: int, config: str) -> None:
        """Replace the project's label config (Label Studio checks it against the existing annotations)."""
        try:
            self.client.projects.update(id=project, label_config=config)
        except Exception as exc:
            raise self.explain(f"updating the label config of project {project}", exc) from exc

    def set_instructions(self, project: int, html: str, show: bool | None = True) -> None:
        """The project's labeling instructions (shown before labeling when ``show``; None: left as it is)."""
        try:
            kw = {} if show is None else {"show_instruction": show}
            self.client.projects.update(id=project, expert_instruction=html, **kw)
        except Exception as exc:
            raise self.explain(f"updating the instructions of project {project}", exc) from exc

    def set_model_version(self, project: int, version: str) -> bool:
        """Set the project's model_version (so ``predictions_score`` and Uncertainty sampling use it).
        Label Studio answers 400 until one prediction of that version exists: then False."""
        try:
            self.client.projects.update(id=project, model_version=version)
            return True
        except Exception as exc:  # the SDK raises ApiError subclasses
            log.warning("could not set project %s model_version to %s: %s", project, version, type(exc).__name__)
            return False

    def model_versions(self, project: int) -> dict[str, int]:
        """The model versions of the project's predictions and how many each has (Label Studio's
        ``GET /api/projects/<id>/model-versions/``, what Settings → Predictions lists)."""
        try:
            r = self.client._client_wrapper.httpx_client.request(  # type: ignore[attr-defined]
                f"api/projects/{int(project)}/model-versions/", method="GET")
            r.raise_for_status()
            data = r.json()
            return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except Exception as exc:
            raise self.explain(f"listing the model versions of project {project}", exc) from exc

    def prediction_ids(self, project: int, versions: set[str]) -> dict[str, list[int]]:
        """The ids of the project's predictions of ``versions`` (one ``GET /api/predictions/?project=``)."""
        try:
            r = self.client._client_wrapper.httpx_client.request(  # type: ignore[attr-defined]
                "api/predictions/", method="GET", params={"project": int(project)},
                request_options={"timeout_in_seconds": 600})
            r.raise_for_status()
            data = r.json()
        except Exception as exc:
            raise self.explain(f"listing the predictions of project {project}", exc) from exc
        out: dict[str, list[int]] = {v: [] for v in versions}
        for p in data if isinstance(data, list) else data.get("results", []) if isinstance(data, dict) else []:
            v = p.get("model_version") if isinstance(p, dict) else None
            if v in out and isinstance(p.get("id"), int):
                out[v].append(p["id"])
        return out

    def delete_predictions(self, ids: list[int], should_stop: Callable[[], bool] | None = None,
                           batch: int = 32) -> int:
        """Delete predictions one by one (``DELETE /api/predictions/<id>/``: a short write each, where deleting
        a whole version is one long one; see :data:`WRITE_SLICE_S`), ``self.threads`` at a time, checking
        ``should_stop()`` between batches. Returns how many were deleted (a prediction gone already counts)."""

        def one(pid: int) -> None:
            r = self.client._client_wrapper.httpx_client.request(  # type: ignore[attr-defined]
                f"api/predictions/{int(pid)}/", method="DELETE")
            if r.status_code not in (200, 204, 404):
                r.raise_for_status()

        n = 0
        try:
            with ThreadPoolExecutor(max_workers=self.threads) as ex:
                for i in range(0, len(ids), batch):
                    if should_stop is not None and should_stop():
                        break
                    list(ex.map(one, ids[i:i + batch]))
                    n += len(ids[i:i + batch])
        except Exception as exc:
            raise self.explain(f"deleting {len(ids)} predictions ({n} done)", exc) from exc
        return n

    def create_annotations(self, project: int, items: list[tuple[int, list[dict]]],
                           should_stop: Callable[[], bool] | None = None, batch: int = 32,
                           on_batch: Callable[[int], None] | None = None) -> dict[int, int]:
        """Create one annotation per (task id, result), marked as a machine's: ``last_action="prediction"``
        (Label Studio's "Created from prediction", the action it records when its own Data Manager turns
        predictions into annotations), one short write each, ``self.threads`` at a time, checking
        ``should_stop()`` between batches (see :data:`WRITE_SLICE_S`). Returns task id -> annotation id."""
        out: dict[int, int] = {}

        def one(item: tuple[int, list[dict]]) -> tuple[int, int]:
            a = self.client.annotations.create(id=int(item[0]), result=item[1], project=int(project),
                                               last_action="prediction", was_cancelled=False, ground_truth=False)
            return int(item[0]), int(plain(a)["id"])

        try:
            with ThreadPoolExecutor(max_workers=self.threads) as ex:
                for i in range(0, len(items), batch):
                    if should_stop is not None and should_stop():
                        break
                    if i:
                        time.sleep(WRITE_PAUSE_S)
                    out.update(ex.map(one, items[i:i + batch]))
                    if on_batch is not None:
                        on_batch(len(out))
        except Exception as exc:
            raise self.explain(f"creating {len(items)} annotations in project {project} ({len(out)} done)",
                               exc) from exc
        return out

    def set_uncertainty_sampling(self, project: int) -> None:
        try:
            self.client.projects.update(id=project, sampling="Uncertainty sampling")
        except Exception as exc:
            raise self.explain(f"setting the sampling of project {project}", exc) from exc


def client_for(settings: Any, state: Any) -> LSClient:
    """The SDK client for a project's Label Studio, under the one trust rule of :mod:`molal.service.lstrust`
    (``state``: the project's :class:`~molal.service.store.ProjectState`). LSConnectionError: none may be
    used (the message says what to configure)."""
    from molal.service.lstrust import access_for

    a = access_for(settings, state)
    if not a.url or not a.key:
        raise LSConnectionError(f"project {state.id}: {a.missing}")
    return LSClient(a.url, a.key, opaque=a.from_setup)


def dumps_safe(obj: Any) -> str:
    return json.dumps(obj, default=str)[:2000]
