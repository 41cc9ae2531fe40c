"""``kronix top`` in a real terminal: a tmux session of a set size runs it on a queue with a batch,
dead letters, a paused queue and a live worker process; the test reads the pane, resizes the window,
sends ``q``; and the same command with stdout piped prints one set of tables and exits."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import uuid
import pytest

from helpers import cli_environment, database_url, finish, kronix, skip_or_fail, start_kronix, wait_until
from kronix_data import DatabaseQueueDriver, Job
from kronix_data.top import queue_limits, sparkline


@pytest.fixture
def queue(tmp_path):
    """A SQLite queue: a batch of 10 chunks (4 dead-lettered, 1 done), 25 jobs in a paused queue."""
    url = database_url("sqlite", tmp_path)
    with DatabaseQueueDriver(url) as driver:
        driver.create_table()
        batch = driver.map("etl.clean", list(range(100)), chunk_size=10, queue="etl")
        for _ in range(4):
            job = driver.pop("etl")
            job.last_error = "ValueError: bad row 7\nTraceback (most recent call last): ..."
            assert driver.fail(job)
        assert driver.complete(driver.pop("etl"))
        driver.push_many([Job("mail.send", n, queue="mail") for n in range(25)])
        driver.pause("mail")
        yield url, driver, batch


@pytest.fixture
def live_worker(queue, tmp_path):
    """A real worker process on an empty queue: it stays, and heartbeats into the registry."""
    url, driver, _ = queue
    process = start_kronix(["worker", "-q", "idle", "--db", url], cwd=tmp_path)
    try:
        wait_until(lambda: (driver.workers()["pid"] == process.pid).any(), 60, "the worker in the registry")
        yield process
    finally:
        process.terminate()
        finish(process, timeout=60)


class Tmux:
    """A tmux server of the test's own (its own socket), so nothing else's sessions are touched."""

    def __init__(self, tmp_path):
        if shutil.which("tmux") is None:
            skip_or_fail("tmux is not installed (apt-get install tmux; .ci/run installs it)")
        self.socket = f"kronix-test-{uuid.uuid4().hex[:8]}"
        # Without COLUMNS/LINES (pytest-xdist exports 80x24, some shells do too): the pane's size must decide.
        self.environment = {key: value for key, value in cli_environment(TERM="xterm-256color").items()
                            if key not in ("COLUMNS", "LINES")}
        self.cwd = tmp_path

    def run(self, *arguments: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", os.devnull, *arguments], check=True, text=True,
                              capture_output=True, env=self.environment, cwd=self.cwd, timeout=30).stdout

    def start(self, command: str, width: int, height: int) -> None:
        self.run("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), command)

    def pane(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "top").splitlines()

    def wait_for(self, condition, what: str) -> list[str]:
        return wait_until(lambda: (lines := self.pane()) and condition("\n".join(lines), lines) and lines, 60, what,
                          interval=0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], env=self.environment, capture_output=True)


@pytest.fixture
def tmux(tmp_path):
    terminal = Tmux(tmp_path)
    yield terminal
    terminal.close()


def test_top_in_a_real_terminal_shows_the_queue_redraws_on_resize_and_quits_on_q(queue, live_worker, tmux):
    url, driver, batch = queue
    command = " ".join(shlex.quote(part) for part in [sys.executable, "-m", "kronix_data.cli", "top", "--db", url])
    tmux.start(f"{command}; echo top-exited-with-$?; sleep 600", width=120, height=40)

    lines = tmux.wait_for(lambda text, _: "Latest failures" in text and str(live_worker.pid) in text,
                          "the whole view, with the live worker")
    text = "\n".join(lines)
    assert lines[0].startswith("kronix top · table kronix_jobs on sqlite:///") and len(lines[0]) == 120
    etl = next(line for line in lines if line.startswith("etl "))
    mail = next(line for line in lines if line.startswith("mail "))
    assert etl.split()[:6] == ["etl", "active", "5", "0", "1", "4"]  # pending, running, done, failed
    assert mail.split()[:6] == ["mail", "paused", "25", "0", "0", "0"]
    bar = next(line for line in lines if line.startswith(batch.id[:20]))
    assert "━" in bar and "5/10" in bar  # the batch's progress bar, half done
    assert text.count("ValueError: bad row 7") == 4
    assert any(line.split()[2:3] == [str(live_worker.pid)] and "idle" in line for line in lines)
    assert "q quits" in text

    tmux.run("resize-window", "-t", "top", "-x", "90", "-y", "30")
    resized = tmux.wait_for(lambda _, lines: len(lines[0]) == 90, "the view redrawn 90 columns wide")
    assert all(len(line) <= 90 for line in resized)
    assert any(line.startswith("mail ") and "paused" in line for line in resized)

    driver.drop_table()  # the database fails under it: the view says so and keeps trying
    tmux.wait_for(lambda text, _: "database error, retrying every 1s" in text and "no such table" in text,
                  "the database error shown in the view")
    driver.create_table()
    tmux.wait_for(lambda text, _: "(no jobs yet)" in text and "database error" not in text, "the view back")

    tmux.run("send-keys", "-t", "top", "q")
    tmux.wait_for(lambda text, _: "top-exited-with-0" in text, "kronix top to quit on q with status 0")


def test_top_with_stdout_piped_prints_one_view_and_exits(queue, tmp_path):
    url, _, batch = queue
    result = kronix("top", "--db", url, cwd=tmp_path, environment=cli_environment(COLUMNS="120"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("kronix top · table kronix_jobs") and result.stdout.count("Queues") == 1
    assert next(line for line in lines if line.startswith("mail ")).split()[:3] == ["mail", "paused", "25"]
    assert any(line.startswith(batch.id[:20]) and "5/10" in line for line in lines)
    assert "no live worker" in result.stdout and "one-shot view: stdout is not a terminal" in " ".join(result.stdout.split())
    assert "\x1b[?1049h" not in result.stdout  # never the alternate screen


def test_the_limits_hook_and_the_sparkline():
    assert queue_limits({"queue": "etl", "paused": False, "pending": 3}) == "-"
    assert queue_limits({"queue": "etl", "paused": False, "max_running": 4}) == "max_running=4"  # issue 12's columns
    assert sparkline([0, 0, 0]) == "▁▁▁" and sparkline([]) == ""
    assert sparkline(list(range(8))) == "▁▂▃▄▅▆▇█" and sparkline([0, 7, 7]) == "▁██"


def test_top_on_a_missing_table_says_so(tmp_path):
    result = kronix("top", "--db", database_url("sqlite", tmp_path), cwd=tmp_path)
    assert result.returncode == 4 and "kronix init" in result.stderr
