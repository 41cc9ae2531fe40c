"""The job model: plain data that never touches the database.

A :class:`Job` is what a caller pushes and what ``pop`` hands back.  Subclasses
may define :meth:`Job.handle`; the driver rebuilds them from a stored row
through a factory registered by name.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from .errors import InvalidInputError
from .resources import checked_resources

#: Longest accepted job name, queue name and job id (they are indexed columns).
MAX_NAME_LENGTH = 255
MAX_QUEUE_LENGTH = 128
MAX_ID_LENGTH = 128
#: Longest idempotency key and batch id (indexed columns too).
MAX_KEY_LENGTH = 255
MAX_BATCH_ID_LENGTH = 128
#: Largest payload or result, in bytes of stored JSON (ASCII: non-ASCII is escaped).
#: MariaDB's default ``max_allowed_packet`` is 16 MiB and the client's escaping
#: can double a text in the statement; past that the server drops the
#: connection ("server has gone away") and a worker would retry the write for
#: ever.  Put bulk data in files or tables and pass a reference.
MAX_JSON_BYTES = 8_000_000


#: The range of ``Job.priority``: higher runs first, 0 by default.
MIN_PRIORITY, MAX_PRIORITY = -100, 100


class JobStatus(str, enum.Enum):
    """Where a job is in its life; stored as this text in the ``status`` column.

    ``waiting``: some job it depends on has not completed yet; ``pending``: due
    (now or at ``available_at``); ``processing``: held by a worker; then one of
    the final three: ``completed``, ``failed`` (a dead letter) or ``cancelled``.
    """

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    WAITING = "waiting"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        """Whether the job will not run again by itself (completed, dead-lettered or cancelled)."""
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: when to run a failed job again.

    The retry after attempt ``n`` waits ``delay * backoff ** (n - 1)`` seconds,
    capped at ``max_delay``, times a random factor in ``1 ± jitter`` so that
    jobs failing together do not retry together.
    """

    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.25

    def __post_init__(self):
        if self.delay < 0 or self.backoff < 1 or self.max_delay < 0 or not 0 <= self.jitter <= 1:
            raise InvalidInputError(f"invalid {self!r}: need delay >= 0, backoff >= 1, max_delay >= 0, 0 <= jitter <= 1")

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait before running again after failed attempt ``attempt`` (1-based)."""
        try:
            base = min(self.max_delay, self.delay * self.backoff ** max(attempt - 1, 0))
        except OverflowError:  # thousands of attempts: long past the cap anyway
            base = self.max_delay
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(eq=False)
class Job:
    """One unit of work: a registered ``name`` and a JSON ``payload``.

    ``max_retries`` counts retries after the first run, so a job runs at most
    ``max_retries + 1`` times.  A ``key`` makes the push idempotent: a job whose
    key is already in the table (queued, running, done or dead-lettered) is
    not pushed again.  ``batch_id`` groups the chunks of one :class:`Batch`.
    ``priority`` (from :data:`MIN_PRIORITY` to :data:`MAX_PRIORITY`): due jobs
    of a queue are claimed highest first.  ``depends_on``: job ids, Jobs or
    Batches that must all complete before this job becomes due (it waits
    meanwhile).  ``requires``: resources a worker must have to claim it
    (``{"gpu": 1}``, ``{"mem": "64G"}``; see :mod:`kronix_data.resources`).  The fields after ``id`` are filled in by the driver from the
    stored row; callers normally leave them alone.
    """

    name: str
    payload: Any = None
    queue: str = field(default="default", kw_only=True)
    max_retries: int = field(default=3, kw_only=True)
    available_at: datetime | None = field(default=None, kw_only=True)
    key: str | None = field(default=None, kw_only=True)
    batch_id: str | None = field(default=None, kw_only=True)
    priority: int = field(default=0, kw_only=True)
    depends_on: list[Any] = field(default_factory=list, kw_only=True, repr=False)
    requires: dict[str, float] | None = field(default=None, kw_only=True)
    id: str | None = field(default=None, kw_only=True)
    attempts: int = field(default=0, kw_only=True)
    status: JobStatus = field(default=JobStatus.PENDING, kw_only=True)
    last_error: str | None = field(default=None, kw_only=True)
    result: Any = field(default=None, kw_only=True)
    #: The Parquet bytes of a DataFrame result (kronix_data.columnar), written beside the row on completion.
    result_data: bytes | None = field(default=None, kw_only=True, repr=False)
    created_at: datetime | None = field(default=None, kw_only=True)
    reserved_by: str | None = field(default=None, kw_only=True)
    reserved_at: datetime | None = field(default=None, kw_only=True)
    finished_at: datetime | None = field(default=None, kw_only=True)

    #: Seconds a run may take before the worker counts it as failed (None: no limit).
    timeout: ClassVar[float | None] = None
    #: When a failed run is tried again.
    retry: ClassVar[RetryPolicy] = RetryPolicy()

    def handle(self) -> Any:
        """Do the work.  Plain jobs have nothing to do; subclasses override this."""
        raise NotImplementedError(
            f"job {self.name!r} has no handle(): register a job factory or task for it"
        )

    @property
    def runnable(self) -> bool:
        """Whether this job knows how to run (a subclass with its own ``handle``)."""
        return type(self).handle is not Job.handle

    def on_failure(self, error: BaseException) -> None:
        """Called by the worker after a failed run that will be retried."""

    def on_permanent_failure(self, error: BaseException) -> None:
        """Called by the worker when a job goes to the dead letters."""


_id_counter = itertools.count()
_process_bits = ""


def _new_process_bits() -> None:
    """56 random bits per process (drawn again in a forked child), not a syscall per id."""
    global _process_bits
    _process_bits = os.urandom(7).hex()


_new_process_bits()
os.register_at_fork(after_in_child=_new_process_bits)


def new_job_id() -> str:
    """A 32-character hex id that sorts by creation time (like UUIDv7).

    48 bits of milliseconds, a 24-bit per-process counter (``next`` on a
    ``count`` is atomic under the GIL) and 56 random bits drawn once per
    process: ids made in one batch keep their order, and never collide across
    processes or machines.
    """
    millis = time.time_ns() // 1_000_000
    return f"{millis:012x}{next(_id_counter) & 0xFFFFFF:06x}{_process_bits}"


def encode_payload(job: Job) -> str:
    """Serialise a payload to strict JSON, naming the job when it cannot be."""
    return _encode(job.payload, f"payload of job {job.name!r}")


def encode_result(job: Job) -> str | None:
    """Serialise a job's return value (``None`` stays SQL NULL)."""
    return None if job.result is None else _encode(job.result, f"result of job {job.name!r}")


def encode_value(value: Any, what: str) -> str | None:
    """Serialise any value a job stores (a checkpoint, progress details) to strict JSON; ``None`` stays NULL."""
    return None if value is None else _encode(value, what)


#: Strict, compact JSON; one encoder reused (``json.dumps`` with options builds one per call).
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _encode(value: Any, what: str) -> str:
    try:
        text = _ENCODER.encode(value)
    except TypeError as error:
        raise InvalidInputError(f"{what} is not JSON-serialisable: {error}") from error
    except ValueError as error:  # NaN/Infinity or a circular reference
        raise InvalidInputError(f"{what} is not valid JSON: {error}") from error
    except RecursionError as error:
        raise InvalidInputError(f"{what} is nested too deeply to store as JSON") from error
    return checked_json_size(text, what)


def checked_json_size(text: str, what: str) -> str:
    """JSON text under the size cap (:data:`MAX_JSON_BYTES`), or a clear error naming what it is."""
    if len(text) > MAX_JSON_BYTES:
        raise InvalidInputError(f"{what} is {len(text):,} bytes of JSON, over the limit of {MAX_JSON_BYTES:,}: "
                         "store bulk data elsewhere and pass a reference")
    return text


def decode_json(text: str | None) -> Any:
    """Decode a stored JSON column (``None`` for SQL NULL)."""
    return None if text is None else json.loads(text)


def validate_job(job: Job, queue: str) -> None:
    """Reject what the database would truncate or mangle, before any SQL runs."""
    _check_text("job name", job.name, MAX_NAME_LENGTH)
    _check_text("queue name", queue, MAX_QUEUE_LENGTH)
    if job.id is not None:
        _check_text("job id", job.id, MAX_ID_LENGTH)
    if job.key is not None:
        _check_text("job key", job.key, MAX_KEY_LENGTH)
    if job.batch_id is not None:
        _check_text("batch id", job.batch_id, MAX_BATCH_ID_LENGTH)
    validate_priority(job.priority, f"priority of job {job.name!r}")
    checked_resources(job.requires, f"requires of job {job.name!r}")
    if not isinstance(job.max_retries, int) or isinstance(job.max_retries, bool) or job.max_retries < 0:
        raise InvalidInputError(f"max_retries of job {job.name!r} must be an int >= 0, got {job.max_retries!r}")
    if job.available_at is not None and (
        not isinstance(job.available_at, datetime) or job.available_at.tzinfo is None
    ):
        raise InvalidInputError(
            f"available_at of job {job.name!r} must be a timezone-aware datetime, got {job.available_at!r}"
        )


def validate_priority(priority: Any, what: str = "priority") -> None:
    """A priority is an int from MIN_PRIORITY to MAX_PRIORITY."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidInputError(f"{what} must be an int from {MIN_PRIORITY} to {MAX_PRIORITY} "
                                f"(higher runs first), got {priority!r}")


def validate_queue(queue: Any) -> None:
    """Reject a queue name no job can have (PostgreSQL cannot even compare a text holding NUL)."""
    _check_text("queue name", queue, MAX_QUEUE_LENGTH)


def possible_job_id(job_id: Any) -> bool:
    """Whether a stored job could have this id; a non-str is a caller's mistake, named."""
    if not isinstance(job_id, str):
        raise InvalidInputError(f"job id must be a str, got {type(job_id).__name__}")
    try:
        _check_text("job id", job_id, MAX_ID_LENGTH)
    except ValueError:
        return False
    return True


def _check_text(what: str, value: Any, limit: int) -> None:
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a str, got {type(value).__name__}")
    if not value or len(value) > limit:
        raise InvalidInputError(f"{what} must have 1 to {limit} characters, got {len(value)}")
    if "\x00" in value or not value.isprintable():
        raise InvalidInputError(f"{what} {value[:40]!r} contains control characters")

