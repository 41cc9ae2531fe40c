"""What every system under test provides, and the URL and naming helpers they share.

A system is one queue implementation on one database, inside one namespace (a
table, a schema or a name prefix) that the run creates fresh and drops after.
Scenarios only call these methods, so every system is timed the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import sqlalchemy as sa

_NAMESPACE = re.compile(r"[a-z_][a-z0-9_]{0,39}")


class BenchmarkError(Exception):
    """A run that cannot go on or whose result cannot be trusted; the message says why."""


@dataclass
class Options:
    """Tuning knobs; None means the system's own default (see each system's ``defaults``)."""

    concurrency: int | None = None   # jobs in flight per worker process (kronix Worker, procrastinate)
    batch_size: int | None = None    # jobs claimed per query (pgqueuer, the raw loops)
    method: str | None = None        # raw-postgresql batch enqueue: "copy" or "executemany"
    driver: str | None = None        # pgqueuer's database driver: "asyncpg" or "psycopg"
    history_via: str = "sql"         # kronix: finish history jobs by one UPDATE ("sql") or the API ("api")
    claim_probes: int = 50           # kronix drain: single claims timed before the drain (0: none)
    limit_concurrency: int | None = None  # kronix: driver.set_limits(queue, concurrency=N) first (None: unlimited)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Counts:
    """The jobs of a run's queue by state, read from the database."""

    pending: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0


class System:
    """One queue implementation on one database, in the namespace ``namespace``."""

    name: ClassVar[str]  # as in the registry (benchmarks/systems/__init__.py), which also says its scenarios
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, url: str, namespace: str, options: Options):
        self.url = url
        self.namespace = check_namespace(namespace)
        self.options = options
        for key, value in self.defaults.items():
            if getattr(options, key) is None:
                setattr(options, key, value)

    def settings(self) -> dict[str, Any]:
        """The knobs that shaped this run, for the JSON line."""
        return {key: getattr(self.options, key) for key in self.defaults}

    # -- set-up and tear-down (untimed) ----------------------------------------

    def server_version(self) -> str:
        raise NotImplementedError

    def create(self) -> None:
        """Create the run's table/schema, empty."""
        raise NotImplementedError

    def drop(self) -> None:
        """Drop everything ``create`` made."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the producer's connections."""

    def fill(self, n: int) -> None:
        """Store ``n`` pending no-op jobs, as fast as the system allows."""
        raise NotImplementedError

    def fill_history(self, total: int, failed: int) -> None:
        """Store ``total`` finished jobs, ``failed`` of them dead letters."""
        raise NotImplementedError

    def analyze(self) -> None:
        """Refresh the planner's statistics, as autovacuum would have by now in a live queue."""

    # -- timed operations ------------------------------------------------------

    def prepare(self, n: int) -> Any:
        """Whatever ``enqueue_*`` takes for ``n`` no-op jobs, built before the clock starts."""
        return list(range(n))

    def enqueue_batch(self, prepared: Any) -> None:
        """Store the prepared jobs with one call (one transaction)."""
        raise NotImplementedError

    def enqueue_single(self, prepared: Any) -> None:
        """Store the prepared jobs one call (one transaction) each."""
        raise NotImplementedError

    def push_latency(self, sent: float) -> None:
        """Push one latency job carrying ``sent``, in its own transaction."""
        raise NotImplementedError

    def work(self, gate: Callable[[], None], burst: bool) -> int:
        """Run one worker in this (spawned) process; returns how many jobs it finished.

        Connect first, then call ``gate()`` (it returns at the common start);
        with ``burst`` stop once the queue is empty, else run until SIGTERM.
        """
        raise NotImplementedError

    # -- reading ---------------------------------------------------------------

    def counts(self) -> Counts:
        raise NotImplementedError

    def probes(self) -> dict[str, Any]:
        """Extra figures measured on the filled queue before a drain (nothing by default)."""
        return {}


def check_namespace(name: str) -> str:
    if not isinstance(name, str) or not _NAMESPACE.fullmatch(name):
        raise BenchmarkError(f"invalid --name {name!r}: use 1 to 40 lowercase letters, digits and "
                             "underscores, not starting with a digit")
    return name


def libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as libpq (psycopg, asyncpg) takes it."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sqlite_path(url: str) -> str:
    path = sa.make_url(url).database
    if not path or path == ":memory:":
        raise BenchmarkError(f"a SQLite benchmark needs a file, got {url!r}")
    return path


def pymysql_args(url: str) -> dict[str, Any]:
    parsed = sa.make_url(url)
    args = {"host": parsed.host or "127.0.0.1", "port": parsed.port or 3306, "user": parsed.username or "root",
            "password": parsed.password or "", "database": parsed.database, "charset": "utf8mb4"}
    return args


def chunks(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
