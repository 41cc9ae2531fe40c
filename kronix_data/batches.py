"""Batches: enqueue data in chunks as one batch, then follow, wait for and collect its jobs.

A notebook user enqueues a whole ETL in one call (:func:`enqueue_chunks`, or
``driver.map``) and gets a :class:`Batch` back.  The call is idempotent: the
batch id is a hash of what is enqueued and every chunk carries the key
``f"{batch_id}:{n}"``, so re-running the same cell finds the stored chunks and
enqueues nothing.

A Batch is only an id and a driver; everything it shows is read from the
table (through the ``<table>_batch`` index on ``(batch_id, status)``), so a
handle found again after a kernel restart (``driver.batch(batch_id)``) knows
as much as the one ``enqueue_chunks`` returned.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import islice
from typing import Any, Protocol

import pandas as pd

from .analytics import dead_letter_frame, dead_letter_jobs, typed_frame, with_lag
from .chunking import (ContentDigest, canonical_json, checked_batch_id, chunks, default_batch_id,
                       frame_batch_id, range_batch_id)
from .columnar import FRAME_RESULT, concat_frames, parquet_to_frame
from .errors import InvalidInputError, NotFoundError
from .history import time_bound
from .job import Job, JobStatus, checked_json_size, decode_json, encode_value, new_job_id
from .limits import RateWindow
from .schema import CHUNK_DATA, RESULT_DATA
from .progress import BatchView, batch_eta, batch_view, chunk_number, format_duration, stragglers_frame
from .store import ChunksStoredMeanwhile, JobStore, WaitGroup
from .tasks import Task
from .workers import running_count, slots_of, worker_records


class QueueHandle(Protocol):
    """What a batch needs of its queue: the store under it (a ``DatabaseQueueDriver`` has one)."""

    store: JobStore
    table_name: str

_STATUSES = tuple(status.value for status in JobStatus)

#: The columns of ``driver.batches()``.
BATCH_COLUMNS = {
    "batch_id": "object",
    "name": "object",
    "total": "int64",
    **{status: "int64" for status in _STATUSES},
    "created_at": "datetime64[ns, UTC]",
    "finished_at": "datetime64[ns, UTC]",
}

#: The columns of ``driver.queues()``.
QUEUE_COLUMNS = {"queue": "object", "paused": "bool", "concurrency": "Int64", "rate": "Int64", "per_s": "float64",
                 "started_in_window": "Int64", **{status: "int64" for status in _STATUSES}}

#: Statuses a chunk leaves only by finishing.
_UNFINISHED = ("pending", "waiting", "processing")


class Batch:
    """The chunk jobs of one :func:`~kronix_data.enqueue_chunks` call (same ``batch_id``).

    Attributes
    ----------
    id
        The batch id; ``driver.batch(id)`` finds the batch again later.
    driver
        The queue its jobs are in (the ``DatabaseQueueDriver`` that made or found it).
    name
        The job name of its chunks (None if unknown).
    unit
        What its chunks' progress counts, for the bar of :meth:`wait`: ``"row"``
        for the chunks of a DataFrame (each has its rows as its total from the
        start), else ``"unit"``.
    """

    def __init__(self, id: str, driver: QueueHandle, name: str | None = None, unit: str = "unit"):
        self.id = id
        self.driver = driver
        self.name = name
        self.unit = unit

    @property
    def store(self) -> JobStore:
        return self.driver.store

    def __repr__(self) -> str:
        return f"Batch({self.id!r}, name={self.name!r}, table={self.driver.table_name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Batch) and (self.id, self.driver.table_name, self.store.url_shown) == (
            other.id, other.driver.table_name, other.store.url_shown)

    def __hash__(self) -> int:
        return hash((self.id, self.driver.table_name))

    # -- progress -----------------------------------------------------------

    def progress(self, *, on_primary: bool = False) -> dict[str, Any]:
        """Chunk counts and the units reported within them.

        ``{"total", "pending", "processing", "completed", "failed", "waiting",
        "cancelled"}`` count chunks; ``units_done`` is the units of the completed
        chunks (their total) plus what running chunks reported done with
        ``current_job().progress()``, ``units_running`` the latter alone, and
        ``units_total`` the chunks' totals summed (None until every chunk has
        one; a DataFrame chunk has its rows from the start).
        """
        view = batch_view(self.store, self.id, on_primary=on_primary)
        return {**view.progress(), "units_running": view.units_running}

    def eta(self) -> timedelta | None:
        """The expected time until the batch is done, from what this batch has shown so far.

        The chunks left (pending and waiting ones at the batch's run time per unit
        or per chunk, running ones at their own reported pace) shared among the
        chunks that run at once, at most the live workers' concurrency on the
        batch's queue (``driver.workers()``).  ``timedelta(0)`` once done; None
        while nothing tells yet (no chunk completed or reported), or with no live
        worker and nothing running.
        """
        return batch_eta(self.store, batch_view(self.store, self.id))

    def stragglers(self, factor: float = 3) -> pd.DataFrame:
        """The running chunks whose elapsed time is over ``factor`` times the batch's p95 chunk run time.

        One row per straggler, slowest first: ``id``, ``chunk``, its worker
        (``reserved_by``), ``reserved_at``, ``elapsed_s``, ``p95_run_s`` and its last
        progress report (``progress_done``, ``progress_total``, ``progress_info``,
        ``progress_at``).  Empty while no chunk has completed.
        """
        return stragglers_frame(self.store, self.id, batch_view(self.store, self.id), factor)

    @property
    def done(self) -> bool:
        """True when no chunk is pending, waiting or processing (each completed, dead-lettered or cancelled)."""
        counts = self.store.count_batch_by_status(self.id)  # an index-only count: cheap to poll
        return not any(counts.get(status) for status in _UNFINISHED)

    def wait(self, progress: bool = True, timeout: float | None = None, poll_interval: float = 0.5) -> Batch:
        """Block until the batch is done, with a tqdm bar (terminal or Jupyter) unless ``progress=False``.

        The bar counts units when every chunk has a total (rows, for a DataFrame
        batch), else chunks, and advances within running chunks as their tasks
        report progress; it shows :meth:`eta`.  Dead-lettered and cancelled chunks
        count as finished (the bar shows how many failed, and is red while any has);
        look at :meth:`failures`.  ``running`` in the bar is the claimed chunks, at
        most each live worker's threads (:func:`~kronix_data.workers.running_count`).
        Returns the batch, so ``batch.wait().results()`` reads well.

        Raises
        ------
        TimeoutError
            Not done after ``timeout`` seconds (the chunks keep running).
        """
        if poll_interval <= 0:
            raise InvalidInputError(f"poll_interval must be > 0, got {poll_interval!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        try:
            while True:
                view = batch_view(self.store, self.id)
                if self.store.read_engine is not None:
                    lag = self.store.read_lag_s()
                    # A standby may say "done" too early (a retry it has not replayed), and one that stopped
                    # replaying would never say it: the primary has the last word then.
                    if not any(view.counts[status] for status in _UNFINISHED) or lag is None or \
                            lag > 5 * poll_interval:
                        view = batch_view(self.store, self.id, on_primary=True)
                counts = view.counts
                if progress:
                    bar = _show(bar, self, view)
                if not any(counts[status] for status in _UNFINISHED):
                    return self
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"batch {self.id!r} is not done after {timeout}s: {counts}")
                remaining = poll_interval if deadline is None else min(poll_interval, deadline - time.monotonic())
                time.sleep(max(remaining, 0.0))
        finally:
            if bar is not None:
                bar.close()

    # -- outcomes -----------------------------------------------------------

    def results(self) -> pd.DataFrame:
        """The completed chunks' results, in chunk order.

        Columns ``chunk``, ``job_id``, ``result`` (one row per completed chunk).
        When every result is a list of records (dicts) or a dict of equal-length
        lists (``frame.to_dict("records")`` / ``to_dict("list")`` in the task),
        the results are concatenated into one DataFrame instead, with a
        ``chunk`` column first.
        """
        rows = self.store.read_batch_results(self.id)
        on_primary = False
        if self.store.read_engine is not None and len(rows) < self.store.count_batch_by_status(
                self.id, on_primary=True).get(JobStatus.COMPLETED.value, 0):
            rows, on_primary = self.store.read_batch_results(self.id, on_primary=True), True  # the standby lags
        return results_frame(self.store, [(job_id, key, self.id, result) for job_id, key, result in rows],
                             on_primary=on_primary)

    def failures(self) -> pd.DataFrame:
        """The dead-lettered chunks, same columns as ``driver.dead_letter_jobs()``."""
        return dead_letter_jobs(self.store, batch=self.id)

    def retry_failures(self) -> int:
        """Run the dead-lettered chunks again (pending, attempts 0); returns how many.

        Jobs waiting for this batch go on waiting meanwhile, and run once every
        chunk has completed: retry, fix, retry, and the pipeline continues by itself.
        """
        return self.store.retry_dead_letters(batch=self.id)

    # -- pipelines ------------------------------------------------------------

    def then(self, task_or_name: str | Task, payload: Any = None, **job_options: Any) -> Job:
        """One follow-up job that becomes due when every chunk of this batch has completed.

        ``task_or_name`` is a ``@task`` or a job name; ``job_options`` are
        :class:`~kronix_data.Job` options (``queue``, ``priority``, ``max_retries``,
        ``key``...).  Idempotent like ``map``: its key defaults to
        ``f"{batch_id}:then:{name}"``, so a re-run cell returns the stored job.
        Inside it, ``current_job().parent_results()`` has the chunks' results.
        """
        task = task_or_name if isinstance(task_or_name, Task) else None
        name = task.name if task else task_or_name
        if not isinstance(name, str):
            raise InvalidInputError(f"then takes a job name (str) or a @task, got {type(task_or_name).__name__}")
        job_options.setdefault("key", f"{self.id}:then:{name}")
        job = task.job(payload, **job_options) if task else Job(name, payload, **job_options)
        if job.depends_on:
            raise InvalidInputError("then() makes the job depend on the batch; push it yourself for other parents")
        job.depends_on = [self]
        push_jobs(self.store, [job])
        return job

    def cancel(self) -> dict[str, int]:
        """Cancel the batch: its pending and waiting chunks at once (and every job waiting for them), its
        running chunks as soon as their workers see it; returns ``{"pending", "waiting", "running"}`` counts."""
        return self.store.cancel_batch(self.id)

    # -- display ------------------------------------------------------------

    def _repr_html_(self) -> str:
        """The batch as static HTML (its name and id, a bar of its finished chunks, its counts), with inline
        styles only, so it reads the same in JupyterLab, VS Code notebooks and nbconvert's HTML."""
        from . import monitor_html

        counts = self.progress()
        finished = counts["completed"] + counts["failed"] + counts["cancelled"]
        detail = monitor_html.batch_summary(counts).replace(" done", " finished", 1)
        if counts["units_total"]:
            detail += f" · {counts['units_done']:,g}/{counts['units_total']:,g} {self.unit}s"
        shown = pd.DataFrame([{key: counts[key] for key in ("total", *_STATUSES)}])
        return (f"<div>{monitor_html.batch_block(self.name, self.id, counts, detail)}"
                f"{monitor_html.table(shown)}</div>") if finished or counts["total"] else (
            f"<div>{monitor_html.batch_heading(self.name, self.id)} <i>no chunks</i></div>")


def _concatenate(records: list[dict[str, Any]]) -> pd.DataFrame | None:
    """The concatenation of record-shaped results, or None if any result is not so shaped."""
    if not records:
        return None
    results = [record["result"] for record in records]
    if all(isinstance(result, pd.DataFrame) for result in results):  # through Arrow (kronix_data.columnar)
        return concat_frames([(record["chunk"], record["result"]) for record in records])
    if all(isinstance(result, list) and all(isinstance(item, Mapping) for item in result) for result in results):
        parts = [pd.DataFrame.from_records(result) for result in results]
    elif all(isinstance(result, Mapping) and result and _equal_length_lists(result) for result in results):
        parts = [pd.DataFrame(dict(result)) for result in results]
    else:
        return None
    for part, record in zip(parts, records):
        if "chunk" not in part.columns:
            part.insert(0, "chunk", record["chunk"])
    non_empty = [part for part in parts if len(part.columns)]
    if not non_empty:
        return pd.DataFrame({"chunk": pd.Series(dtype="int64")})
    return pd.concat(non_empty, ignore_index=True)


def _equal_length_lists(result: Mapping[str, Any]) -> bool:
    lengths = {len(value) if isinstance(value, list) else -1 for value in result.values()}
    return len(lengths) == 1 and -1 not in lengths


#: The bar of Batch.wait: tqdm's own remaining time is left out, for the batch's ETA in the postfix.
_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}{postfix}]"


def _progress_bar(batch: Batch, total: float, unit: str, position: float, postfix: dict[str, Any]):
    """A tqdm bar made once its total is known (a Jupyter bar's length is fixed when it is made).

    ``dynamic_ncols``: the whole width of a terminal, and of a notebook's output (tqdm.notebook's
    default is a narrow bar of a fixed size).
    """
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("Batch.wait(progress=True) needs tqdm: pip install 'kronix-data[notebook]' "
                          "(or pass progress=False)") from error
    return tqdm(total=total, initial=position, desc=batch.name or batch.id, unit=unit, bar_format=_BAR_FORMAT,
                postfix=postfix, dynamic_ncols=True)


def _paint(bar, failed: bool) -> None:
    """Red while chunks of the batch are dead-lettered: tqdm.notebook's "danger" style (which its own
    close() keeps, instead of the green of success), a terminal bar's colour."""
    widget = getattr(bar, "container", None)  # tqdm.notebook: an HBox of text, the progress widget, text
    if widget is not None:
        progress = widget.children[-2]
        if failed:
            progress.bar_style = "danger"
        elif progress.bar_style == "danger":
            progress.bar_style = ""
    else:
        bar.colour = "red" if failed else None


def _show(bar, batch: Batch, view: BatchView):
    """Make or move the bar: in units when every chunk has a total, else in chunks (with the running
    chunks' reported fractions); its ETA and counts in the postfix.  Returns the bar (None for a batch
    with no chunk: a bar of length 0 would be drawn as one of unknown length)."""
    counts, units_total = view.counts, view.units_total
    if units_total:
        total, unit, position = units_total, batch.unit + "s", view.units_finished
    else:
        total, unit, position = counts["total"], "chunks", view.chunks_finished
    if not total:
        return bar
    position = min(round(position, 1), total)
    position = int(position) if float(position).is_integer() else position
    records = [] if view.done else worker_records(batch.store)
    slots = None if view.done or view.queue is None else slots_of(records, view.queue)
    eta = timedelta(0) if view.done else batch_eta(batch.store, view, slots=slots)
    postfix = {"eta": format_duration(eta), "failed": counts["failed"], "running": running_count(view.held, records)}
    if bar is None:
        bar = _progress_bar(batch, total, unit, position, postfix)
    else:
        if bar.total != total or bar.unit != unit:  # a task reported another total: a new length
            bar.unit = unit
            bar.reset(total=total)
        bar.n = position
        bar.set_postfix(postfix, refresh=False)
    _paint(bar, counts["failed"] > 0)
    bar.refresh()
    return bar


# -- finding batches ------------------------------------------------------------


def find_batch(driver: QueueHandle, batch_id: str) -> Batch:
    """The Batch with this id (after a kernel restart, say); NotFoundError if no job has it."""
    if not isinstance(batch_id, str):
        raise InvalidInputError(f"batch_id must be a str, got {type(batch_id).__name__}")
    names = driver.store.names_in_batch(batch_id)
    if not names:
        raise NotFoundError(f"no job has batch id {batch_id!r} in table {driver.table_name!r}")
    return Batch(batch_id, driver, names[0] if len(names) == 1 else None)


def batches_frame(store: JobStore, since: datetime | timedelta | None = None) -> pd.DataFrame:
    """One row per batch, newest first: counts by status, first creation, latest finish.

    ``since`` keeps the batches with a job created since then (a timezone-aware
    datetime, or a timedelta meaning that long ago), whole: found through the
    ``created_at`` index, then counted through the batch index, so a monitor
    refreshing it stays cheap on a big table.
    """
    columns, rows = store.summarise_batches(None if since is None else time_bound(since, "since"))
    frame = typed_frame(rows, BATCH_COLUMNS, columns)
    # Newest first, sorted once the timestamps are one column (a Python sort of the rows cost ~80 ms at 10,000).
    frame = frame.sort_values(["created_at", "batch_id"], ascending=False, ignore_index=True)
    return with_lag(frame, store)


# -- enqueueing ------------------------------------------------------------------


def enqueue_chunks(driver: QueueHandle, name: str | Task, data: Any, chunk_size: int = 10_000, *,
                   queue: str | None = None, batch: str | None = None, max_retries: int | None = None,
                   priority: int | None = None, after: Any = None, chunk_format: str = "parquet") -> Batch:
    """Enqueue ``data`` as chunk jobs named ``name`` in one transaction and return their Batch.

    Parameters
    ----------
    driver
        The queue.
    name
        The job name, or a ``@task`` (its name, queue, max_retries and priority are the defaults).
    data, chunk_size
        What to cut and how finely, as for :func:`chunks`.
    queue, max_retries, priority
        Override the task's (or ``"default"``, 3 and 0).
    batch
        The batch id.  By default a hash of ``(name, queue, the chunks' content)``:
        enqueueing the same chunks again (a re-run notebook cell) enqueues nothing
        and returns the same Batch.  Name a batch (``"nightly-2026-11-28"``) to
        find it easily; its chunks are keyed ``f"{batch}:{n}"``, so chunk numbers
        already stored under that name are skipped whatever their data.
    after
        A Batch, a Job, a job id, or a list of them: every chunk waits (status
        ``waiting``) until all of them have completed.
    chunk_format
        How a DataFrame's chunks are stored: ``"parquet"`` (zstd Parquet bytes in
        the ``<table>_data`` side table, read back by the worker that runs the
        chunk) or ``"json"`` (rows in the JSON payload, as earlier releases did).
        Other data is always JSON.

    Raises
    ------
    InvalidInputError
        ``data`` has no chunk at all (a batch of nothing could never be found
        again), a value is not JSON (or a column not Parquet), a chunk's bytes are
        over the database's cap (``JobStore.max_data_bytes``), or ``after`` names
        a job or batch that is not stored; nothing is written then.
    """
    task = name if isinstance(name, Task) else None
    job_name = task.name if task else name
    if not isinstance(job_name, str):
        raise InvalidInputError(f"name must be a job name (str) or a @task, got {type(name).__name__}")
    queue = queue if queue is not None else task.queue if task else "default"
    max_retries = max_retries if max_retries is not None else task.max_retries if task else 3
    priority = priority if priority is not None else task.priority if task else 0
    parents = dependency_targets(after) if after is not None else ([], [])
    cut = chunks(data, chunk_size, chunk_format)  # checks data, chunk_size and format now, cuts lazily
    frame = data if isinstance(data, pd.DataFrame) else None
    if batch is not None:
        batch_id = checked_batch_id(batch)
    elif isinstance(data, range):
        batch_id = range_batch_id(job_name, queue, data, chunk_size)
    else:
        batch_id = frame_batch_id(job_name, queue, frame, chunk_size)  # None unless a hashable frame
    what = f"payload of job {job_name!r}"
    with contextlib.ExitStack() as stack:
        if frame is not None and batch_id is None:  # a frame pandas cannot hash: its id from its chunks (a cut more)
            batch_id = default_batch_id(job_name, queue, chunks(data, chunk_size, chunk_format))
        if batch_id is not None and (frame is not None or isinstance(data, range)):
            source: _Chunks = _CutByWindow(data, chunk_size, chunk_format, what)
        else:  # read once: cut, encoded and hashed chunk by chunk into a spool, stored from there
            digest = ContentDigest(job_name, queue) if batch_id is None else None
            source = stack.enter_context(_Spooled(cut, digest, what))
            batch_id = batch_id or digest.batch_id()
        if not source.count:
            raise InvalidInputError(f"data ({type(data).__name__}) is empty: there is nothing to enqueue")
        make = task.job if task else lambda payload, **options: Job(job_name, payload, **options)
        template = driver.store.row_for_push(make(None, queue=queue, max_retries=max_retries, priority=priority,
                                                  key=f"{batch_id}:0", batch_id=batch_id))
        wait = WaitGroup(f"batch:{batch_id}:after", [], *parents) if after is not None else None
        rows_of = None if frame is None else lambda n: min(chunk_size, len(frame) - n * chunk_size)
        for careful in (False, True):
            try:
                _store_windows(driver.store, batch_id, source, template, rows_of, wait, careful)
                break
            except ChunksStoredMeanwhile:  # another session stored some of these keys meanwhile: skip them
                source.rewind()
    return Batch(batch_id, driver, job_name, unit="row" if frame is not None else "unit")


#: Chunks per window: what ``map`` holds in memory (a few MB of rows), looks up (one indexed count) and
#: inserts (one COPY) at once.  Fewer, larger windows: fewer round trips, the re-run's main cost.
CHUNK_WINDOW = 5000
#: Payload text and Parquet bytes per insert at most (one chunk over it goes alone): big DataFrame chunks are not held
#: a window at a time, and a MariaDB statement stays under ``max_allowed_packet``.
_INSERT_BYTES = 16 * 1024 * 1024
#: Encoded chunks a spool keeps in memory before it moves to a temporary file.
_SPOOL_IN_MEMORY = 16 * 1024 * 1024


class _Chunks(Protocol):
    """A batch's chunks as ``map`` stores them: their count, then window by window, as ``(n, JSON text,
    Parquet bytes or None)``."""

    count: int

    def window(self, numbers: range, wanted: bool) -> Iterator[tuple[int, str, bytes | None]]:
        """The chunks numbered ``numbers``, one at a time (none when not ``wanted``: every one is stored)."""

    def rewind(self) -> None:
        """Start again from chunk 0 (the batch is stored again, carefully)."""


class _CutByWindow:
    """A DataFrame or a range, whose batch id is known without cutting it: cut one window at a time, and
    not at all for a window already stored (a re-run cell costs a look-up per window, no encoding)."""

    def __init__(self, data: Any, chunk_size: int, chunk_format: str, what: str):
        self.data, self.chunk_size, self.chunk_format, self.what = data, chunk_size, chunk_format, what
        self.count = math.ceil(len(data) / chunk_size)

    def window(self, numbers: range, wanted: bool) -> Iterator[tuple[int, str, bytes | None]]:
        if wanted:
            for payload in islice(chunks(self.data, self.chunk_size, self.chunk_format, first=numbers.start),
                                  len(numbers)):
                data = payload.pop("parquet", None)  # the chunk's bytes go beside the row, not in its JSON
                yield payload["chunk"], encode_value(payload, self.what), data

    def rewind(self) -> None:
        pass


class _Spooled:
    """Any other iterable (or a frame pandas cannot hash): read once, each chunk cut, encoded as
    :func:`canonical_json` (the text the default batch id hashes, and the payload stored) and written to
    a spool, so the id is known after one pass and the rows are built from the spool, a window at a time."""

    def __init__(self, cut: Iterator[dict[str, Any]], digest: ContentDigest | None, what: str):
        self.file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY, mode="w+", encoding="utf-8")
        self.count = 0
        for payload in cut:
            try:
                text = canonical_json(payload)
            except (TypeError, ValueError) as error:
                raise InvalidInputError(f"{what} (chunk {self.count}) is not JSON: {error}") from error
            checked_json_size(text, f"{what} (chunk {self.count})")
            if digest is not None:
                digest.update(text)
            self.file.write(text + "\n")  # compact JSON has no newline of its own
            self.count += 1
        self.rewind()

    def window(self, numbers: range, wanted: bool) -> Iterator[tuple[int, str, bytes | None]]:
        for n in numbers:
            text = self.file.readline()[:-1]  # read even when not wanted: the next window starts after it
            if wanted:
                yield n, text, None

    def rewind(self) -> None:
        self.file.seek(0)

    def __enter__(self) -> _Spooled:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.file.close()


def _store_windows(store: JobStore, batch_id: str, source: _Chunks, template: dict[str, Any],
                   rows_of: Any, wait: WaitGroup | None, careful: bool) -> None:
    """Store the batch's chunks not stored yet, in one transaction, a window at a time: one look-up of
    the window's keys (none for a new batch), then its new rows through the fastest insert, in parts
    of at most :data:`_INSERT_BYTES` of payload (big DataFrame chunks)."""
    with store.inserting_chunks(batch_id, wait, careful=careful) as inserting:
        for first in range(0, source.count, CHUNK_WINDOW):
            numbers = range(first, min(first + CHUNK_WINDOW, source.count))
            stored = inserting.stored_keys([f"{batch_id}:{n}" for n in numbers])
            rows, size = [], 0
            for n, text, data in source.window(numbers, wanted=len(stored) < len(numbers)):
                key = f"{batch_id}:{n}"
                if key in stored:
                    continue
                weight = len(text) + (len(data) if data is not None else 0)
                if rows and size + weight > _INSERT_BYTES:
                    inserting.insert(rows)
                    rows, size = [], 0
                row = {**template, "id": new_job_id(), "payload": text, "job_key": key}
                if data is not None:
                    row["data"] = data
                rows.append(_with_rows(row, n, None if rows_of is None else rows_of(n)))
                size += weight
            inserting.insert(rows)


def _with_rows(row: dict[str, Any], chunk: int, rows: int | None = None) -> dict[str, Any]:
    """A chunk's row with its fair-share turn, and a DataFrame chunk's with its rows as its progress total
    (so the batch counts rows from the start)."""
    if rows is not None:
        row["progress_total"] = rows
    row["fair_offset"] = chunk  # its turn in the fair share between batches (kronix_data.limits)
    return row


def attach_chunk_data(store: JobStore, jobs: Sequence[Job]) -> None:
    """Put the Parquet bytes of claimed DataFrame chunks back in their payloads (``payload["parquet"]``, what
    ``as_frame`` reads): one read of ``<table>_data`` for the whole claimed set, outside the claim statement.
    A chunk whose bytes are missing keeps its payload as is, and fails when its task asks for the frame."""
    wanted = [job.id for job in jobs if isinstance(job.payload, dict) and job.payload.get("format") == "parquet"
              and "parquet" not in job.payload]
    if not wanted:
        return
    found = store.read_job_data(wanted, CHUNK_DATA)
    for job in jobs:
        if job.id in found:
            job.payload["parquet"] = found[job.id]


def attach_result_frame(store: JobStore, job: Job) -> None:
    """A job read back whose result is a DataFrame stored as Parquet gets the DataFrame as ``job.result``."""
    if is_frame_result(job.result):
        data = store.read_job_data([job.id], RESULT_DATA).get(job.id)
        if data is not None:
            job.result = parquet_to_frame(data, f"the DataFrame result of job {job.id!r}")


def is_frame_result(result: Any) -> bool:
    """Whether a decoded result is the marker of a DataFrame result stored in ``<table>_data``."""
    return isinstance(result, dict) and result.get(FRAME_RESULT) == "parquet"


# -- pipelines ------------------------------------------------------------------


def dependency_targets(items: Any) -> tuple[list[str], list[str]]:
    """``(job ids, batch ids)`` named by a Batch, a Job, a job id, or a list of them."""
    items = items if isinstance(items, (list, tuple, set)) else [items]
    job_ids, batch_ids = [], []
    for item in items:
        if isinstance(item, Batch):
            batch_ids.append(item.id)
        elif isinstance(item, Job):
            if item.id is None:
                raise InvalidInputError(f"job {item.name!r} to depend on has no id yet: push it first "
                                        "(or in the same push_many)")
            job_ids.append(item.id)
        elif isinstance(item, str):
            job_ids.append(item)
        else:
            raise InvalidInputError(f"a dependency must be a Batch, a Job or a job id, got {type(item).__name__}")
    return job_ids, batch_ids


def push_jobs(store: JobStore, jobs: list[Job], queue: str | None = None) -> list[dict[str, Any]]:
    """Store jobs in one transaction, each with the wait group of its ``depends_on``; returns their rows."""
    if any(job.depends_on for job in jobs if isinstance(job, Job)):
        for job in jobs:  # a job may depend on another of the same push: give each its id now
            if isinstance(job, Job) and job.id is None:
                job.id = new_job_id()
    rows = [store.row_for_push(job, queue) for job in jobs]
    waits = [WaitGroup(f"job:{rows[index]['id']}", [index], *dependency_targets(job.depends_on))
             for index, job in enumerate(jobs) if job.depends_on]
    if rows:
        store.insert_jobs(rows, waits)
    for job, row in zip(jobs, rows):
        job.id, job.queue, job.status = row["id"], row["queue"], JobStatus(row["status"])
    return rows


def results_frame(store: JobStore, rows: Sequence[tuple[str, str | None, str | None, str | None]], *,
                  on_primary: bool = False) -> pd.DataFrame:
    """Completed jobs' results ``(id, key, batch_id, result)`` as ``Batch.results()`` shows them.

    One row per job (``chunk``, ``job_id``, ``result``) in chunk order, or, when
    every result is a list of records or a dict of equal-length lists, their
    concatenation with a ``chunk`` column first.
    """
    chunk_of = _chunk_numbers(store, rows, on_primary)
    records = sorted(({"chunk": chunk_of[job_id], "job_id": job_id, "batch_id": batch_id,
                       "result": decode_json(result)} for job_id, _, batch_id, result in rows),
                     key=lambda record: (record["batch_id"] or "", record["chunk"], record["job_id"]))
    for record in records:
        del record["batch_id"]
    _read_frame_results(store, records, on_primary)
    combined = _concatenate(records)
    if combined is not None:
        return combined
    return typed_frame(records, {"chunk": "int64", "job_id": "object", "result": "object"})


def _read_frame_results(store: JobStore, records: list[dict[str, Any]], on_primary: bool) -> None:
    """Replace the markers of DataFrame results by their frames, read from ``<table>_data`` in one go."""
    framed = [record for record in records if is_frame_result(record["result"])]
    if not framed:
        return
    found = store.read_job_data([record["job_id"] for record in framed], RESULT_DATA, on_primary=on_primary)
    for record in framed:
        data = found.get(record["job_id"])
        if data is not None:
            record["result"] = parquet_to_frame(data, f"the DataFrame result of job {record['job_id']!r}")


def _chunk_numbers(store: JobStore, rows: Sequence[tuple[str, str | None, str | None, Any]],
                   on_primary: bool) -> dict[str, int]:
    """Chunk numbers from the keys ``f"{batch_id}:{n}"``; from the payload for a job pushed by hand."""
    numbers, unkeyed = {}, []
    for job_id, key, batch_id, _ in rows:
        number = chunk_number(batch_id, key) if batch_id else -1
        if number >= 0:
            numbers[job_id] = number
        else:
            unkeyed.append(job_id)
    for job_id, payload in store.read_payloads(unkeyed, on_primary=on_primary).items() if unkeyed else ():
        chunk = decode_json(payload).get("chunk") if payload and payload.startswith("{") else None
        numbers[job_id] = int(chunk) if isinstance(chunk, int) else -1
    return numbers


def parent_results_frame(store: JobStore, job_id: str) -> pd.DataFrame:
    """The results of the completed jobs a job waited for, shaped as ``Batch.results()``."""
    rows = [(row["id"], row["job_key"], row["batch_id"], row["result"])
            for row in store.read_parent_results(job_id) if row["status"] == JobStatus.COMPLETED.value]
    return results_frame(store, rows, on_primary=True)  # a job's input is never read from a standby


def queues_frame(store: JobStore) -> pd.DataFrame:
    """One row per queue with jobs or settings: whether it is paused, and its jobs by status."""
    settings = store.read_queue_settings()
    counts = store.count_jobs_by_queue_and_status()
    names = sorted(set(settings) | {queue for queue, _, _ in counts})
    now = store.database_now().timestamp() if any(row.get("rate") for row in settings.values()) else 0.0
    records = {queue: {"queue": queue, "paused": bool(settings.get(queue, {}).get("paused", False)),
                       **_limits_shown(settings.get(queue, {}), now), **dict.fromkeys(_STATUSES, 0)}
               for queue in names}
    for queue, status, jobs in counts:
        if status in _STATUSES:
            records[queue][status] += jobs
    return with_lag(typed_frame([records[queue] for queue in names], QUEUE_COLUMNS), store)


def _limits_shown(settings: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A queue's limits as ``queues()`` shows them (None: no such limit), with the jobs started in its rate
    window now (the rate in use; the concurrency in use is its ``processing`` count)."""
    rate = settings.get("rate")
    started = None
    if rate is not None:
        window = RateWindow(rate, settings["rate_per_s"], settings.get("rate_window"))
        started = rate - window.room(now)
    return {"concurrency": settings.get("concurrency"), "rate": rate, "per_s": settings.get("rate_per_s"),
            "started_in_window": started}
