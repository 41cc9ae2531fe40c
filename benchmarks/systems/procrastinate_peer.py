"""procrastinate, used as its documentation recommends: an App over a PsycopgConnector.

Async no-op tasks, one worker per process with ``concurrency`` jobs in flight
(``wait=False`` stops it once the queue is caught up), ``batch_defer_async``
for batch enqueue.  Each run installs procrastinate's schema in a PostgreSQL
schema of its own (through ``search_path``) and uses its namespace as the queue
name, so runs never see each other's jobs or notifications.  procrastinate is
imported only here, so the other systems run without it.
"""

from __future__ import annotations

import asyncio

import procrastinate
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .. import jobs
from .base import Counts, System, chunks, libpq_url

NOOP, LATENCY = "bench.noop", "bench.latency"
_STATES = {"todo": "pending", "doing": "running", "succeeded": "done", "failed": "failed"}


class ProcrastinateSystem(System):
    name = "procrastinate"
    defaults = {"concurrency": 10}

    def __init__(self, url, namespace, options):
        super().__init__(url, namespace, options)
        self.queue = namespace
        self.conninfo = make_conninfo(libpq_url(url), options=f"-c search_path={namespace}")
        self._admin: psycopg.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._app = None
        self.finished = 0

    @property
    def admin(self) -> psycopg.Connection:
        """A plain autocommit connection in the run's schema, for set-up and counting."""
        if self._admin is None:
            self._admin = psycopg.connect(self.conninfo, autocommit=True)
        return self._admin

    def make_app(self):
        # The pool serves every job's finish query: as many connections as jobs in flight.
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.conninfo, max_size=self.options.concurrency + 2))

        @app.task(name=NOOP, queue=self.queue)
        async def noop(n):
            self.finished += 1

        @app.task(name=LATENCY, queue=self.queue)
        async def latency(sent):
            jobs.record_start(sent)
            self.finished += 1

        return app, noop, latency

    def _run(self, coroutine):
        """Run on the producer's loop, with the App's pool opened on first use."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._app, self._noop, self._latency = self.make_app()
            self._loop.run_until_complete(self._app.open_async())
        return self._loop.run_until_complete(coroutine)

    def server_version(self):
        return self.admin.execute("SHOW server_version").fetchone()[0].split()[0]

    def create(self):
        self.admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.namespace)))
        self._run(self._app_schema())

    async def _app_schema(self):
        await self._app.schema_manager.apply_schema_async()

    def drop(self):
        self.admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.namespace)))

    def close(self):
        if self._loop is not None:
            self._loop.run_until_complete(self._app.close_async())
            self._loop.close()
        if self._admin is not None:
            self._admin.close()

    # -- producing ---------------------------------------------------------------

    def prepare(self, n):
        self._run(asyncio.sleep(0))  # opens the pool before the clock starts
        return [{"n": i} for i in range(n)]

    def enqueue_batch(self, prepared):
        self._run(self._noop.batch_defer_async(*prepared))

    def enqueue_single(self, prepared):
        async def one_by_one():
            for kwargs in prepared:
                await self._noop.defer_async(**kwargs)

        self._run(one_by_one())

    def push_latency(self, sent):
        self._run(self._latency.defer_async(sent=sent))

    def fill(self, n):
        for chunk in chunks(n, 10_000):
            self._run(self._noop.batch_defer_async(*({"n": i} for i in chunk)))

    def fill_history(self, total, failed):
        # Finished jobs stay in procrastinate_jobs (its default, delete_jobs="never").
        self.admin.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts) "
            "SELECT %s, %s, jsonb_build_object('n', g), "
            "(CASE WHEN g <= %s THEN 'failed' ELSE 'succeeded' END)::procrastinate_job_status, 1 "
            "FROM generate_series(1, %s) AS g", (self.queue, NOOP, failed, total))

    def analyze(self):
        self.admin.execute("VACUUM ANALYZE procrastinate_jobs")

    # -- consuming ---------------------------------------------------------------

    def work(self, gate, burst):
        return asyncio.run(self._work(gate, burst))

    async def _work(self, gate, burst):
        app, _, _ = self.make_app()
        async with app.open_async():
            await app.check_connection_async()  # the pool is connected before the clock starts
            gate()
            await app.run_worker_async(queues=[self.queue], concurrency=self.options.concurrency,
                                       wait=not burst, install_signal_handlers=True)
        return self.finished

    # -- reading -----------------------------------------------------------------

    def counts(self):
        rows = self.admin.execute("SELECT status::text, count(*) FROM procrastinate_jobs "
                                  "WHERE queue_name = %s GROUP BY status", (self.queue,)).fetchall()
        return Counts(**{_STATES[status]: count for status, count in rows})
