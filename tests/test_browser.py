"""The student's and the instructor's JupyterLab, driven in headless Chromium (Playwright, Debian's chromium).

Student: opens an assignment of ``course/`` (answers filled in, one of them wrong), runs it, sees the
visible test's hint fail, fixes the answer in the editor, sees the test pass, and validates with
nbgrader's Validate button. Instructor: after ``quantcourse autograde`` of two submissions, opens the
formgrader and sees them with their scores, then opens a feedback page. Screenshots of every step go to
``_build/artifacts/browser/`` (or ``$QUANTCOURSE_ARTIFACTS``).

Skipped, with the reason, when Playwright or a Chromium executable is missing (``.ci/run`` installs it).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import _toy
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENT = "a02_absmax_zeropoint"
ARTIFACTS = Path(os.environ.get("QUANTCOURSE_ARTIFACTS", ROOT / "_build" / "artifacts" / "browser"))
CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
        if p and Path(p).is_file()
    ),
    None,
)

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the message says what to do
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("browser"),
    pytest.mark.skipif(
        sync_playwright is None, reason="browser test skipped: Playwright is not installed (pip install playwright)"
    ),
    pytest.mark.skipif(
        CHROMIUM is None, reason="browser test skipped: no Chromium (Debian: apt-get install -y chromium)"
    ),
]

_SOLUTION = re.compile(r"[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n?")
WRONG = "def absmax_scale(x, n_bits):\n    return (x.abs().amax() / 2 ** (n_bits - 1)).clamp(min=EPS)\n"
RIGHT = "def absmax_scale(x, n_bits):\n    return (x.abs().amax() / (2 ** (n_bits - 1) - 1)).clamp(min=EPS)\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _student_notebook(path: Path) -> None:
    """The release with every answer from the master, except a wrong absmax_scale (divides by 128)."""
    master = nbformat.read(ROOT / "solutions" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4)
    answers = {
        c.metadata["nbgrader"]["grade_id"]: _SOLUTION.sub("", c.source)
        for c in master.cells
        if c.metadata.get("nbgrader", {}).get("solution")
    }
    answers["absmax_scale"] = WRONG
    nb = _toy.answered(ROOT / "course" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", answers)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a toy course root that holds autograded submissions, and a student notebook."""
    from quantcourse.grading.autograde import autograde
    from quantcourse.grading.release import release
    from quantcourse.grading.sandbox import sandbox_problem

    root = tmp_path_factory.mktemp("lab")
    course = _toy.make_course(root / "course_root", cell_timeout=30)
    release(course)
    released = course.release / _toy.ASSIGNMENT / _toy.NOTEBOOK
    subs = root / "submissions"
    for student, answers in {
        "alice": {"absmax_scale": _toy.HONEST_SCALE, "fake_quant": _toy.HONEST_FAKE_QUANT},
        "bob": {},
    }.items():
        (subs / student / _toy.ASSIGNMENT).mkdir(parents=True)
        nbformat.write(_toy.answered(released, answers), subs / student / _toy.ASSIGNMENT / _toy.NOTEBOOK)
    grades = autograde(course, subs, out=root / "out", progress=False, workers=2, sandbox=sandbox_problem() is None)
    assert [(g.student, g.score) for g in grades] == [("alice", 5.0), ("bob", 0.0)]
    _student_notebook(course.root / "student" / f"{ASSIGNMENT}.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "jupyter_config"), "QUANTCOURSE_PROGRESS": "plain"}
    argv = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1"]
    argv += [f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={course.root}", "--ServerApp.allow_root=True"]
    log = (root / "lab.log").open("w")
    server = subprocess.Popen(argv, cwd=course.root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}")
            time.sleep(1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield {"url": url, "token": token, "root": course.root, "out": root / "out"}
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


@contextlib.contextmanager
def _on_failure_screenshot(page, name: str):
    """Keep a screenshot of the page when a step fails (the artifact to look at)."""
    try:
        yield
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"failed_{name}.png"), full_page=True)
        raise


def _cell(page, text: str):
    return page.locator(".jp-CodeCell", has_text=text).first


def test_student_runs_the_visible_tests_fixes_a_hint_and_validates(lab, browser):
    page = browser.new_page(
        viewport={"width": 1400, "height": 1000}, extra_http_headers={"Authorization": f"token {lab['token']}"}
    )
    page.set_default_timeout(120_000)
    with _on_failure_screenshot(page, "student"):
        _student_steps(page, lab)
    page.close()


def _run_all_cells(page, tries: int = 3) -> None:
    """Run > Run All Cells, until a cell shows it ran or is queued (``[1]:``, ``[*]:``).

    The status bar can say Idle a moment before the notebook's kernel connection is ready, and a Run All
    clicked then moves to the last cell and runs nothing (seen once in a clean-clone run on 2 cores); a
    student would click it again, and so does this.
    """
    started = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\d+|\*)\]"))
    for _ in range(tries):
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        with contextlib.suppress(Exception):
            started.first.wait_for(timeout=30_000)
            return
    raise AssertionError(f"Run All Cells ran no cell in {tries} tries (no [n]: or [*]: prompt appeared)")


def _student_steps(page, lab) -> None:
    page.goto(f"{lab['url']}/lab/tree/student/{ASSIGNMENT}.ipynb?token={lab['token']}")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    with contextlib.suppress(Exception):  # JupyterLab's "news?" toast, when it shows
        page.locator(".Toastify button", has_text="No").first.click(timeout=5_000)
    page.wait_for_selector("text=Kernel status: Idle", state="attached")  # the kernel is up (status bar)
    _run_all_cells(page)
    hint = "you divided by 2^(n-1) = 128"
    outputs = page.locator(".jp-OutputArea-output")
    outputs.filter(has_text=hint).first.wait_for(timeout=300_000)  # the visible test fails with its hint
    page.wait_for_selector("text=Kernel status: Idle", state="attached")
    outputs.filter(has_text=hint).first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "1_student_hint_fails.png"))

    editor = _cell(page, "def absmax_scale(x, n_bits):").locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(RIGHT)
    page.keyboard.press("Shift+Enter")  # run the answer...
    page.keyboard.press("Shift+Enter")  # ...and the visible test under it
    outputs.filter(has_text="absmax_scale: visible tests passed").first.wait_for(timeout=300_000)
    assert outputs.filter(has_text=hint).count() == 0
    page.screenshot(path=str(ARTIFACTS / "2_student_hint_passes.png"))

    page.keyboard.press("Control+S")
    # JupyterLab asks before saving over a file whose time on disk is newer than its own copy (the set-up
    # wrote it just before the server started): keep what the student typed, as a student would
    with contextlib.suppress(Exception):
        page.locator(".jp-Dialog button", has_text="Overwrite").first.click(timeout=10_000)
    page.wait_for_selector(".jp-Dialog", state="detached", timeout=60_000)
    page.locator(".jp-Toolbar").get_by_text("Validate", exact=True).first.click()  # nbgrader's toolbar item
    page.wait_for_selector(".jp-Dialog >> text=/Success|passes/i", timeout=240_000)
    page.screenshot(path=str(ARTIFACTS / "3_student_validates.png"))
    text = page.locator(".jp-Dialog").first.inner_text()
    assert "Success" in text or "passes" in text, text


def test_instructor_sees_the_autograded_submissions_and_feedback(lab, browser):
    # the formgrader's API calls carry no token cookie: authenticate every request with a header
    page = browser.new_page(
        viewport={"width": 1400, "height": 900}, extra_http_headers={"Authorization": f"token {lab['token']}"}
    )
    page.set_default_timeout(120_000)
    with _on_failure_screenshot(page, "instructor"):
        _instructor_steps(page, lab)
    page.close()


def _instructor_steps(page, lab) -> None:
    page.goto(f"{lab['url']}/formgrader/manage_submissions/{_toy.ASSIGNMENT}?token={lab['token']}")
    page.wait_for_selector("text=alice")
    page.wait_for_selector("text=bob")
    text = page.inner_text("body")
    assert "5 / 5" in text or "5.0 / 5.0" in text, text[:2000]
    page.screenshot(path=str(ARTIFACTS / "4_formgrader_submissions.png"))
    feedback = lab["out"] / "feedback" / "bob" / _toy.ASSIGNMENT / _toy.NOTEBOOK.replace(".ipynb", ".html")
    page.goto(feedback.as_uri())
    page.wait_for_selector("text=NotImplementedError")
    body = page.inner_text("body")
    assert _toy.HIDDEN_SENTINEL not in body and "BEGIN HIDDEN TESTS" not in body
    page.screenshot(path=str(ARTIFACTS / "5_feedback_page.png"), full_page=True)
