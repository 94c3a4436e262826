"""The reviewer's screen in a REAL browser (Debian's chromium driven by Playwright) against a real Label Studio
and the real backend with a trained model: what a person sees, not what the API says.

A person logs in, opens the "molal queue" tab (order, visible fields, annotated tasks filtered out), opens the
labeling stream ("Label Tasks As Displayed"), reads molal's review line above the text, finds MoLAM's label
pre-ticked, changes it, submits; the annotation is then confirmed through the API.

Run alone: ``pytest -m browser``. Screenshots of every step go to ``$MOLAL_E2E_SCREENSHOTS`` (default: the
test's tmp dir, printed on failure); ``stream.png`` is the README's screenshot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from molal.demo import (
    TREC_CLASSES,
    all_tasks,
    connect_backend,
    create_project,
    label_seeds,
    load_rows,
    pick_seeds,
    start_training,
    wait_job,
)
from molal.service.lsclient import VIEW_TITLE
from molal.service.review import INSTRUCTIONS

pytestmark = pytest.mark.browser

N_TASKS = 150
N_SEEDS = 40
TOP = 15  # tasks at the head of the queue: priority + review fields written
CHROMIUM = os.environ.get("MOLAL_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]


def _browser_or_skip():
    """Playwright + Debian's chromium; a machine without them skips, unless MOLAL_REQUIRE_BROWSER=1 (CI)
    makes their absence a failure."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed"
    if missing is None and not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        missing = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("MOLAL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required but {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def reviewed(ls_client, backend):
    """A small TREC project with the review panel on, 40 gold seeds and one training job."""
    from molal.service.store import ProjectState

    rows, classes = load_rows(None, None, n=N_TASKS, seed=3)
    pid, ids = create_project(ls_client, "e2e review", classes, rows)
    gold = {t: r["label"] for t, r in zip(ids, rows, strict=True)}
    ps = ProjectState(backend.model_dir, pid)
    ps.set_setting("priority_top", TOP)
    ps.set_setting("review_panel", True)
    ls_client.projects.update(id=pid, expert_instruction=INSTRUCTIONS, show_instruction=True)
    ml_id = connect_backend(ls_client, pid, backend.url)
    seeds = pick_seeds(gold, N_SEEDS, seed=0)
    label_seeds(ls_client, seeds, gold)
    job = wait_job(backend.url, start_training(ls_client, ml_id, backend.url, pid), timeout=900)
    assert job["status"] == "succeeded", job
    assert job["result"]["review_fields_written"] == TOP and job["result"]["review_panel"] == "added"
    tasks = all_tasks(ls_client, pid)
    head = sorted((t for t in tasks if not t["annotations"] and t["data"].get("priority")),
                  key=lambda t: -t["data"]["priority"])
    assert len(head) == TOP
    return {"id": pid, "seeds": set(seeds), "head": head, "version": job["result"]["version"]}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("MOLAL_E2E_SCREENSHOTS") or tmp_path_factory.mktemp("screens"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def page(label_studio, shots, request):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        pg.set_default_timeout(30_000)
        try:
            yield pg
        finally:
            rep = getattr(request.node, "rep_call", None)
            if rep is not None and rep.failed:
                path = shots / f"FAILED-{request.node.name}.png"
                pg.screenshot(path=str(path), full_page=True)
                print(f"\nscreenshot of the failure: {path}")
            browser.close()


def _log_in(pg, ls) -> None:
    pg.goto(f"{ls.url}/user/login/")
    pg.fill("input[name=email]", ls.username)
    pg.fill("input[name=password]", ls.password)
    pg.click("button[type=submit]")
    pg.wait_for_url(lambda url: "/user/login" not in url)  # Label Studio's home page: logged in


def _open_queue(pg, ls, pid: int) -> None:
    pg.goto(f"{ls.url}/projects/{pid}/data")
    pg.get_by_text(VIEW_TITLE, exact=True).first.click()
    pg.locator(".lsf-table-row").first.wait_for()


def test_the_queue_tab_shows_what_matters_in_priority_order(page, label_studio, reviewed, shots):
    pg, pid, head = page, reviewed["id"], reviewed["head"]
    _log_in(pg, label_studio)
    _open_queue(pg, label_studio, pid)
    assert pg.locator(".lsf-tabs-dm__item_active").inner_text().strip() == VIEW_TITLE  # the title fits, whole
    headers = [h.split("\n")[0].strip() for h in pg.locator(".lsf-table-head .lsf-th").all_inner_texts()]
    headers = [h for h in headers if h]
    for col in ("text", "priority", "molal_label", "molal_confidence", "molal_votes", "molal_flag"):
        assert col in headers, headers
    assert headers.index("text") <= 2, headers  # the question first (after ID and the prediction score)
    for internal in ("Annotated by", "Model versions", "Prediction results", "Completed", "Annotations"):
        assert internal not in headers, headers
    rows = pg.locator(".lsf-table-row")
    shown = [rows.nth(i).locator(".lsf-table__cell").all_inner_texts() for i in range(min(rows.count(), TOP))]
    ids = [int(r[headers.index("ID") + 1].strip()) for r in shown]  # +1: the row's selection checkbox cell
    assert ids == [t["id"] for t in head][:len(ids)] and len(ids) >= 10  # highest priority first
    first = dict(zip(headers, [c.strip() for c in shown[0][1:]], strict=False))
    assert first["molal_label"] == head[0]["data"]["molal_label"]
    assert first["molal_votes"] == head[0]["data"]["molal_votes"]
    assert not set(ids) & reviewed["seeds"]
    counts = pg.get_by_text("Tasks:").first.evaluate("e => e.parentElement.innerText")
    assert f"{N_TASKS - N_SEEDS} / {N_TASKS}" in counts, counts  # annotated tasks are filtered out of the tab
    pg.screenshot(path=str(shots / "queue.png"))


def test_the_stream_explains_the_prefill_and_a_correction_is_saved(page, label_studio, reviewed, ls_client, shots):
    pg, pid, task = page, reviewed["id"], reviewed["head"][0]
    data = task["data"]
    _log_in(pg, label_studio)
    _open_queue(pg, label_studio, pid)
    pg.get_by_role("button", name="Toggle open").click()  # the arrow next to "Label All Tasks"
    pg.get_by_text("Label Tasks As Displayed").click()
    instructions = pg.get_by_text("Labeling Instructions")
    instructions.first.wait_for()  # shown once, before the first task: says what the pre-fill is
    assert pg.get_by_text("Pre-filled labels come from molal").is_visible()
    pg.keyboard.press("Escape")
    instructions.first.wait_for(state="hidden")

    panel = pg.locator("h4", has_text="molal pre-filled")
    panel.wait_for()
    assert panel.inner_text().strip() == data["molal_review"]  # the head of the queue comes first
    assert f"molal pre-filled {data['molal_label']} (" in data["molal_review"] and "LLM votes:" in data["molal_review"]
    assert pg.get_by_text(task["data"]["text"].strip()[:40]).first.is_visible()
    ticked = pg.locator(".lsf-choices input[type=checkbox]:checked")
    assert ticked.count() == 1 and ticked.get_attribute("name") == data["molal_label"]  # MoLAM's label, pre-ticked
    pg.screenshot(path=str(shots / "stream.png"))

    other = next(c for c in TREC_CLASSES if c != data["molal_label"])
    pg.locator(f".lsf-choices label:has(input[name='{other}'])").click()
    assert pg.locator(".lsf-choices input[type=checkbox]:checked").get_attribute("name") == other
    pg.get_by_role("button", name="Submit current annotation").click()
    # the stream moves on to the next task of the queue, with its own review line
    pg.locator("h4", has_text=reviewed["head"][1]["data"]["molal_review"]).wait_for()

    anns = [a if isinstance(a, dict) else a.model_dump() for a in ls_client.annotations.list(id=task["id"])]
    assert len(anns) == 1, anns
    (res,) = anns[0]["result"]
    assert res["value"]["choices"] == [other] and res["from_name"] == "label"
    assert not anns[0]["was_cancelled"]
