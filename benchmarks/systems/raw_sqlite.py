"""The plain-SQL ceiling on SQLite: the sqlite3 module, WAL, synchronous=FULL (durable commits).

Claims run inside ``BEGIN IMMEDIATE`` (the write lock first, so two processes
never read the same pending rows), 100 at a time, then complete 100 in a
second transaction.  A partial index holds only pending rows in claim order.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time

from .base import Counts, System, sqlite_path

QUEUE = "bench"


class RawSQLite(System):
    name = "raw-sqlite"
    defaults = {"batch_size": 100}

    def __init__(self, url, namespace, options):
        super().__init__(url, namespace, options)
        self.path = sqlite_path(url)
        self.table = f'"{namespace}"'  # a validated namespace: letters, digits, underscores
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit BEGIN/COMMIT
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def server_version(self):
        return sqlite3.sqlite_version

    def create(self):
        self.conn.execute(
            f"CREATE TABLE {self.table} (id INTEGER PRIMARY KEY, queue TEXT NOT NULL, "
            "status TEXT NOT NULL DEFAULT 'pending', payload TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
            "available_at REAL NOT NULL DEFAULT (julianday('now')), locked_by TEXT, locked_at REAL, finished_at REAL)")
        self.conn.execute(f'CREATE INDEX "{self.namespace}_pending" ON {self.table} (queue, available_at, id) '
                          "WHERE status = 'pending'")

    def drop(self):
        self.conn.execute(f"DROP TABLE IF EXISTS {self.table}")

    def close(self):
        if self._conn is not None:
            self._conn.close()

    def prepare(self, n):
        return [(QUEUE, json.dumps({"n": i})) for i in range(n)]

    def enqueue_batch(self, prepared):
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany(f"INSERT INTO {self.table} (queue, payload) VALUES (?, ?)", prepared)
        self.conn.execute("COMMIT")

    def enqueue_single(self, prepared):
        insert = f"INSERT INTO {self.table} (queue, payload) VALUES (?, ?)"
        for row in prepared:
            self.conn.execute(insert, row)  # autocommit: one durable transaction each

    def fill(self, n):
        self.enqueue_batch(self.prepare(n))

    def fill_history(self, total, failed):
        rows = (("failed" if i < failed else "done", json.dumps({"n": i})) for i in range(total))
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany(
            f"INSERT INTO {self.table} (queue, status, payload, attempts, available_at, locked_by, locked_at, "
            f"finished_at) VALUES ('{QUEUE}', ?, ?, 1, julianday('now') - 1, 'bench-history', "
            "julianday('now') - 1, julianday('now') - 1)", rows)
        self.conn.execute("COMMIT")

    def analyze(self):
        self.conn.execute(f"ANALYZE {self.table}")

    def work(self, gate, burst):
        me = f"{socket.gethostname()}:{os.getpid()}"
        claim = (f"UPDATE {self.table} SET status = 'running', locked_by = ?, locked_at = julianday('now'), "
                 f"attempts = attempts + 1 WHERE id IN (SELECT id FROM {self.table} WHERE queue = ? "
                 "AND status = 'pending' AND available_at <= julianday('now') ORDER BY available_at, id LIMIT ?) "
                 "RETURNING id, payload")
        complete = (f"UPDATE {self.table} SET status = 'done', finished_at = julianday('now') "
                    "WHERE id IN (SELECT value FROM json_each(?)) AND locked_by = ?")
        conn = self._connect()
        done = 0
        gate()
        try:
            while True:
                conn.execute("BEGIN IMMEDIATE")
                rows = conn.execute(claim, (me, QUEUE, self.options.batch_size)).fetchall()
                conn.execute("COMMIT")
                if not rows:
                    if burst:
                        return done
                    time.sleep(0.05)
                    continue
                for _id, payload in rows:
                    json.loads(payload)  # the job: decode its payload, do nothing
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(complete, (json.dumps([row[0] for row in rows]), me))
                conn.execute("COMMIT")
                done += len(rows)
        finally:
            conn.close()

    def counts(self):
        rows = self.conn.execute(f"SELECT status, count(*) FROM {self.table} GROUP BY status").fetchall()
        return Counts(**dict(rows))  # the statuses are Counts' field names
