"""pgqueuer, used as its documentation and its own benchmark use it for throughput.

A ``QueueManager`` per worker process over one asyncpg connection (or psycopg's
async driver with ``--driver psycopg``), async no-op entrypoints, ``batch_size``
jobs per dequeue, ``QueueExecutionMode.drain`` to stop when the queue is empty,
and uvloop as pgqueuer's command line uses.  Every object pgqueuer installs is
namespaced by ``PGQUEUER_PREFIX`` (its own setting), NOTIFY channel included.
pgqueuer is imported only here, so the other systems run without it.
"""

from __future__ import annotations

import json
import os
import signal

import pgqueuer  # noqa: F401 - a missing package fails here, when the system is loaded
import uvloop

from .. import jobs
from .base import BenchmarkError, Counts, System, chunks, libpq_url

NOOP, LATENCY = "bench.noop", "bench.latency"


class PgQueuerSystem(System):
    name = "pgqueuer"
    defaults = {"batch_size": 10, "driver": "asyncpg"}

    def __init__(self, url, namespace, options):
        super().__init__(url, namespace, options)
        if options.driver not in ("asyncpg", "psycopg"):
            raise BenchmarkError(f"--driver must be 'asyncpg' or 'psycopg' for pgqueuer, got {options.driver!r}")
        self.prefix = f"{namespace}_"
        # pgqueuer reads its object names from the environment once; spawned workers inherit it.
        os.environ["PGQUEUER_PREFIX"] = self.prefix
        from pgqueuer.domain.settings import db_settings

        db_settings.cache_clear()
        self._loop = uvloop.new_event_loop()
        self._queries = None
        self._close = None

    def _run(self, coroutine):
        return self._loop.run_until_complete(coroutine)

    async def _connect(self):
        """pgqueuer Queries over a new connection, and how to close that connection."""
        from pgqueuer import AsyncpgDriver, PsycopgDriver, Queries

        if self.options.driver == "asyncpg":
            import asyncpg

            connection = await asyncpg.connect(libpq_url(self.url))
            return Queries(AsyncpgDriver(connection)), connection.close
        import psycopg

        connection = await psycopg.AsyncConnection.connect(libpq_url(self.url), autocommit=True)
        return Queries(PsycopgDriver(connection)), connection.close

    @property
    def queries(self):
        if self._queries is None:
            self._queries, self._close = self._run(self._connect())
        return self._queries

    def _sql(self, statement: str, *args):
        """Rows of a query; ``{p}`` is the prefix (our validated namespace), values are bound."""
        return self._run(self.queries.driver.fetch(statement.format(p=self.prefix), *args))

    def _execute(self, statement: str, *args) -> None:
        self._run(self.queries.driver.execute(statement.format(p=self.prefix), *args))

    def server_version(self):
        return self._sql("SHOW server_version")[0]["server_version"].split()[0]

    def create(self):
        self._run(self.queries.install())

    def drop(self):
        self._run(self.queries.uninstall())

    def close(self):
        if self._close is not None:
            self._run(self._close())
        self._loop.close()

    # -- producing ---------------------------------------------------------------

    def prepare(self, n):
        return [NOOP] * n, [json.dumps({"n": i}).encode() for i in range(n)], [0] * n

    def enqueue_batch(self, prepared):
        self._run(self.queries.enqueue(*prepared))

    def enqueue_single(self, prepared):
        async def one_by_one():
            for entrypoint, payload, priority in zip(*prepared):
                await self.queries.enqueue(entrypoint, payload, priority)

        self._run(one_by_one())

    def push_latency(self, sent):
        self._run(self.queries.enqueue(LATENCY, json.dumps({"sent": sent}).encode()))

    def fill(self, n):
        for chunk in chunks(n, 10_000):
            entrypoints, payloads, priorities = self.prepare(len(chunk))
            self._run(self.queries.enqueue(entrypoints, payloads, priorities))

    def fill_history(self, total, failed):
        # pgqueuer deletes a finished job from its queue table and keeps its history
        # in the log table: a 'queued' and a final row per job, already aggregated.
        self._execute(
            "INSERT INTO {p}pgqueuer_log (created, job_id, status, priority, entrypoint, aggregated) "
            "SELECT now() - interval '1 day', -g, s.status::{p}pgqueuer_status, 0, $1, true "
            "FROM generate_series(1, $2::bigint) AS g, "
            "LATERAL (VALUES ('queued'), (CASE WHEN g <= $3 THEN 'exception' ELSE 'successful' END)) AS s(status)",
            NOOP, total, failed)

    def analyze(self):
        for table in ("pgqueuer", "pgqueuer_log"):
            self._execute(f"VACUUM ANALYZE {{p}}{table}")

    # -- consuming ---------------------------------------------------------------

    def work(self, gate, burst):
        return uvloop.run(self._work(gate, burst))

    async def _work(self, gate, burst):
        import asyncio

        from pgqueuer import QueueManager
        from pgqueuer.types import QueueExecutionMode

        queries, close = await self._connect()
        manager = QueueManager(queries)
        finished = 0

        @manager.entrypoint(NOOP)
        async def noop(job):
            nonlocal finished
            json.loads(job.payload)
            finished += 1

        @manager.entrypoint(LATENCY)
        async def latency(job):
            nonlocal finished
            jobs.record_start(json.loads(job.payload)["sent"])
            finished += 1

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, manager.shutdown.set)
        gate()
        mode = QueueExecutionMode.drain if burst else QueueExecutionMode.continuous
        await manager.run(batch_size=self.options.batch_size, mode=mode)
        await close()
        return finished

    # -- reading -----------------------------------------------------------------

    def counts(self):
        queue = {row["status"]: row["count"] for row in self._sql(
            "SELECT status::text AS status, count(*) AS count FROM {p}pgqueuer GROUP BY status")}
        log = {row["status"]: row["count"] for row in self._sql(
            "SELECT status::text AS status, count(*) AS count FROM {p}pgqueuer_log GROUP BY status")}
        return Counts(pending=queue.get("queued", 0), running=queue.get("picked", 0),
                      done=log.get("successful", 0), failed=log.get("exception", 0) + queue.get("failed", 0))
