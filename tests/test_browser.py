"""Notebook 02 as a person sees it: JupyterLab in headless Chromium (Playwright), Run All, and what is drawn.

The test starts JupyterLab on a free port with a token, in a temporary copy of
notebooks/, opens ``02_etl_in_chunks.ipynb``, runs every cell and reads the page:
the tqdm bar of ``batch.wait(progress=True)`` (at least 200 px wide, between 10%
and 90% filled half-way, red while a chunk is dead-lettered, full at the end), and
the ``QueueMonitor`` (the batch's full name, the counts, a failure row, Pause
changing the status line, the snapshot left where it was by ``monitor.close()``).

The half-way moment is made, not timed: the copy of ``etl_tasks.py`` gets a gate.
While the gate file is missing, chunk 5 fails (no retries: a dead letter at once)
and chunks 10 and up wait, so the batch holds at 10 of 20 chunks until the test has
looked, retried the dead letter (as a colleague would, from another process) and
created the file.  Widget clicks reach the kernel only while it is idle (ipykernel
handles comm messages between cells), so every cell but the last runs first, then
Pause is clicked on the live monitor, then the last cell (``monitor.close()``) runs.

Screenshots go to ``test-artifacts/browser/`` in the repository (gitignored), for a
person to look at. Chromium is Debian's (``.ci/run`` installs it); Playwright drives
it through ``executable_path``, with no browser of its own. Missing either: a skip on
a developer's machine, a failure under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import REPOSITORY, free_port, skip_or_fail, wait_until

NOTEBOOK = "02_etl_in_chunks.ipynb"
ARTIFACTS = REPOSITORY / "test-artifacts" / "browser"
#: Cells of notebook 02 (all cells, markdown included): the monitor, and the cell that waits with a bar.
MONITOR_CELL, WAIT_CELL = 7, 8

#: Appended to the copy of etl_tasks.py: the task under the same name, held by the gate file.
GATE = '''

# -- added by tests/test_browser.py: the batch holds half-way until the test opens the gate -----------
import os as _os
import pathlib as _pathlib

_GATE = _pathlib.Path(_os.environ["KRONIX_BROWSER_GATE"])
_daily_revenue = daily_revenue


@kronix_data.task(name="etl.daily_revenue", max_retries=0)
def daily_revenue(payload):
    """Chunk 5 fails and chunks 10 and up wait while the gate is closed; then the real task."""
    chunk = int(kronix_data.current_job().job.key.rsplit(":", 1)[1])
    if not _GATE.exists():
        if chunk == 5:
            raise ValueError("bad rows in chunk 5 (the browser test's gate is closed)")
        while chunk >= 10 and not _GATE.exists():
            time.sleep(0.05)
    return _daily_revenue(payload)
'''

#: JupyterLab settings: every cell kept in the page (no windowing), no news or update prompts.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}

#: In the page: the fill of the first progress bar in an element, and its drawn width in px.
BAR_JS = """element => {
    const track = element.querySelector('.widget-hprogress .progress');
    if (!track) return null;
    const fill = track.querySelector('.progress-bar');
    return {width: track.getBoundingClientRect().width,
            fill: fill.getBoundingClientRect().width / track.getBoundingClientRect().width,
            classes: fill.className, text: element.innerText};
}"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        skip_or_fail("no chromium on PATH (Debian: apt-get install chromium)")
    return found


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a copy of notebooks/ (with the gate), on a free port with a token: (url, token, gate)."""
    work = tmp_path / "notebooks"
    shutil.copytree(REPOSITORY / "notebooks", work, ignore=shutil.ignore_patterns("__pycache__"))
    with open(work / "etl_tasks.py", "a") as module:
        module.write(GATE)
    settings = tmp_path / "settings"
    for name, values in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    (tmp_path / "kernel-tmp").mkdir()
    port, token, gate = free_port(), secrets.token_hex(16), tmp_path / "gate-open"
    environment = {**os.environ, "KRONIX_BROWSER_GATE": str(gate), "JUPYTERLAB_SETTINGS_DIR": str(settings),
                   "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
                   "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
                   "TMPDIR": str(tmp_path / "kernel-tmp")}
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--ServerApp.port_retries=0",
         "--LabApp.expose_app_in_browser=True"],
        env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/api/status?token={token}") or server.poll() is not None, 60,
                   "JupyterLab to answer")
        assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()[-3000:]
        yield url, token, gate, tmp_path / "kernel-tmp"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _notebook_database(kernel_tmp: Path) -> str:
    """The URL of the SQLite file notebook 02 made in its kernel's temporary directory."""
    found = sorted(kernel_tmp.glob("kronix-etl-*/jobs.db"))
    assert len(found) == 1, found
    return f"sqlite:///{found[0]}"


#: In the page: the notebook panel, its cells' prompts, and commands run without awaiting their promise
#: (run-all's settles only when its last cell has run).
PANEL = "window.jupyterapp.shell.currentWidget"
KERNEL_IDLE = (f"() => {PANEL} && {PANEL}.sessionContext && {PANEL}.sessionContext.session"
               f" && {PANEL}.sessionContext.session.kernel && {PANEL}.sessionContext.session.kernel.status === 'idle'")
RAN = """count => {
    const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
    return prompts.filter(prompt => /\\[\\d+\\]/.test(prompt.innerText)).length >= count;
}"""


def test_notebook_02_in_jupyterlab_draws_a_moving_bar_and_a_monitor_that_reads_well(lab):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install -e '.[dev]')")
    from kronix_data import DatabaseQueueDriver

    executable = chromium()
    url, token, gate, kernel_tmp = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {ARTIFACTS}")
    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
            page.wait_for_function(KERNEL_IDLE, timeout=90_000)
            print("JupyterLab and its kernel up after", round(time.monotonic() - started, 1), "s")
            cells = page.locator(".jp-Notebook .jp-Cell")
            code_cells = page.locator(".jp-Notebook .jp-CodeCell").count()
            # Every cell but the last (monitor.close()): a click on a widget reaches the kernel only while it
            # is idle (ipykernel handles comm messages between cells), and Pause is to be clicked on a live view.
            page.evaluate(f"() => {{ {PANEL}.content.activeCellIndex = {cells.count() - 1};"
                          " window.jupyterapp.commands.execute('notebook:run-all-above'); }")
            monitor, waiting = cells.nth(MONITOR_CELL), cells.nth(WAIT_CELL)

            # Half-way: the gate holds the batch at 10 of 20 chunks, one of them dead-lettered.
            seen = []

            def half_way() -> bool:
                bar, shown = waiting.evaluate(BAR_JS), monitor.inner_text()
                seen[:] = [round(time.monotonic() - started, 1), bar, shown[-400:]]
                return bar is not None and bar["fill"] >= 0.1 and "failed=1" in bar["text"] and \
                    "bad rows in chunk 5" in shown and "10/20 done" in shown  # the monitor, at the gate too

            wait_until(half_way, 90, f"the batch half-way, with a dead letter (last seen: {seen})", interval=0.5)
            print("half-way after", seen[0], "s")
            bar = waiting.evaluate(BAR_JS)
            waiting.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "02-mid-run-bar.png"))
            assert bar["width"] >= 200, bar
            assert 0.1 <= bar["fill"] <= 0.9, bar
            assert "progress-bar-danger" in bar["classes"], bar  # red: a chunk is dead-lettered
            assert "etl.daily_revenue" in bar["text"] and "rows" in bar["text"], bar["text"]

            monitor.scroll_into_view_if_needed()
            monitor.screenshot(path=str(ARTIFACTS / "02-mid-run-monitor.png"))
            text = monitor.inner_text()
            batch_id = re.search(r"etl\.daily_revenue\s+(etl\.daily_revenue-\S+)", text)
            assert batch_id and len(batch_id.group(1)) > 16, text  # the full name, and the id in full
            table = monitor.locator("table.kronix-table").first
            headings = table.locator("th").all_inner_texts()
            assert headings[:8] == ["queue", "pending", "waiting", "running", "claimed", "completed", "failed",
                                    "cancelled"], headings
            counts = dict(zip(headings, table.locator("td").all_inner_texts()))
            assert counts["queue"] == "default" and counts["failed"] == "1" and counts["completed"] == "9", counts
            assert 1 <= int(counts["running"]) <= 2 <= int(counts["claimed"]), counts  # 2 workers, 1 thread each
            failure = monitor.locator("table.kronix-table", has_text="error_type").locator("tbody tr")
            assert failure.count() == 1 and "ValueError" in failure.inner_text(), failure.all_inner_texts()
            padding = monitor.evaluate(  # in one go: a refresh may replace the table between two calls
                "cell => getComputedStyle(cell.querySelector('table.kronix-table td')).paddingLeft")
            assert padding == "8px", padding
            for label in ("Retry dead letters", "Pause"):
                button = monitor.get_by_role("button", name=label)
                assert button.evaluate("b => b.scrollWidth <= b.clientWidth"), f"{label!r} is cut"

            # A colleague retries the dead letter from another notebook; the gate opens; the batch ends.
            with DatabaseQueueDriver(_notebook_database(kernel_tmp)) as colleague:
                assert colleague.retry_dead_letters() == 1
            gate.touch()
            print("gate opened after", round(time.monotonic() - started, 1), "s")
            page.wait_for_function(RAN, arg=code_cells - 1, timeout=120_000)
            page.wait_for_function(KERNEL_IDLE)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                  has_text="Error")
            assert errors.count() == 0, errors.all_inner_texts()
            bar = waiting.evaluate(BAR_JS)
            waiting.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "02-end-bar.png"))
            assert bar["fill"] == pytest.approx(1.0) and "progress-bar-success" in bar["classes"], bar
            assert "600000/600000 rows" in bar["text"].replace("\u2007", " "), bar["text"]
            # The throughput chart: a PNG the monitor draws from driver.timeline(), decoded by the browser.
            chart = monitor.locator(".widget-image").first
            assert chart.evaluate("img => img.complete && img.naturalWidth") >= 300, "no chart drawn"

            status = monitor.locator(".widget-html-content").last
            assert "refreshing every 0.5s" in status.inner_text()
            monitor.get_by_role("button", name="Pause").click()
            wait_until(lambda: "paused" in status.inner_text(), 30, "the status line to say paused")
            monitor.scroll_into_view_if_needed()
            monitor.screenshot(path=str(ARTIFACTS / "02-monitor-paused.png"))
            assert "20/20 done · 20 completed · 0 failed" in monitor.inner_text()
            monitor.get_by_role("button", name="Resume").click()
            wait_until(lambda: "refreshing every 0.5s" in status.inner_text(), 30, "the status line to resume")

            # The last cell: monitor.close() leaves its snapshot where the live view was.
            print("the cells above the last ran after", round(time.monotonic() - started, 1), "s")
            page.evaluate(f"() => {{ {PANEL}.content.activeCellIndex = {cells.count() - 1};"
                          " window.jupyterapp.commands.execute('notebook:run-cell'); }")
            page.wait_for_function(RAN, arg=code_cells, timeout=60_000)
            page.wait_for_function(KERNEL_IDLE)
            monitor.scroll_into_view_if_needed()
            monitor.screenshot(path=str(ARTIFACTS / "02-end-monitor-closed.png"))
            assert monitor.locator(".widget-hprogress").count() == 0  # no live widget left
            text = monitor.locator(".jp-OutputArea-output").inner_text()
            assert "etl.daily_revenue" in text and batch_id.group(1) in text and "closed" in text, text
            assert "20/20 done" in text and "completed" in text, text
            assert monitor.locator(".kronix-bar").count() == 1
        finally:
            browser.close()
    print("done after", round(time.monotonic() - started, 1), "s")
