"""``molal demo``: a real Label Studio + the molal backend on 127.0.0.1, one project driven end to end.

Steps (each one is a function, reused by the end-to-end tests):

1. start Label Studio (:class:`molal.lsprocess.LabelStudioProcess`, data under ``<dir>/label-studio``)
   and the backend under gunicorn (``<dir>/backend`` is its ``MODEL_DIR``);
2. create a text-classification project (``<Choices>`` + ``<Text>``) and import the tasks;
3. connect the backend (``ml.create``); Label Studio registers the webhook itself;
4. label the seed tasks with their gold labels through the API — a SIMULATED human, reported as such;
5. press "Start Training" (``ml.train``): Label Studio sends START_TRAINING, the backend runs a train job
   (annotate → MoLAM → student → predictions for every unlabeled task → query priorities);
6. report MoLAM's accuracy on the other tasks (from the predictions stored in Label Studio), each LLM's
   accuracy (its ``llm:<name>`` predictions; embedding scorers' are ``scorer:<name>``), and the head of the "molal queue" tab.

State (project id, API token, password) is kept in ``<dir>/demo-state.json`` (mode 0600) so that a second
run reuses the servers' data (fast restart); ``fresh=True`` starts over.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molal.datasets import CLASS_NAMES
from molal.lsprocess import BackendProcess, LabelStudioProcess, free_port
from molal.service.lsclient import VIEW_TITLE, plain, task_pages

STATE_FILE = "demo-state.json"
DEFAULT_USER = "admin@molal.local"
#: class order of the bundled TREC sample (as in its recorded LLM outputs)
TREC_CLASSES = tuple(CLASS_NAMES["trec"])


# -- data ------------------------------------------------------------------------------------------------------
def load_rows(path: str | Path | None = None, labels: list[str] | None = None, n: int | None = None,
              seed: int = 0) -> tuple[list[dict], list[str]]:
    """Rows ``{"text", "label"}`` (label may be None) and the class names.

    ``path=None``: the bundled TREC sample (its texts match the recorded LLM outputs, so the replay
    annotator serves real LLM answers). A user's JSONL needs a ``text`` field and, for the seeds, ``label``."""
    from molal.resources import asset_path

    src = Path(path) if path else asset_path("trec.jsonl")
    rows: list[dict] = []
    with open(src, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{src}:{lineno}: not JSON ({exc})") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{src}:{lineno}: no 'text' field")
            lab = obj.get("label")
            rows.append({"text": text, "label": None if lab in (None, "") else str(lab)})
    if labels is None:
        if path is None:
            labels = list(TREC_CLASSES)
        else:
            labels = sorted({r["label"] for r in rows if r["label"] is not None})
    if not labels:
        raise ValueError(f"{src}: no labels found; pass --labels a,b,c")
    unknown = sorted({r["label"] for r in rows if r["label"] is not None and r["label"] not in labels})
    if unknown:
        raise ValueError(f"{src}: labels not in {labels}: {unknown[:5]}")
    if n is not None and n < len(rows):
        rng = random.Random(seed)
        rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
    return rows, list(labels)


def label_config(classes: list[str]) -> str:
    from xml.sax.saxutils import quoteattr

    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return ('<View><Text name="text" value="$text"/>'
            f'<Choices name="label" toName="text" choice="single" showInLine="true">{choices}</Choices></View>')


# -- Label Studio steps -----------------------------------------------------------------------------------------
def create_project(client, title: str, classes: list[str], rows: list[dict]) -> tuple[int, list[int]]:
    """Create the project and import ``rows`` (only ``text`` goes to Label Studio); return (id, task ids)."""
    proj = client.projects.create(title=title, label_config=label_config(classes))
    pid = int(proj.id)
    ids: list[int] = []
    for i in range(0, len(rows), 1000):
        res = client.projects.import_tasks(id=pid, request=[{"text": r["text"]} for r in rows[i:i + 1000]],
                                           return_task_ids=True)
        ids.extend(int(t) for t in (plain(res).get("task_ids") or []))
    if len(ids) != len(rows):
        raise RuntimeError(f"imported {len(ids)} task ids for {len(rows)} rows")
    return pid, ids


class DemoError(RuntimeError):
    """A step of the demo failed; the message is one line for a person (no headers, cookies or tokens)."""


def brief(exc: BaseException) -> str:
    """One line about a failed Label Studio call: its status and the reason Label Studio gave, never the
    response headers (they carry session cookies) nor anything secret."""
    from molal.logging import scrub

    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        reason = body.get("validation_errors") or body.get("detail") or body.get("message") or body
        if isinstance(reason, dict):  # {"url": ["Can't connect to ML backend …"]}: the messages themselves
            reason = "; ".join(str(m) for v in reason.values() for m in (v if isinstance(v, list) else [v]))
        text = reason if isinstance(reason, str) else json.dumps(reason, default=str)
    elif isinstance(body, str):
        text = body
    else:
        text = f"{type(exc).__name__}: {exc}" if status is None else ""
    text = scrub(" ".join(str(text).split()))
    if len(text) > 300:
        text = text[:300].rsplit(" ", 1)[0] + " …"
    return f"HTTP {status}: {text}" if status is not None else text


def connect_backend(client, project: int, url: str, title: str = "molal", deadline_s: float = 120.0,
                    auth: tuple[str, str] | None = None) -> int:
    """Connect the backend (``ml.create``); an existing connection (a previous demo run) is pointed at ``url``.
    ``auth``: the backend's basic-auth user and password (Label Studio's "Authentication method: basic").

    Label Studio checks the backend when it connects it (``/health`` within 1 s, ``/setup`` within 3 s); on a
    loaded machine that can fail although the backend is fine, so failed tries are repeated with growing
    pauses (1, 2, 4 … 15 s) for up to ``deadline_s``. A final failure is one :class:`DemoError` line."""
    creds = ({"auth_method": "BASIC_AUTH", "basic_auth_user": auth[0], "basic_auth_pass": auth[1]} if auth
             else {})
    for b in client.ml.list(project=project):
        b = plain(b)
        if b.get("url", "").rstrip("/") != url.rstrip("/") or creds:
            client.ml.update(id=int(b["id"]), url=url, **creds)
        return int(b["id"])
    t_end = time.monotonic() + deadline_s
    delay = 1.0
    while True:
        try:
            return int(client.ml.create(project=project, url=url, title=title, **creds).id)
        except Exception as exc:  # noqa: BLE001 - the SDK raises ApiError or httpx errors
            if getattr(exc, "status_code", None) in (401, 403, 404) or time.monotonic() + delay > t_end:
                raise DemoError(f"Label Studio could not connect the molal backend at {url} ({brief(exc)}); "
                                "if the machine is busy, run the demo again") from None
            time.sleep(delay)
            delay = min(2 * delay, 15.0)


def choice_result(label: str, from_name: str = "label", to_name: str = "text") -> list[dict]:
    return [{"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": [label]}}]


def pick_seeds(gold: dict[int, str | None], n: int, seed: int = 0) -> list[int]:
    """``n`` labelled task ids, chosen at random (what a person opening random tasks would label)."""
    cands = sorted(t for t, g in gold.items() if g is not None)
    if len(cands) < n:
        raise ValueError(f"only {len(cands)} tasks have a gold label; {n} seeds needed")
    return sorted(random.Random(seed).sample(cands, n))


def label_seeds(client, task_ids: list[int], gold: dict[int, str],
                on_step: Callable[[int], None] | None = None, threads: int = 4) -> None:
    """SIMULATED human: one annotation per task with its gold label, through the public API.

    ``threads`` requests are in flight at once: Label Studio sends each ANNOTATION_CREATED webhook to the
    backend inside the request, so one-at-a-time mostly waits on that round trip."""

    def one(t: int) -> None:
        client.annotations.create(id=t, result=choice_result(gold[t]))

    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        for i, _ in enumerate(ex.map(one, task_ids)):
            if on_step:
                on_step(i + 1)


def backend_get(backend_url: str, path: str, timeout: float = 10.0) -> Any:
    import httpx

    r = httpx.get(backend_url.rstrip("/") + path, timeout=timeout)
    r.raise_for_status()
    return r.json()


def start_training(client, ml_id: int, backend_url: str, project: int) -> str:
    """Press "Start Training" (Label Studio → START_TRAINING webhook) and return the backend's job id: a new
    one, or, where a training job of the project was already queued (a retrain after N labels), that one —
    the backend coalesces a press into it."""
    jobs = backend_get(backend_url, f"/jobs?project={project}").get("jobs", [])
    before = {j["id"] for j in jobs}
    waiting = [j["id"] for j in jobs if j["kind"] == "train" and j["status"] == "queued"]
    client.ml.train(id=ml_id)
    t0 = time.monotonic()
    while time.monotonic() < t0 + 30:
        jobs = backend_get(backend_url, f"/jobs?project={project}").get("jobs", [])
        new = [j for j in jobs if j["kind"] == "train" and j["id"] not in before]
        if new:
            return new[0]["id"]
        if waiting and time.monotonic() > t0 + 3:  # no new job: the press joined the queued one
            return waiting[0]
        time.sleep(0.3)
    raise RuntimeError("Label Studio's START_TRAINING did not create a train job in the backend within 30 s")


def wait_job(backend_url: str, job_id: str, timeout: float = 900.0,
             on_progress: Callable[[dict], None] | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = backend_get(backend_url, f"/jobs/{job_id}")
        if on_progress:
            on_progress(job)
        if job["status"] in ("succeeded", "failed"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s: {job.get('message')}")
        time.sleep(0.5)


def wait_queue(backend_url: str, project: int, timeout: float = 1800.0,
               on_progress: Callable[[dict], None] | None = None) -> dict:
    """Wait until every unlabeled task's rank and review line is written (the background ``queue`` job after
    a training job, :mod:`molal.service.queue`); returns ``GET /projects/N``'s ``queue``."""
    deadline = time.monotonic() + timeout
    while True:
        q = backend_get(backend_url, f"/projects/{project}").get("queue") or {}
        if on_progress:
            on_progress(q)
        busy = [j for j in backend_get(backend_url, f"/jobs?project={project}&limit=20")["jobs"]
                if j["status"] in ("queued", "running")]
        if q.get("total") is not None and q.get("upto", 0) >= q.get("total", 0) and not busy:
            return q
        if time.monotonic() > deadline:
            raise TimeoutError(f"the queue of project {project} is still being written after {timeout:.0f} s: {q}")
        time.sleep(1.0)


def all_tasks(client, project: int, view: int | None = None) -> list[dict]:
    out = []
    kw = {"view": view} if view is not None else {}
    for t in task_pages(client, project=project, fields="all", page_size=500, **kw):
        out.append(plain(t))
    return out


def task_predictions(client, project: int, task_ids: Iterable[int] = ()) -> list[dict]:
    """Every prediction stored in the project, grouped per task as ``[{"id", "predictions"}]`` (the shape
    :func:`evaluate` reads). One ``GET /api/predictions/?project=`` instead of paging through the tasks with
    ``fields=all``: on 2 cores Label Studio serialises 11,700 predictions this way about 6x faster.
    ``task_ids`` without a prediction are listed too (with none)."""
    by_task: dict[int, list[dict]] = {int(t): [] for t in task_ids}
    for p in client.predictions.list(project=project):
        d = plain(p)
        by_task.setdefault(int(d["task"]), []).append(d)
    return [{"id": t, "predictions": ps} for t, ps in sorted(by_task.items())]


def _choice(pred: dict) -> str | None:
    for r in pred.get("result") or []:
        ch = (r.get("value") or {}).get("choices")
        if ch:
            return ch[0]
    return None


def evaluate(tasks: list[dict], gold: dict[int, str | None], version: str, seeds: set[int]) -> dict:
    """Accuracy of the served version and of each member (``llm:<name>``, ``scorer:<name>``) on the non-seed
    tasks with a gold label, read from the predictions stored in Label Studio."""
    hits: dict[str, list[int]] = {}
    n_tasks = 0
    for t in tasks:
        tid = int(t["id"])
        g = gold.get(tid)
        if g is None or tid in seeds:
            continue
        n_tasks += 1
        for p in t.get("predictions") or []:
            mv = p.get("model_version") or ""
            if mv == version or mv.startswith(("llm:", "scorer:")):
                key = "MoLAM" if mv == version else mv
                hits.setdefault(key, [0, 0])
                hits[key][0] += int(_choice(p) == g)
                hits[key][1] += 1
    return {"n_eval_tasks": n_tasks,
            "accuracy": {k: {"correct": c, "n": n, "acc": c / n if n else None} for k, (c, n) in hits.items()}}


def find_view(client, project: int, title: str = VIEW_TITLE) -> int | None:
    for v in client.views.list(project=project):
        vd = plain(v)
        t = (vd.get("data") or {}).get("title") or ""
        if t == title or t.startswith(title + " · "):  # the tab's title carries molal's state
            return int(vd["id"])
    return None


# -- the whole demo ---------------------------------------------------------------------------------------------
@dataclass
class DemoOptions:
    data_dir: Path
    dataset: Path | None = None
    labels: list[str] | None = None
    mixture: Path | None = None
    n_tasks: int = 2000
    n_seeds: int = 50
    password: str | None = None
    username: str = DEFAULT_USER
    ls_port: int | None = None
    backend_port: int | None = None
    fresh: bool = False
    seed: int = 0
    #: None: 30 for the head on frozen embeddings (≈1 s), 1 when the whole encoder is fine-tuned (minutes)
    student_epochs: int | None = None
    student_max_length: int = 32
    #: the demo trains the student's head on frozen MiniLM embeddings (seconds instead of minutes on a CPU);
    #: `molal demo --full-student` fine-tunes the whole encoder as a production backend does.
    student_freeze_encoder: bool = True
    job_timeout: float = 1200.0
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class DemoResult:
    ls_url: str
    backend_url: str
    username: str
    password: str
    project: int
    version: str
    evaluation: dict
    next_tasks: list[dict]
    view: int | None
    job: dict
    reused: bool
    timings: dict


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=1)
    os.replace(tmp, path)


class Demo:
    """Owns the two processes. ``setup()`` starts them and drives the project; ``stop()`` stops both."""

    def __init__(self, opts: DemoOptions, say: Callable[[str], None] = print) -> None:
        self.opts = opts
        self.say = say
        self.ls: LabelStudioProcess | None = None
        self.backend: BackendProcess | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._backend_start: Future | None = None

    def start_servers(self) -> dict:
        o = self.opts
        root = o.data_dir.resolve()
        if o.fresh and root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        spath = root / STATE_FILE
        state = _read_state(spath) if (root / "label-studio" / "label_studio.sqlite3").exists() else None
        if state is None:
            state = {"username": o.username, "password": o.password or secrets.token_urlsafe(12),
                     "token": secrets.token_hex(20)}
        elif o.password and o.password != state["password"]:
            raise ValueError("this data directory's admin already has another password; use --fresh to start over")
        from molal.lsprocess import port_free

        def _port(wanted: int | None, saved: int | None) -> int:
            if wanted:
                return wanted
            if saved and port_free(saved) and port_free(saved + 1):
                return saved  # same URLs as the last run (bookmarks, the project's ML connection)
            return free_port()

        ls_port = _port(o.ls_port, state.get("ls_port"))
        be_port = _port(o.backend_port, state.get("backend_port"))
        state.update({"ls_port": ls_port, "backend_port": be_port})
        _write_state(spath, state)
        epochs = o.student_epochs or (30 if o.student_freeze_encoder else 1)
        env = {"MOLAL_STUDENT_EPOCHS": str(epochs), "MOLAL_STUDENT_MAX_LENGTH": str(o.student_max_length),
               "MOLAL_STUDENT_FREEZE_ENCODER": "true" if o.student_freeze_encoder else "false",
               "MOLAL_PER_LLM_PREDICTIONS": "true", **o.extra_env}
        if not state.get("version"):  # this run trains: import the training stack while Label Studio starts
            env.setdefault("MOLAL_WARM_START", "true")
        if o.mixture:
            env["MOLAL_MIXTURE"] = str(Path(o.mixture).resolve())
        self.ls = LabelStudioProcess(root / "label-studio", port=ls_port, username=state["username"],
                                     password=state["password"], token=state["token"])
        self.backend = BackendProcess(root / "backend", port=be_port,
                                      label_studio_url=self.ls.url, api_key=state["token"], workers=1,
                                      threads=4, extra_env=env)
        self.state = state
        self.state_path = spath
        # the two servers start at the same time (the backend needs Label Studio only when a job runs)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="molal-demo-backend")
        self._backend_start = self._pool.submit(self._start_backend)
        t0 = time.monotonic()
        self.ls.start()
        return {"label_studio_s": time.monotonic() - t0}

    def _start_backend(self) -> float:
        assert self.backend is not None
        t0 = time.monotonic()
        self.backend.start()
        # a warming backend answers Label Studio's 3 s /setup check slowly: connect once it is done
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self._backend_warming():
            time.sleep(0.3)
        return time.monotonic() - t0

    def _backend_warming(self) -> bool:
        assert self.backend is not None
        try:
            health = self.backend.get("/health")
        except (OSError, RuntimeError):  # slow to answer while it imports: still warming
            return True
        return isinstance(health, dict) and health.get("warm") == "warming"

    def wait_backend(self) -> float:
        """Block until the backend (started with Label Studio) is healthy; its start-up time in seconds."""
        return self._backend_start.result()

    def run(self, progress: Callable[[dict], None] | None = None) -> DemoResult:
        o = self.opts
        timings = self.start_servers()
        assert self.ls is not None and self.backend is not None
        client = self.ls.client()
        state = self.state
        rows, classes = load_rows(o.dataset, o.labels, n=o.n_tasks, seed=o.seed)
        reused = False
        pid = state.get("project")
        if pid is not None:
            try:
                client.projects.get(id=pid)
                reused = True
            except Exception:
                pid = None
        t = time.monotonic()
        if pid is None:
            title = "molal demo: TREC questions" if o.dataset is None else f"molal demo: {Path(o.dataset).name}"
            self.say(f"creating project '{title}' and importing {len(rows)} tasks")
            pid, ids = create_project(client, title, classes, rows)
            gold = {tid: r["label"] for tid, r in zip(ids, rows, strict=True)}
            state.update({"project": pid, "gold": {str(k): v for k, v in gold.items()}, "version": None})
            _write_state(self.state_path, state)
        gold = {int(k): v for k, v in state["gold"].items()}
        timings["project_s"] = time.monotonic() - t
        # the backend's MODEL_DIR is ours: set the project's settings before Label Studio connects
        from molal.config import get_settings
        from molal.service.store import ServiceStore

        ps = ServiceStore.from_settings(get_settings(model_dir=self.backend.model_dir)).project(pid)
        ps.set_setting("review_panel", True)  # the training job puts the review panel into the label config
        from molal.service.review import INSTRUCTIONS

        client.projects.update(id=pid, expert_instruction=INSTRUCTIONS, show_instruction=True)
        t = time.monotonic()
        timings["backend_s"] = self.wait_backend()  # its own start-up, overlapped with the steps above
        timings["backend_wait_s"] = time.monotonic() - t
        ml_id = connect_backend(client, pid, self.backend.url)
        t = time.monotonic()
        seeds = state.get("seeds")
        if not seeds:
            seeds = pick_seeds(gold, o.n_seeds, o.seed)
            self.say(f"SIMULATED human: labelling {len(seeds)} random seed tasks with their gold labels via the API")
            label_seeds(client, seeds, gold)  # type: ignore[arg-type]
            state["seeds"] = seeds
            _write_state(self.state_path, state)
        timings["seeds_s"] = time.monotonic() - t
        t = time.monotonic()
        job: dict = {}
        version = state.get("version")
        if not version:
            self.say("pressing 'Start Training' (Label Studio sends START_TRAINING to the backend)")
            job_id = start_training(client, ml_id, self.backend.url, pid)
            job = wait_job(self.backend.url, job_id, o.job_timeout, on_progress=progress)
            if job["status"] != "succeeded":
                raise RuntimeError(f"training job {job_id} failed: {job.get('error') or job.get('message')}")
            version = (job.get("result") or {}).get("version")
            state["version"] = version
            _write_state(self.state_path, state)
        timings["train_s"] = time.monotonic() - t
        t = time.monotonic()
        tasks = task_predictions(client, pid, gold)
        ev = evaluate(tasks, gold, version, set(seeds))
        view = find_view(client, pid)
        head = []
        if view is not None:
            for tk in task_pages(client, project=pid, view=view, fields="all", page_size=10):
                d = plain(tk)
                if d.get("annotations"):
                    continue
                head.append(d)
                if len(head) >= 10:
                    break
        timings["report_s"] = time.monotonic() - t
        return DemoResult(ls_url=self.ls.url, backend_url=self.backend.url, username=state["username"],
                          password=state["password"], project=pid, version=version, evaluation=ev,
                          next_tasks=head, view=view, job=job, reused=reused, timings=timings)

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # a backend still starting finishes (or fails) before it is stopped
        if self.backend is not None:
            self.backend.stop()
        if self.ls is not None:
            self.ls.stop()
