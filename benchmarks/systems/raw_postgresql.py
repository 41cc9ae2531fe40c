"""The plain-SQL ceiling on PostgreSQL: psycopg 3, no library in between.

Enqueue by COPY or executemany; drain by "claim 100, then complete 100" (two
commits per batch) with a partial index holding only pending rows in claim
order, so a claim reads the head of the queue however long the history is.
"""

from __future__ import annotations

import json
import os
import socket
import time

import psycopg
from psycopg import sql

from .base import BenchmarkError, Counts, System, libpq_url

QUEUE = "bench"


class RawPostgreSQL(System):
    name = "raw-postgresql"
    defaults = {"batch_size": 100, "method": "copy"}

    def __init__(self, url, namespace, options):
        super().__init__(url, namespace, options)
        if options.method not in ("copy", "executemany"):
            raise BenchmarkError(f"--method must be 'copy' or 'executemany' for {self.name}, got {options.method!r}")
        self.table = sql.Identifier(namespace)
        self._conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        """The producer's connection (autocommit: each statement outside a block is its own transaction)."""
        if self._conn is None:
            self._conn = psycopg.connect(libpq_url(self.url), autocommit=True)
        return self._conn

    def _sql(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(table=self.table, index=sql.Identifier(f"{self.namespace}_pending"))

    def server_version(self):
        return self.conn.execute("SHOW server_version").fetchone()[0].split()[0]

    def create(self):
        with self.conn.transaction():
            self.conn.execute(self._sql(
                "CREATE TABLE {table} (id bigserial PRIMARY KEY, queue text NOT NULL, "
                "status text NOT NULL DEFAULT 'pending', payload text NOT NULL, "
                "attempts integer NOT NULL DEFAULT 0, available_at timestamptz NOT NULL DEFAULT now(), "
                "locked_by text, locked_at timestamptz, finished_at timestamptz)"))
            self.conn.execute(self._sql(
                "CREATE INDEX {index} ON {table} (queue, available_at, id) WHERE status = 'pending'"))

    def drop(self):
        self.conn.execute(self._sql("DROP TABLE IF EXISTS {table}"))

    def close(self):
        if self._conn is not None:
            self._conn.close()

    # -- producing ---------------------------------------------------------------

    def prepare(self, n):
        return [(QUEUE, json.dumps({"n": i})) for i in range(n)]

    def enqueue_batch(self, prepared):
        with self.conn.transaction(), self.conn.cursor() as cursor:
            if self.options.method == "copy":
                with cursor.copy(self._sql("COPY {table} (queue, payload) FROM STDIN")) as copy:
                    for row in prepared:
                        copy.write_row(row)
            else:
                cursor.executemany(self._sql("INSERT INTO {table} (queue, payload) VALUES (%s, %s)"), prepared)

    def enqueue_single(self, prepared):
        insert = self._sql("INSERT INTO {table} (queue, payload) VALUES (%s, %s)")
        with self.conn.cursor() as cursor:
            for row in prepared:
                cursor.execute(insert, row)

    def fill(self, n):
        with self.conn.transaction(), self.conn.cursor() as cursor:
            with cursor.copy(self._sql("COPY {table} (queue, payload) FROM STDIN")) as copy:
                for row in self.prepare(n):
                    copy.write_row(row)

    def fill_history(self, total, failed):
        self.conn.execute(self._sql(
            "INSERT INTO {table} (queue, status, payload, attempts, available_at, locked_by, locked_at, finished_at) "
            "SELECT %(queue)s, CASE WHEN g <= %(failed)s THEN 'failed' ELSE 'done' END, "
            "'{{\"n\": ' || g || '}}', 1, now() - interval '1 day', 'bench-history', "
            "now() - interval '1 day', now() - interval '1 day' FROM generate_series(1, %(total)s) AS g"),
            {"queue": QUEUE, "failed": failed, "total": total})

    def analyze(self):
        self.conn.execute(self._sql("VACUUM ANALYZE {table}"))

    # -- consuming ---------------------------------------------------------------

    def work(self, gate, burst):
        me = f"{socket.gethostname()}:{os.getpid()}"
        claim = self._sql(
            "WITH candidates AS (SELECT id FROM {table} WHERE queue = %(queue)s AND status = 'pending' "
            "AND available_at <= now() ORDER BY available_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
            "UPDATE {table} AS jobs SET status = 'running', locked_by = %(me)s, locked_at = now(), "
            "attempts = jobs.attempts + 1 FROM candidates WHERE jobs.id = candidates.id "
            "RETURNING jobs.id, jobs.payload")
        complete = self._sql("UPDATE {table} SET status = 'done', finished_at = now() "
                             "WHERE id = ANY(%(ids)s) AND locked_by = %(me)s")
        params = {"queue": QUEUE, "limit": self.options.batch_size, "me": me}
        done = 0
        with psycopg.connect(libpq_url(self.url), autocommit=True) as conn, conn.cursor() as cursor:
            gate()
            while True:
                with conn.transaction():
                    rows = cursor.execute(claim, params).fetchall()
                if not rows:
                    if burst:
                        return done
                    time.sleep(0.05)
                    continue
                for _id, payload in rows:
                    json.loads(payload)  # the job: decode its payload, do nothing
                with conn.transaction():
                    cursor.execute(complete, {"ids": [row[0] for row in rows], "me": me})
                done += len(rows)

    # -- reading -----------------------------------------------------------------

    def counts(self):
        rows = self.conn.execute(self._sql("SELECT status, count(*) FROM {table} GROUP BY status")).fetchall()
        return Counts(**dict(rows))  # the statuses are Counts' field names
