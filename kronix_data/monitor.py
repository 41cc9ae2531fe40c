"""QueueMonitor: a live view of the queue inside Jupyter, built from ipywidgets.

A notebook user who has just enqueued a batch wants to see it move without
blocking the kernel: counts per queue, a progress bar per batch, throughput,
the latest failures, and a button to retry them.  The monitor reads the same
DataFrames the user can (``fetch_stats``, ``batches``, ``jobs``)
on a daemon thread; a database error is shown in its status line and the next
refresh tries again.  ipywidgets is imported only when a monitor is built, so
the rest of the package works without it.
"""

from __future__ import annotations

import html
import logging
import math
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import pandas as pd

from . import monitor_html
from .analytics import split_error
from .batches import Batch
from .errors import InvalidInputError
from .limits import limits_text
from .progress import STRAGGLER_COLUMNS, batch_eta, batch_view, format_duration, stragglers_frame
from .workers import WORKER_COLUMNS, running_count

log = logging.getLogger(__name__)

INSTALL_HINT = "QueueMonitor needs ipywidgets; install it with: pip install 'kronix-data[notebook]'"

#: The counts table's columns (as fetch_stats names them, and ``running``: see below) and their headings.
#: ``processing`` is every job a worker holds, so it is shown as "claimed"; "running" is at most the
#: claimed jobs, counting for each live worker at most its threads (``workers.running_count``): a worker
#: claims short jobs ahead of its free threads, and a finished job stays ``processing`` until its
#: completion is written with the next claim, so "claimed" can be above what runs.
COUNT_COLUMNS = {"queue": "queue", "pending": "pending", "waiting": "waiting", "running": "running",
                 "processing": "claimed", "completed": "completed", "failed": "failed", "cancelled": "cancelled",
                 "oldest_pending_age_s": "oldest pending (s)", "wait_s_p50": "wait p50 (s)",
                 "run_s_p50": "run p50 (s)", "throughput_per_s": "jobs/s"}
_BATCH_COUNTS = ("total", "pending", "processing", "completed", "failed", "waiting", "cancelled")
#: The failures table's columns, as dead_letter_jobs names them.
FAILURE_COLUMNS = ["finished_at", "name", "error_type", "error_message"]
MESSAGE_WIDTH = 120


def _ipywidgets():
    try:
        import ipywidgets
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return ipywidgets


class QueueMonitor:
    """A live ipywidgets view of one queue table; refreshes every ``refresh`` seconds.

    Parameters
    ----------
    driver
        The queue to watch (any :class:`~kronix_data.DatabaseQueueDriver`).
    refresh
        Seconds between background refreshes.
    batches
        Batches (``Batch`` handles or batch ids) to show progress bars for;
        by default the ``max_batches`` newest batches with a job created
        within ``batches_since`` (a day): reading every batch of a big
        table at each refresh would be slow.
    window
        The stats window: throughput is averaged over it.
    failures
        How many of the newest dead letters to list (0: no list).
    start
        Start the background refresh at once (``start()`` later otherwise).

    Everything shown is also kept in plain attributes: ``stats``,
    ``batch_progress``, ``failures``, ``throughput_window``,
    ``throughput_recent``, ``refresh_count``, ``error_count``, ``last_error``.
    ``refresh_now()`` refreshes once, synchronously; ``stop()`` (or
    ``close()``) ends the background thread.
    """

    def __init__(self, driver, refresh: float = 1.0, batches: Iterable[Any] | None = None, *,
                 window: timedelta = timedelta(minutes=1), failures: int = 5, max_batches: int = 10,
                 batches_since: timedelta = timedelta(days=1), start: bool = True):
        widgets = _ipywidgets()
        refresh = float(refresh)
        if not math.isfinite(refresh) or refresh <= 0:
            raise InvalidInputError(f"refresh must be a number of seconds > 0, got {refresh!r}")
        for name, value in (("window", window), ("batches_since", batches_since)):
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise InvalidInputError(f"{name} must be a positive timedelta, got {value!r}")
        if failures < 0 or max_batches < 0:
            raise InvalidInputError(f"failures and max_batches must be >= 0, got {failures} and {max_batches}")
        self.driver = driver
        self.refresh = refresh
        self.window = window
        self.failure_limit = failures
        self.max_batches = max_batches
        self.batches_since = batches_since
        self.batch_ids = None if batches is None else [_batch_id(batch) for batch in batches]

        self.stats = pd.DataFrame(columns=[column for column in COUNT_COLUMNS if column != "running"])
        #: queue -> the jobs that can be running now: the claimed ones, at most the live workers' threads
        self.queue_running: dict[str, int] = {}
        #: batch id -> its job name (None: unknown), for the headings of the bars
        self.batch_names: dict[str, str | None] = {
            _batch_id(batch): batch.name for batch in (batches or ()) if isinstance(batch, Batch)}
        self.failures = pd.DataFrame(columns=FAILURE_COLUMNS)
        #: batch id -> {"total", "pending", "processing", "completed", "failed", "waiting", "cancelled"}
        self.batch_progress: dict[str, dict[str, int]] = {}
        #: queue -> whether it is paused (for every worker), as of the last refresh
        self.queue_paused: dict[str, bool] = {}
        #: queue -> its limits and their use (``"2/3 running · 14/20 per 1s"``; "" without limits)
        self.queue_limits: dict[str, str] = {}
        #: Jobs completed per second over ``window`` (the stats' throughput, summed over queues).
        self.throughput_window = float("nan")
        #: Jobs completed per second between the last two refreshes.
        self.throughput_recent = float("nan")
        self.refresh_count = 0
        self.error_count = 0
        self.last_error: str | None = None
        self.last_refreshed: datetime | None = None
        self.last_retried: int | None = None
        #: How far behind the primary the last refresh's figures may be (0: read from the primary).
        self.replica_lag_s: float | None = 0.0
        self._completed_before: tuple[float, int] | None = None  # (monotonic time, completed jobs)
        #: Running batch id -> its expected time to finish (Batch.eta()), as of the last refresh.
        self.batch_eta: dict[str, timedelta | None] = {}
        #: Running batch id -> {"units_done", "units_total", "units_running"} (units within running chunks).
        self.batch_units: dict[str, dict[str, Any]] = {}
        #: The running batches' stragglers (Batch.stragglers(straggler_factor)), with a batch_id column.
        self.stragglers = pd.DataFrame(columns=["batch_id", *STRAGGLER_COLUMNS])
        #: driver.workers(): live workers, and those stopped or gone in the last hour.
        self.workers = pd.DataFrame(columns=list(WORKER_COLUMNS))
        #: unfinished batch id -> its chunks that can be running (see COUNT_COLUMNS), as of the last refresh
        self.batch_running: dict[str, int] = {}
        #: A running chunk is a straggler past this many times its batch's p95 chunk run time.
        self.straggler_factor = 3.0

        self.title = widgets.HTML(f"<b>kronix queue</b> <code>{html.escape(driver.table_name)}</code>")
        self.counts = widgets.HTML()
        self.throughput = widgets.HTML()
        self.batch_box = widgets.VBox()
        #: queue -> its pause toggle (pauses the queue for every worker, not this view)
        self.queue_buttons: dict[str, Any] = {}
        self.queue_box = widgets.HBox()
        self._no_batches = widgets.HTML("<i>no batches</i>")
        #: batch id -> its progress bar
        self.progress_bars: dict[str, Any] = {}
        self._batch_rows: dict[str, Any] = {}
        self.failure_table = widgets.HTML()
        self.straggler_table = widgets.HTML()
        self.workers_table = widgets.HTML()
        fit = widgets.Layout(width="auto", min_width="max-content")  # a button as wide as its label
        self.retry_button = widgets.Button(description="Retry dead letters", icon="redo", layout=fit,
                                           tooltip="driver.retry_dead_letters(): every dead letter back to pending")
        self.pause_button = widgets.ToggleButton(value=False, description="Pause", icon="pause",
                                                 layout=widgets.Layout(width="auto", min_width="max-content"),
                                                 tooltip="pause or resume the background refresh")
        self.status = widgets.HTML()
        self.retry_button.on_click(self._on_retry)
        self.pause_button.observe(self._on_pause, names="value")
        self.widget = widgets.VBox([
            self.title, self.counts, self.throughput, self.queue_box,
            widgets.HTML("<b>Batches</b>"), self.batch_box,
            widgets.HTML("<b>Stragglers</b>"), self.straggler_table, widgets.HTML("<b>Workers</b>"), self.workers_table,
            widgets.HTML("<b>Latest failures</b>"), self.failure_table,
            widgets.HBox([self.retry_button, self.pause_button]), self.status,
        ])
        self._add_chart_section(widgets)
        self._widgets = widgets
        self._lock = threading.Lock()  # one refresh at a time: background thread vs button clicks
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._notice = ""
        self._display_id: str | None = None  # set once shown by _ipython_display_: close() replaces that output
        self.closed = False
        self.refresh_now()
        if start:
            self.start()

    def __repr__(self) -> str:
        state = ("closed" if self.closed else "paused" if self.paused else "running" if self.running
                 else "stopped")
        return (f"QueueMonitor({self.driver.table_name!r}, {state}, every {self.refresh:g}s, "
                f"{self.refresh_count} refreshes)")

    # -- the background refresh ------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def paused(self) -> bool:
        return bool(self.pause_button.value)

    def start(self) -> QueueMonitor:
        """Start refreshing every ``refresh`` seconds on a daemon thread (no-op if running)."""
        if not self.running:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kronix-queue-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """End the background refresh and wait up to ``timeout`` seconds for its thread.

        A refresh under way (a slow query) is finished first; a thread still
        stuck after ``timeout`` is left to end by itself (it is a daemon).
        """
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the monitor's refresh thread is still in a query after %ss; it ends after it", timeout)
        self._render_status()

    def close(self) -> None:
        """Stop refreshing and close the widgets, leaving a static snapshot (:meth:`_repr_html_`) where the
        live view was shown, so a notebook run top to bottom still shows the last figures."""
        self.stop()
        self.closed = True
        self._render_status()
        if self._display_id is not None:
            from IPython.display import update_display

            update_display({"text/html": self._repr_html_(), "text/plain": repr(self)}, raw=True,
                           display_id=self._display_id)
        for widget in [self.widget, self._no_batches, *self._batch_rows.values()]:  # some may be out of view
            _close_tree(widget)

    def pause(self) -> None:
        self.pause_button.value = True

    def resume(self) -> None:
        self.pause_button.value = False

    def __enter__(self) -> QueueMonitor:
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh):
            if not self.paused:
                self.refresh_now()

    # -- one refresh -----------------------------------------------------------

    def refresh_now(self) -> bool:
        """Read the queue once and update every widget; False (and the status line) on an error."""
        with self._lock:
            try:
                self._read_names()
                with self.driver.store.consistent_reads():  # one snapshot: every figure of a refresh agrees
                    stats = self.driver.fetch_stats(window=self.window)
                    settings = {row["queue"]: row for row in self.driver.queues().to_dict(orient="records")}
                    batches = self._read_batches()
                    # The newest few only: dead_letter_jobs() would read (and decode) every one each refresh.
                    failures = self.driver.jobs(status="failed", limit=self.failure_limit) \
                        if self.failure_limit else None
                    progress = self._read_progress(batches)
                    held = self.driver.store.count_held_by_queue_and_worker()
                    timeline = self._read_timeline()
            except Exception as error:  # noqa: BLE001 - any database trouble is shown, never raised
                self.error_count += 1
                self.last_error = f"{type(error).__name__}: {_first_line(error)}"
                self._render_status()
                return False
            self._show_stats(stats, held, progress[3])
            self._show_queues(list(stats["queue"]), settings)
            self._show_batches(batches)
            self._show_progress(*progress)
            self._show_failures(failures)
            self._show_timeline(timeline)
            self.refresh_count += 1
            self.last_error = None
            self.last_refreshed = datetime.now(timezone.utc)
            self._render_status()
            return True

    def _read_names(self) -> None:
        """The job names of the batches asked for by id (read once each: a batch's name does not change)."""
        for batch_id in self.batch_ids or ():
            if batch_id not in self.batch_names:
                names = self.driver.store.names_in_batch(batch_id)
                self.batch_names[batch_id] = names[0] if len(names) == 1 else None

    def _show_stats(self, stats: pd.DataFrame, held: list[tuple[str, str | None, int]],
                    workers: pd.DataFrame) -> None:
        self.stats = stats
        records, by_queue = workers.to_dict("records"), {}
        for queue, holder, count in held:
            by_queue.setdefault(queue, {})[holder] = int(count)
        self.queue_running = {queue: running_count(by_queue.get(queue, {}), records) for queue in stats["queue"]}
        self.replica_lag_s = stats.attrs.get("replica_lag_s", 0.0)
        completed = int(stats["completed"].sum())
        now = time.monotonic()
        if self._completed_before is not None and now > self._completed_before[0]:
            before_at, before = self._completed_before
            self.throughput_recent = max(completed - before, 0) / (now - before_at)  # prune() may lower it
        self._completed_before = (now, completed)
        self.throughput_window = float(stats["throughput_per_s"].sum()) if len(stats) else 0.0
        shown = stats.assign(running=[self.queue_running[queue] for queue in stats["queue"]])
        shown = shown[list(COUNT_COLUMNS)].rename(columns=COUNT_COLUMNS)
        self.counts.value = (monitor_html.table(shown, float_format=_number) if len(stats)
                             else "<i>no jobs in this table yet</i>")
        self.throughput.value = (
            f"<b>Throughput</b>: {_number(self.throughput_window)} jobs/s over the last "
            f"{_duration(self.window)} · {_number(self.throughput_recent)} jobs/s over the last refresh")

    # -- the throughput chart (driver.timeline drawn by kronix_data.charts) -------------

    def _add_chart_section(self, widgets) -> None:
        """A PNG of jobs per ``chart_freq`` over the last ``chart_span``, below the throughput line, redrawn
        at most every ``chart_refresh`` seconds (a drawing costs tens of milliseconds; the counts do not wait)."""
        #: driver.timeline(chart_freq, since=chart_span) as of the last chart refresh.
        self.timeline = pd.DataFrame(columns=["interval", "queue", "started", "completed", "failed"])
        self.chart_freq, self.chart_span, self.chart_refresh = "15s", timedelta(minutes=15), 5.0
        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="720px"))
        self._chart_drawn_at: float | None = None
        children = list(self.widget.children)
        at = children.index(self.throughput) + 1 if self.throughput in children else len(children)
        self.widget.children = [*children[:at], self.chart, *children[at:]]

    def _read_timeline(self) -> pd.DataFrame | None:
        due = self._chart_drawn_at is None or time.monotonic() - self._chart_drawn_at >= self.chart_refresh
        return self.driver.timeline(self.chart_freq, since=self.chart_span) if due else None

    def _show_timeline(self, timeline: pd.DataFrame | None) -> None:
        if timeline is None:
            return
        from .charts import timeline_png

        self.timeline = timeline
        self.chart.value = timeline_png(timeline, title=f"jobs per {self.chart_freq}, last {_duration(self.chart_span)}",
                                        width=7.0, height=2.2, dpi=90)
        self._chart_drawn_at = time.monotonic()

    def _show_queues(self, queues: list[str], settings: dict[str, dict[str, Any]]) -> None:
        """One pause toggle per queue; pressed means paused for every worker everywhere."""
        names = sorted(set(queues) | set(settings))
        self.queue_paused = {queue: bool(settings.get(queue, {}).get("paused", False)) for queue in names}
        self.queue_limits = {queue: limits_text(settings.get(queue, {})) for queue in names}
        for queue in names:
            button = self.queue_buttons.get(queue)
            if button is None:
                button = self.queue_buttons[queue] = self._widgets.ToggleButton(
                    tooltip=f"driver.pause({queue!r}) / driver.resume({queue!r}): no worker claims from a "
                            "paused queue", layout=self._widgets.Layout(width="auto"))
                button.observe(lambda change, queue=queue: self._on_queue_toggle(queue, change), names="value")
            button.value = self.queue_paused[queue]  # the database says; a click in another notebook shows here
            self._label_queue_button(queue)
        buttons = [self.queue_buttons[queue] for queue in names]
        if list(self.queue_box.children) != buttons:
            self.queue_box.children = buttons

    def _label_queue_button(self, queue: str) -> None:
        button = self.queue_buttons[queue]
        button.description, button.icon = (f"{queue}: paused", "play") if button.value else (f"{queue}", "pause")
        limits = self.queue_limits.get(queue)
        if limits:
            button.description += f" · {limits}"

    def pause_queue(self, queue: str) -> None:
        """What a queue's toggle does when pressed: ``driver.pause(queue)``, then a refresh."""
        self.driver.pause(queue)
        self._notice = f"paused queue {queue!r} at {datetime.now():%H:%M:%S}"
        self.refresh_now()

    def resume_queue(self, queue: str) -> None:
        """What a pressed toggle does when released: ``driver.resume(queue)``, then a refresh."""
        self.driver.resume(queue)
        self._notice = f"resumed queue {queue!r} at {datetime.now():%H:%M:%S}"
        self.refresh_now()

    def _on_queue_toggle(self, queue: str, change) -> None:
        if bool(change["new"]) == self.queue_paused.get(queue):
            return  # set by a refresh, not a click
        try:
            (self.pause_queue if change["new"] else self.resume_queue)(queue)
        except Exception as error:  # noqa: BLE001 - shown in the status line, the kernel carries on
            self.error_count += 1
            self.last_error = f"pause/resume failed: {type(error).__name__}: {_first_line(error)}"
            self._render_status()

    def _read_batches(self) -> dict[str, dict[str, int]]:
        """Counts per batch: the batches asked for (by their index), else the newest recent ones."""
        if self.batch_ids is not None:
            return {batch_id: {key: count for key, count in Batch(batch_id, self.driver).progress().items()
                               if key in _BATCH_COUNTS} for batch_id in self.batch_ids}
        recent = self.driver.batches(since=self.batches_since).head(self.max_batches)  # newest first
        self.batch_names.update(zip(recent["batch_id"], recent["name"].where(recent["name"].notna(), None)))
        return {record["batch_id"]: {key: int(record[key]) for key in _BATCH_COUNTS}
                for record in recent.to_dict(orient="records")}

    def _show_batches(self, progress: dict[str, dict[str, int]]) -> None:
        for batch_id, counts in progress.items():
            self._batch_row(batch_id, counts)
        self.batch_progress = progress
        rows = [self._batch_rows[batch_id] for batch_id in progress] or [self._no_batches]
        if list(self.batch_box.children) != rows:
            self.batch_box.children = rows

    def _batch_row(self, batch_id: str, counts: dict[str, int]) -> None:
        """Create or update one batch's row: its full name and id above a bar of the finished chunks
        (completed, failed or cancelled) out of the total, and the counts beside the bar."""
        widgets = self._widgets
        if batch_id not in self.progress_bars:
            self.progress_bars[batch_id] = widgets.IntProgress(min=0, layout=widgets.Layout(width="50%",
                                                                                            min_width="200px"))
            heading = widgets.HTML(monitor_html.batch_heading(self.batch_names.get(batch_id), batch_id))
            self._batch_rows[batch_id] = widgets.VBox([heading, widgets.HBox([self.progress_bars[batch_id],
                                                                              widgets.HTML()])])
        bar = self.progress_bars[batch_id]
        finished = counts["completed"] + counts["failed"] + counts["cancelled"]
        bar.max = max(counts["total"], 1)
        bar.value = min(finished, bar.max)
        bar.bar_style = monitor_html.bar_style(counts)
        self._batch_label(batch_id).value = monitor_html.batch_summary(counts, self._batch_running(batch_id,
                                                                                                   counts))

    def _batch_label(self, batch_id: str):
        return self._batch_rows[batch_id].children[1].children[1]

    def _batch_running(self, batch_id: str, counts: dict[str, int]) -> int:
        """A batch's claimed chunks that can be running (``workers.running_count`` of their holders)."""
        return min(counts["processing"], self.batch_running.get(batch_id, 0))

    # -- progress within running batches, stragglers and workers ---------------------

    def _read_progress(self, batches: dict[str, dict[str, int]]) -> tuple[dict, dict, pd.DataFrame, pd.DataFrame]:
        """For each unfinished batch shown: its units, ETA and stragglers; and the worker registry."""
        store, units, etas, stragglers, held = self.driver.store, {}, {}, [], {}
        for batch_id, counts in batches.items():
            if not any(counts[status] for status in ("pending", "waiting", "processing")):
                continue
            view = batch_view(store, batch_id)
            held[batch_id] = view.held
            units[batch_id] = {"units_done": view.units_done, "units_total": view.units_total,
                               "units_running": view.units_running}
            etas[batch_id] = batch_eta(store, view)
            found = stragglers_frame(store, batch_id, view, self.straggler_factor)
            if len(found):
                stragglers.append(found.assign(batch_id=batch_id)[["batch_id", *STRAGGLER_COLUMNS]])
        frame = pd.concat(stragglers, ignore_index=True) if stragglers else pd.DataFrame(
            columns=["batch_id", *STRAGGLER_COLUMNS])
        workers = self.driver.workers()
        records = workers.to_dict("records")
        self.batch_running = {batch_id: running_count(holders, records) for batch_id, holders in held.items()}
        return units, etas, frame, workers

    def _show_progress(self, units: dict, etas: dict, stragglers: pd.DataFrame, workers: pd.DataFrame) -> None:
        self.batch_units, self.batch_eta, self.stragglers, self.workers = units, etas, stragglers, workers
        for batch_id, eta in etas.items():
            label = self._batch_label(batch_id)
            done, total = units[batch_id]["units_done"], units[batch_id]["units_total"]
            slow = int((stragglers["batch_id"] == batch_id).sum()) if len(stragglers) else 0
            label.value += ((f" · {done:,g}/{total:,g} units" if total else "") + f" · eta {format_duration(eta)}"
                            + (f" · {slow} straggler{'s' * (slow != 1)}" if slow else ""))
        if len(stragglers):
            shown = stragglers.assign(
                batch_id=stragglers["batch_id"].str[:16], elapsed_s=stragglers["elapsed_s"].round(1),
                progress=[f"{done:,g}/{total:,g}" if total == total and done == done else "–"
                          for done, total in zip(stragglers["progress_done"], stragglers["progress_total"])])
            self.straggler_table.value = monitor_html.table(shown[["batch_id", "chunk", "reserved_by", "elapsed_s",
                                                            "p95_run_s", "progress"]], float_format=_number)
        else:
            self.straggler_table.value = "<i>no stragglers</i>"
        if len(workers):
            shown = workers.assign(queues=workers["queues"].map(", ".join), seen_s_ago=workers["seen_s_ago"].round(1))
            self.workers_table.value = monitor_html.table(shown[["worker_id", "state", "host", "pid", "queues",
                                                                 "concurrency", "running", "seen_s_ago"]],
                                                          float_format=_number)
        else:
            self.workers_table.value = "<i>no worker seen in the last hour</i>"

    def _show_failures(self, dead_letters: pd.DataFrame | None) -> None:
        """The newest dead letters (``jobs(status="failed")``), error split as in ``dead_letter_jobs()``."""
        if dead_letters is None:
            self.failures = pd.DataFrame(columns=FAILURE_COLUMNS)
            self.failure_table.value = ""
            return
        errors = [split_error(text) for text in dead_letters["last_error"]]
        latest = dead_letters.assign(error_type=[error_type for error_type, _ in errors],
                                     error_message=[message for _, message in errors])
        latest = latest.sort_values("finished_at", ascending=False, kind="stable")[FAILURE_COLUMNS]
        self.failures = latest.reset_index(drop=True)
        if not len(latest):
            self.failure_table.value = "<i>no dead letters</i>"
            return
        shown = latest.assign(error_message=latest["error_message"].map(_one_line),
                              finished_at=latest["finished_at"].dt.strftime("%Y-%m-%d %H:%M:%S"))
        more = int(self.stats["failed"].sum()) - len(latest)
        self.failure_table.value = monitor_html.table(shown) + (
            f"<i>… and {more:,} more: driver.dead_letter_jobs()</i>" if more > 0 else "")

    # -- buttons and the status line ------------------------------------------

    def retry_dead_letters(self) -> int:
        """What the retry button does: every dead letter back to pending, then a refresh."""
        count = self.driver.retry_dead_letters()
        self.last_retried = count
        self._notice = f"retried {count:,} dead letter{'s' * (count != 1)} at {datetime.now():%H:%M:%S}"
        self.refresh_now()
        return count

    def _on_retry(self, _button) -> None:
        try:
            self.retry_dead_letters()
        except Exception as error:  # noqa: BLE001 - shown in the status line, the kernel carries on
            self.error_count += 1
            self.last_error = f"retry failed: {type(error).__name__}: {_first_line(error)}"
            self._render_status()

    def _on_pause(self, change) -> None:
        self.pause_button.description, self.pause_button.icon = ("Resume", "play") if change["new"] else (
            "Pause", "pause")
        self._render_status()

    def _render_status(self) -> None:
        if self.closed:
            state = "closed: the figures of its last refresh"
        elif self._stop.is_set() or self._thread is None:
            state = "stopped"
        else:
            state = "paused" if self.paused else f"refreshing every {self.refresh:g}s"
        parts = [state]
        if self.last_refreshed is not None:
            parts.append(f"last refresh {self.last_refreshed.astimezone():%H:%M:%S}")
        if self.driver.store.read_engine is not None:
            lag = self.replica_lag_s
            parts.append("read from a standby" + ("" if lag is None or lag != lag else f", {lag:.1f}s behind"))
        if self._notice:
            parts.append(html.escape(self._notice))
        text = " · ".join(parts)
        if self.last_error:
            text += f' · <span style="color: #c00">database error: {html.escape(self.last_error)}</span>'
        self.status.value = text

    # -- display ---------------------------------------------------------------

    def display(self) -> None:
        """Show the monitor in the current notebook cell's output."""
        from IPython.display import display

        display(self)

    def _ipython_display_(self) -> None:
        """Show the live widget (with its static snapshot for frontends without widgets) under a display id,
        so that :meth:`close` can put the snapshot in its place."""
        from IPython.display import display

        if self._display_id is None:
            self._display_id = f"kronix-monitor-{id(self):x}-{time.monotonic_ns():x}"
        display(self._repr_mimebundle_(), raw=True, display_id=self._display_id)

    def _repr_mimebundle_(self, **kwargs) -> dict[str, Any]:
        """The live widget, with a static HTML snapshot for frontends without widgets (once closed: the
        snapshot alone)."""
        bundle = {} if self.closed else dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/html"] = self._repr_html_()
        bundle["text/plain"] = repr(self)
        return bundle

    def _repr_html_(self) -> str:
        """The monitor as static HTML, as of its last refresh (inline styles only: see monitor_html)."""
        batches = "".join(
            monitor_html.batch_block(self.batch_names.get(batch_id), batch_id, counts,
                                     monitor_html.batch_summary(counts, self._batch_running(batch_id, counts)))
            for batch_id, counts in self.batch_progress.items())
        return (f'<div class="kronix-monitor">{self.title.value}{self.counts.value}<p>{self.throughput.value}</p>'
                + monitor_html.section("Batches", batches or "<i>no batches</i>")
                + monitor_html.section("Stragglers", self.straggler_table.value)
                + monitor_html.section("Workers", self.workers_table.value)
                + monitor_html.section("Latest failures", self.failure_table.value)
                + f"<p>{self.status.value}</p></div>")


def _close_tree(widget: Any) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


def _batch_id(batch: Any) -> str:
    batch_id = batch if isinstance(batch, str) else getattr(batch, "id", None)
    if not isinstance(batch_id, str):
        raise InvalidInputError(f"batches takes Batch handles or batch ids, got {type(batch).__name__}")
    return batch_id


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return _one_line(text.splitlines()[0] if text else "")


def _one_line(text: Any, width: int = MESSAGE_WIDTH) -> str:
    text = " ".join(str(text if text is not None else "").split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _number(value: float) -> str:
    """Three significant digits for small values (0.00417 jobs/s), one decimal for large ones."""
    return "–" if value != value else f"{value:.3g}" if abs(value) < 100 else f"{value:,.1f}"


def _duration(window: timedelta) -> str:
    seconds = window.total_seconds()
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
