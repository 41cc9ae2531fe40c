"""kronix-data itself, through its public API only: push_many, pop_many, the real Worker.

The benchmark never reaches into the driver's internals except to make
history fast (one UPDATE marking pushed jobs finished, ``--history-via sql``),
and checks the result through ``fetch_stats()`` so a schema change shows up as
an error, not as a wrong figure.  ``--history-via api`` finishes them with
``pop_many``/``complete_many``/``fail`` instead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import kronix_data
from kronix_data import DatabaseQueueDriver, Worker

from .. import jobs
from .base import BenchmarkError, Counts, System, chunks, percentile

QUEUE = "bench"
CHUNK = 10_000


@kronix_data.task(name="bench.noop", max_retries=0)
def noop(payload):
    return None


@kronix_data.task(name="bench.latency", max_retries=0)
def latency(payload):
    jobs.record_start(payload["sent"])


class KronixSystem(System):
    defaults = {"concurrency": 8}

    def __init__(self, url, namespace, options):
        super().__init__(url, namespace, options)
        if options.history_via not in ("sql", "api"):
            raise BenchmarkError(f"--history-via must be 'sql' or 'api', got {options.history_via!r}")
        self._driver: DatabaseQueueDriver | None = None

    @property
    def driver(self) -> DatabaseQueueDriver:
        if self._driver is None:
            self._driver = DatabaseQueueDriver(self.url, table=self.namespace)
        return self._driver

    def server_version(self):
        with self.driver.engine.connect() as conn:
            return ".".join(str(part) for part in conn.dialect.server_version_info or ())

    def create(self):
        self.driver.create_table()
        if self.options.limit_concurrency is not None:
            self.driver.set_limits(QUEUE, concurrency=self.options.limit_concurrency, create=True)

    def drop(self):
        self.driver.drop_table()

    def close(self):
        if self._driver is not None:
            self._driver.close()

    # -- producing ---------------------------------------------------------------

    def prepare(self, n):
        return [noop.job({"n": i}, queue=QUEUE) for i in range(n)]

    def enqueue_batch(self, prepared):
        self.driver.push_many(prepared)

    def enqueue_single(self, prepared):
        for job in prepared:
            self.driver.push(job)

    def push_latency(self, sent):
        self.driver.push(latency.job({"sent": sent}, queue=QUEUE))

    def fill(self, n):
        for chunk in chunks(n, CHUNK):
            self.driver.push_many(noop.job({"n": i}, queue=QUEUE) for i in chunk)

    def fill_history(self, total, failed):
        if self.options.history_via == "api":
            self._history_through_api(total, failed)
            return
        table, c = self.driver.table, self.driver.table.c
        to_fail = failed
        for chunk in chunks(total, CHUNK):
            ids = self.driver.push_many(noop.job({"n": i}, queue=QUEUE) for i in chunk)
            failing, ids = ids[:to_fail], ids[to_fail:]
            to_fail -= len(failing)
            with self.driver.engine.begin() as conn:
                conn.execute(table.update().where(c.id.in_(ids)).values(
                    status="completed", attempts=1, reserved_by="bench-history",
                    reserved_at=c.available_at, finished_at=c.available_at))
                if failing:
                    conn.execute(table.update().where(c.id.in_(failing)).values(
                        status="failed", attempts=1, reserved_by="bench-history", last_error="bench: a dead letter",
                        reserved_at=c.available_at, finished_at=c.available_at))

    def _history_through_api(self, total, failed):
        self.fill(total)
        to_fail = failed
        while claimed := self.driver.pop_many(1_000, QUEUE):
            failing, claimed = claimed[:to_fail], claimed[to_fail:]
            to_fail -= len(failing)
            for job in failing:
                job.last_error = "bench: a dead letter"
                self.driver.fail(job)
            self.driver.complete_many(claimed)

    def analyze(self):
        engine = self.driver.engine
        table = engine.dialect.identifier_preparer.quote(self.namespace)  # a validated namespace
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
        elif engine.dialect.name == "sqlite":
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ANALYZE {table}")
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ANALYZE TABLE {table}")

    # -- consuming ---------------------------------------------------------------

    def work(self, gate: Callable[[], None], burst: bool) -> int:
        driver = DatabaseQueueDriver(self.url, table=self.namespace)
        driver.size(QUEUE)  # opens the pooled connection before the clock starts
        gate()
        stats = Worker(driver, queues=[QUEUE], concurrency=self.options.concurrency, burst=burst).run()
        driver.close()
        return stats.completed

    # -- reading -----------------------------------------------------------------

    def counts(self):
        stats = self.driver.fetch_stats()
        rows = stats[stats["queue"] == QUEUE]
        total = {status: int(rows[status].sum()) for status in ("pending", "processing", "completed", "failed")}
        return Counts(pending=total["pending"], running=total["processing"], done=total["completed"],
                      failed=total["failed"])

    def probes(self) -> dict[str, Any]:
        """Claim latency: the oldest job claimed alone, then given back (``unclaim``), K times."""
        timings = []
        for _ in range(self.options.claim_probes):
            started = time.perf_counter()
            claimed = self.driver.pop_many(1, QUEUE)
            timings.append(time.perf_counter() - started)
            if len(claimed) != 1 or self.driver.unclaim(claimed) != 1:
                raise BenchmarkError("claim probe: expected to claim and give back one job")
        if not timings:
            return {}
        return {"claim_p50_ms": round(statistics.median(timings) * 1000, 3),
                "claim_p95_ms": round(percentile(timings, 95) * 1000, 3)}

    def time_stats(self, repeat: int) -> dict[str, Any]:
        """Median milliseconds of fetch_stats() and dead_letter_jobs(), and what they returned."""
        stats_times, dead_times = [], []
        for _ in range(repeat):
            started = time.perf_counter()
            stats = self.driver.fetch_stats()
            stats_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            dead = self.driver.dead_letter_jobs()
            dead_times.append(time.perf_counter() - started)
        return {"fetch_stats_ms": round(statistics.median(stats_times) * 1000, 2),
                "dead_letter_jobs_ms": round(statistics.median(dead_times) * 1000, 2),
                "completed": int(stats["completed"].sum()), "dead_letters": len(dead)}


class KronixSQLite(KronixSystem):
    name = "kronix-sqlite"


class KronixPostgreSQL(KronixSystem):
    name = "kronix-postgresql"


class KronixMariaDB(KronixSystem):
    name = "kronix-mariadb"
