"""QueueMonitor's widgets, filled from a real queue worked by a real Worker, on every database."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from kronix_data import DatabaseQueueDriver, RetryPolicy, task
from kronix_data.monitor import INSTALL_HINT, QueueMonitor

from helpers import drop_table, run_burst, unique_table, wait_until

REPOSITORY = Path(__file__).resolve().parents[1]
BAD_CHUNKS = {3: ValueError, 7: KeyError}


@task(name="test.monitor.chunk", max_retries=0, retry=RetryPolicy(delay=0.01))
def sum_chunk(payload):
    """Sum a range chunk; chunks 3 and 7 raise, as a chunk with bad rows would."""
    error = BAD_CHUNKS.get(payload["chunk"])
    if error is not None:
        raise error(f"bad rows in chunk {payload['chunk']}")
    return sum(range(payload["start"], payload["stop"]))


def cells(page: str) -> list[str]:
    """The text of every table cell of an HTML page (the tables carry inline styles)."""
    return re.findall(r"<td[^>]*>(.*?)</td>", page)


@pytest.fixture(autouse=True)
def no_monitor_thread_left_behind():
    yield
    leftovers = [thread for thread in threading.enumerate() if thread.name == "kronix-queue-monitor"]
    assert not leftovers, f"monitor threads still running: {leftovers}"


def test_refresh_shows_counts_bars_failures_and_throughput(driver):
    batch = driver.map(sum_chunk, range(100), chunk_size=10)  # 10 chunks, 2 of them bad
    monitor = QueueMonitor(driver, refresh=0.1, start=False)

    assert monitor.refresh_count == 1  # the constructor refreshed once
    assert monitor.stats[["pending", "completed", "failed"]].values.tolist() == [[10, 0, 0]]
    assert monitor.progress_bars[batch.id].value == 0 and monitor.progress_bars[batch.id].max == 10
    assert monitor.failures.empty and "no dead letters" in monitor.failure_table.value
    assert monitor.throughput_recent != monitor.throughput_recent  # NaN: no previous refresh yet

    run_burst(driver, concurrency=2)
    assert monitor.refresh_now() is True

    assert monitor.refresh_count == 2 and monitor.last_error is None
    row = monitor.stats.iloc[0]
    assert (row["queue"], row["pending"], row["processing"], row["completed"], row["failed"]) == (
        "default", 0, 0, 8, 2)
    headings = re.findall(r"<th[ >][^>]*>(.*?)</th>", monitor.counts.value)
    assert headings[:9] == ["queue", "pending", "waiting", "running", "claimed", "completed", "failed",
                            "cancelled", "oldest pending (s)"]
    assert cells(monitor.counts.value)[:8] == ["default", "0", "0", "0", "0", "8", "2", "0"]
    assert "padding: 3px 8px" in monitor.counts.value and "text-align: right" in monitor.counts.value
    assert monitor.batch_progress == {batch.id: {"total": 10, "pending": 0, "processing": 0,
                                                 "completed": 8, "failed": 2, "waiting": 0, "cancelled": 0}}
    bar = monitor.progress_bars[batch.id]
    assert (bar.value, bar.max, bar.bar_style) == (10, 10, "danger")
    heading, (_, label) = monitor.batch_box.children[0].children[0], monitor.batch_box.children[0].children[1].children
    assert "test.monitor.chunk" in heading.value and batch.id in heading.value  # the full name and id
    assert label.value.startswith("10/10 done · 8 completed · 2 failed · 0 running")
    assert sorted(monitor.failures["error_type"]) == ["KeyError", "ValueError"]
    assert set(monitor.failures["name"]) == {"test.monitor.chunk"}
    assert {"bad rows in chunk 3", "'bad rows in chunk 7'"} == set(monitor.failures["error_message"])
    assert "bad rows in chunk 3" in monitor.failure_table.value and "KeyError" in monitor.failure_table.value
    assert monitor.throughput_window > 0 and monitor.throughput_recent > 0
    assert "jobs/s over the last 1 min" in monitor.throughput.value


def test_the_failure_list_is_cut_to_the_newest_and_says_how_many_more(driver):
    driver.map(sum_chunk, range(100), chunk_size=10)
    run_burst(driver, concurrency=2)
    driver.push(sum_chunk.job({"chunk": 7, "start": 0, "stop": 1}, queue="later"))  # created and failed last
    run_burst(driver, queues=["later"])

    monitor = QueueMonitor(driver, failures=1, start=False)
    newest = driver.dead_letter_jobs().iloc[0]
    assert newest["queue"] == "later"
    assert len(monitor.failures) == 1
    assert monitor.failures.iloc[0].tolist() == [newest["finished_at"], newest["name"], newest["error_type"],
                                                 newest["error_message"]]
    assert "… and 2 more: driver.dead_letter_jobs()" in monitor.failure_table.value
    assert QueueMonitor(driver, failures=0, start=False).failures.empty


def test_the_retry_button_puts_dead_letters_back_to_pending(driver):
    batch = driver.map(sum_chunk, range(100), chunk_size=10)
    run_burst(driver, concurrency=2)
    monitor = QueueMonitor(driver, refresh=0.1, start=False)
    assert len(monitor.failures) == 2

    monitor.retry_button.click()

    retried = driver.jobs(batch=batch.id, status="pending")
    assert len(retried) == 2 and retried["attempts"].tolist() == [0, 0]
    assert driver.dead_letter_jobs().empty
    assert monitor.last_retried == 2 and "retried 2 dead letters" in monitor.status.value
    assert monitor.failures.empty  # the click refreshed the view
    assert monitor.batch_progress[batch.id]["pending"] == 2 and monitor.progress_bars[batch.id].value == 8
    assert monitor.stats.iloc[0]["failed"] == 0


def test_refreshing_updates_the_same_widgets_instead_of_making_new_ones(driver):
    monitor = QueueMonitor(driver, start=False)
    assert "no jobs in this table yet" in monitor.counts.value
    placeholder = monitor.batch_box.children[0]
    assert "no batches" in placeholder.value
    monitor.refresh_now()
    assert monitor.batch_box.children == (placeholder,)

    batch = driver.map(sum_chunk, range(20), chunk_size=10)
    monitor.refresh_now()
    row, bar = monitor.batch_box.children[0], monitor.progress_bars[batch.id]
    monitor.refresh_now()
    assert monitor.batch_box.children == (row,) and monitor.progress_bars[batch.id] is bar


def test_only_the_batches_asked_for_get_a_bar(driver):
    first = driver.map(sum_chunk, range(20), chunk_size=10)
    second = driver.map(sum_chunk, range(20, 50), chunk_size=10)
    every = QueueMonitor(driver, start=False)
    assert set(every.progress_bars) == {first.id, second.id}
    assert every.batch_progress[second.id]["total"] == 3

    chosen = QueueMonitor(driver, batches=[second, "no-such-batch"], start=False)
    assert list(chosen.batch_progress) == [second.id, "no-such-batch"]
    assert chosen.batch_progress["no-such-batch"]["total"] == 0
    assert len(chosen.batch_box.children) == 2

    newest = QueueMonitor(driver, max_batches=1, start=False)
    assert list(newest.batch_progress) == [driver.batches()["batch_id"].iloc[0]]


def test_by_default_only_recent_batches_get_a_bar(driver):
    old = driver.map(sum_chunk, range(20), chunk_size=10)
    time.sleep(1.5)
    recent = driver.map(sum_chunk, range(20, 40), chunk_size=10)
    assert list(QueueMonitor(driver, batches_since=timedelta(seconds=1), start=False).batch_progress) == [recent.id]
    assert list(QueueMonitor(driver, start=False).batch_progress) == [recent.id, old.id]  # newest first


def test_a_database_error_goes_to_the_status_line_and_the_thread_carries_on(db_url):
    table = unique_table()
    driver = DatabaseQueueDriver(db_url, table=table)  # the table does not exist yet
    try:
        monitor = QueueMonitor(driver, refresh=0.05)
        try:
            assert monitor.refresh_count == 0 and monitor.error_count >= 1
            assert "database error" in monitor.status.value and table in monitor.last_error
            wait_until(lambda: monitor.error_count >= 3, 10, "three failed refreshes")  # the background thread kept trying
            assert monitor.running

            driver.create_table()
            wait_until(lambda: monitor.refresh_count >= 1, 10, "a refresh")
            wait_until(lambda: monitor.last_error is None and "database error" not in monitor.status.value, 10,
                       "the error to clear")
        finally:
            monitor.stop()
    finally:
        drop_table(db_url, table)
        driver.close()


def test_pause_holds_the_background_refresh_and_stop_joins_the_thread(driver):
    monitor = QueueMonitor(driver, refresh=0.05)
    try:
        wait_until(lambda: monitor.refresh_count >= 3, 10, "three refreshes")
        monitor.pause_button.value = True  # what clicking the toggle does
        assert monitor.paused and monitor.pause_button.description == "Resume"
        assert "paused" in monitor.status.value
        time.sleep(0.1)  # a refresh under way when the button was pressed may still finish
        paused_at = monitor.refresh_count
        time.sleep(0.5)  # ten intervals
        assert monitor.refresh_count == paused_at

        monitor.resume()
        assert monitor.pause_button.description == "Pause"
        wait_until(lambda: monitor.refresh_count >= paused_at + 2, 10, "refreshes after resuming")
    finally:
        monitor.stop()
    assert not monitor.running and not monitor._thread.is_alive()
    stopped_at = monitor.refresh_count
    time.sleep(0.2)
    assert monitor.refresh_count == stopped_at and "stopped" in monitor.status.value


def test_close_stops_the_thread_and_closes_the_widgets(driver):
    monitor = QueueMonitor(driver, refresh=0.05)
    monitor.close()
    assert not monitor.running
    assert monitor.widget.comm is None and monitor.retry_button.comm is None


def test_a_cell_ending_in_a_monitor_shows_the_widget_and_an_html_snapshot(driver):
    batch = driver.map(sum_chunk, range(30), chunk_size=10)
    with QueueMonitor(driver, refresh=0.05) as monitor:
        bundle = monitor._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == monitor.widget.model_id
    assert batch.id in bundle["text/html"] and "0/3 done" in bundle["text/html"]
    assert cells(bundle["text/html"])[:2] == ["default", "3"]  # three pending chunks
    assert bundle["text/plain"].startswith(f"QueueMonitor({driver.table_name!r}, running")
    assert not monitor.running  # the with block stopped it


def test_bad_arguments_are_refused_by_name(driver):
    with pytest.raises(ValueError, match="refresh must be"):
        QueueMonitor(driver, refresh=0)
    with pytest.raises(ValueError, match="batches_since must be a positive timedelta"):
        QueueMonitor(driver, batches_since=timedelta(0))
    with pytest.raises(TypeError, match="batches takes Batch handles or batch ids, got int"):
        QueueMonitor(driver, batches=[42])


def test_without_ipywidgets_it_says_how_to_install_it(tmp_path):
    script = f"""
import sys
sys.modules["ipywidgets"] = None  # as if it were not installed
import kronix_data
from kronix_data.monitor import QueueMonitor
driver = kronix_data.DatabaseQueueDriver("sqlite:///{tmp_path / 'jobs.db'}")
try:
    QueueMonitor(driver)
except ImportError as error:
    print("ImportError:", error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=REPOSITORY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ImportError: {INSTALL_HINT}"
    assert "pip install 'kronix-data[notebook]'" in INSTALL_HINT


def test_a_queue_toggle_pauses_the_queue_for_every_worker_and_shows_a_pause_made_elsewhere(driver, other_driver):
    from kronix_data import Job

    driver.push_many([Job("n", 1, queue="etl"), Job("n", 2, queue="load")])
    waiting = Job("n", 3, queue="load", depends_on=[driver.jobs(queue="load")["id"].iloc[0]])
    driver.push(waiting)
    monitor = QueueMonitor(driver, refresh=60, start=False)
    try:
        assert set(monitor.queue_buttons) == {"etl", "load"} and monitor.queue_paused == {"etl": False, "load": False}
        assert "waiting" in monitor.counts.value and monitor.stats.set_index("queue").loc["load", "waiting"] == 1
        monitor.queue_buttons["etl"].value = True  # a click
        assert other_driver.pop("etl") is None and monitor.queue_paused["etl"] is True
        assert monitor.queue_buttons["etl"].description == "etl: paused" and "paused queue &#x27;etl&#x27;" in monitor.status.value
        other_driver.pause("load")  # from another notebook
        monitor.refresh_now()
        assert monitor.queue_buttons["load"].value is True and other_driver.pop("load") is None
        monitor.queue_buttons["etl"].value = False
        assert other_driver.pop("etl").payload == 1
    finally:
        monitor.close()


def test_the_throughput_chart_draws_the_timeline_and_is_redrawn_only_every_chart_refresh(driver):
    from helpers import color_fraction, png_pixels

    driver.map(sum_chunk, range(100), chunk_size=10)
    monitor = QueueMonitor(driver, refresh=0.1, start=False)
    assert monitor.chart in monitor.widget.children
    assert monitor.widget.children.index(monitor.chart) == monitor.widget.children.index(monitor.throughput) + 1
    empty = png_pixels(monitor.chart.value)  # nothing finished yet: empty axes
    assert monitor.timeline["completed"].sum() == 0 and color_fraction(empty, "#1f77b4") == 0

    run_burst(driver, concurrency=2)
    monitor.chart_refresh = 3600.0
    assert monitor.refresh_now() is True
    assert monitor.timeline["completed"].sum() == 0  # not redrawn within chart_refresh
    monitor.chart_refresh = 0.0
    assert monitor.refresh_now() is True
    assert (monitor.timeline["completed"].sum(), monitor.timeline["failed"].sum()) == (8, 2)
    assert monitor.timeline["started"].sum() == 10
    drawn = png_pixels(monitor.chart.value)
    assert color_fraction(drawn, "#1f77b4") > 0.0002  # the newest interval's completions (test_charts: the rest)


def test_the_queue_toggles_show_each_queue_limits_and_their_use(driver):
    from kronix_data import Job

    driver.push_many([Job("n", i, queue="api") for i in range(5)] + [Job("n", 0, queue="plain")])
    driver.set_limits("api", concurrency=3, rate=10)
    driver.pop_many(5, "api")
    monitor = QueueMonitor(driver, refresh=60, start=False)
    try:
        assert monitor.queue_limits == {"api": "3/3 running · 3/10 per 1s", "plain": ""}
        assert monitor.queue_buttons["api"].description == "api · 3/3 running · 3/10 per 1s"
        assert monitor.queue_buttons["plain"].description == "plain"
    finally:
        monitor.close()


def test_close_leaves_a_static_snapshot_where_the_live_view_was_shown(driver, monkeypatch):
    import IPython.display

    sent = []
    monkeypatch.setattr(IPython.display, "display", lambda bundle, **options: sent.append(("display", bundle, options)))
    monkeypatch.setattr(IPython.display, "update_display",
                        lambda bundle, **options: sent.append(("update", bundle, options)))
    batch = driver.map(sum_chunk, range(40), chunk_size=10)  # chunk 3 fails
    run_burst(driver)
    monitor = QueueMonitor(driver, refresh=0.05, batches=[batch])
    monitor._ipython_display_()  # what a cell ending in `monitor` does
    [(kind, shown, options)] = sent
    assert kind == "display" and options["raw"] and options["display_id"].startswith("kronix-monitor-")
    assert "application/vnd.jupyter.widget-view+json" in shown and "text/html" in shown

    monitor.close()
    kind, snapshot, update = sent[-1]
    assert kind == "update" and update["display_id"] == options["display_id"]  # the same output, replaced
    assert set(snapshot) == {"text/html", "text/plain"}  # no widget: it is closed
    page = snapshot["text/html"]
    assert "closed: the figures of its last refresh" in page and "test.monitor.chunk" in page and batch.id in page
    assert "4/4 done · 3 completed · 1 failed" in page and "kronix-bar" in page and "#e53935" in page  # red: a failure
    assert snapshot["text/plain"].startswith(f"QueueMonitor({driver.table_name!r}, closed")
    assert not monitor.running and monitor.widget.comm is None
    assert "application/vnd.jupyter.widget-view+json" not in monitor._repr_mimebundle_()


def test_running_is_at_most_the_live_workers_threads_and_claimed_is_every_held_job(driver):
    from kronix_data.worker_options import WorkerOptions
    from kronix_data.workers import worker_beat

    batch = driver.map(sum_chunk, range(100), chunk_size=10)
    held = driver.pop_many(5)  # claimed ahead, as a worker does for short jobs
    monitor = QueueMonitor(driver, batches=[batch], start=False)
    assert monitor.queue_running == {"default": 5}  # a holder the registry does not know: all may run
    assert "5 running" in monitor._batch_label(batch.id).value
    two_threads = WorkerOptions(queues=("default",), concurrency=2)
    driver.store.heartbeat(driver.worker_id, held, [], worker_beat(driver.worker_id, two_threads, 2, starting=True))
    monitor.refresh_now()
    assert monitor.queue_running == {"default": 2} and monitor.stats.iloc[0]["processing"] == 5
    assert cells(monitor.counts.value)[:5] == ["default", "5", "0", "2", "5"]  # pending, waiting, running, claimed
    assert "2 running · 5 claimed" in monitor._batch_label(batch.id).value
    silent = WorkerOptions(queues=("default",), concurrency=2, lease_timeout=0.01)
    driver.store.heartbeat(driver.worker_id, [], [], worker_beat(driver.worker_id, silent, 2))
    wait_until(lambda: monitor.refresh_now() and monitor.queue_running == {"default": 0}, 10,
               "the worker to count as gone")  # a gone worker runs nothing: its jobs wait for their lease
    assert "0 running · 5 claimed" in monitor._batch_label(batch.id).value
    driver.store.mark_worker_stopped(driver.worker_id)
    monitor.refresh_now()
    assert monitor.queue_running == {"default": 5}  # held since it stopped: taken by hand, all may run
