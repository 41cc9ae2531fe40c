"""The plain-SQL ceiling on MariaDB: PyMySQL, InnoDB, READ COMMITTED, SKIP LOCKED.

MariaDB has no partial index and no UPDATE ... RETURNING, so a claim locks
100 rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` and marks them in the same
transaction; completing 100 is a second transaction.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pymysql

from .base import Counts, System, chunks, pymysql_args

QUEUE = "bench"


class RawMariaDB(System):
    name = "raw-mariadb"
    defaults = {"batch_size": 100}

    def __init__(self, url, namespace, options):
        super().__init__(url, namespace, options)
        self.table = f"`{namespace}`"  # a validated namespace: letters, digits, underscores
        self._conn = None

    def _connect(self):
        conn = pymysql.connect(**pymysql_args(self.url), autocommit=False)
        with conn.cursor() as cursor:
            # REPEATABLE READ's gap locks make concurrent claimers deadlock; READ COMMITTED does not.
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        return conn

    @property
    def conn(self):
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _execute(self, statement, params=None, many=False):
        with self.conn.cursor() as cursor:
            (cursor.executemany if many else cursor.execute)(statement, params)
            rows = cursor.fetchall()
        self.conn.commit()
        return rows

    def server_version(self):
        return self._execute("SELECT VERSION()")[0][0].split("-")[0]

    def create(self):
        self._execute(
            f"CREATE TABLE {self.table} (id BIGINT AUTO_INCREMENT PRIMARY KEY, queue VARCHAR(128) NOT NULL, "
            "status VARCHAR(16) NOT NULL DEFAULT 'pending', payload LONGTEXT NOT NULL, "
            "attempts INT NOT NULL DEFAULT 0, available_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), "
            "locked_by VARCHAR(255), locked_at DATETIME(6), finished_at DATETIME(6), "
            "KEY claim (queue, status, available_at, id)) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4")

    def drop(self):
        self._execute(f"DROP TABLE IF EXISTS {self.table}")

    def close(self):
        if self._conn is not None:
            self._conn.close()

    def prepare(self, n):
        return [(QUEUE, json.dumps({"n": i})) for i in range(n)]

    def enqueue_batch(self, prepared):
        # PyMySQL turns executemany of one INSERT into multi-row INSERTs.
        self._execute(f"INSERT INTO {self.table} (queue, payload) VALUES (%s, %s)", prepared, many=True)

    def enqueue_single(self, prepared):
        insert = f"INSERT INTO {self.table} (queue, payload) VALUES (%s, %s)"
        with self.conn.cursor() as cursor:
            for row in prepared:
                cursor.execute(insert, row)
                self.conn.commit()

    def fill(self, n):
        self.enqueue_batch(self.prepare(n))

    def fill_history(self, total, failed):
        insert = (f"INSERT INTO {self.table} (queue, status, payload, attempts, available_at, locked_by, locked_at, "
                  "finished_at) VALUES (%s, %s, %s, 1, NOW(6) - INTERVAL 1 DAY, 'bench-history', "
                  "NOW(6) - INTERVAL 1 DAY, NOW(6) - INTERVAL 1 DAY)")
        for chunk in chunks(total, 50_000):
            self._execute(insert, [(QUEUE, "failed" if i < failed else "done", json.dumps({"n": i}))
                                   for i in chunk], many=True)

    def analyze(self):
        self._execute(f"ANALYZE TABLE {self.table}")

    def work(self, gate, burst):
        me = f"{socket.gethostname()}:{os.getpid()}"
        select = (f"SELECT id, payload FROM {self.table} WHERE queue = %s AND status = 'pending' "
                  "AND available_at <= NOW(6) ORDER BY available_at, id LIMIT %s FOR UPDATE SKIP LOCKED")
        mark = (f"UPDATE {self.table} SET status = 'running', locked_by = %s, locked_at = NOW(6), "
                "attempts = attempts + 1 WHERE id IN %s")
        complete = f"UPDATE {self.table} SET status = 'done', finished_at = NOW(6) WHERE id IN %s AND locked_by = %s"
        conn = self._connect()
        done = 0
        gate()
        try:
            with conn.cursor() as cursor:
                while True:
                    cursor.execute(select, (QUEUE, self.options.batch_size))
                    rows = cursor.fetchall()
                    if not rows:
                        conn.commit()
                        if burst:
                            return done
                        time.sleep(0.05)
                        continue
                    ids = [row[0] for row in rows]
                    cursor.execute(mark, (me, ids))
                    conn.commit()
                    for _id, payload in rows:
                        json.loads(payload)  # the job: decode its payload, do nothing
                    cursor.execute(complete, (ids, me))
                    conn.commit()
                    done += len(rows)
        finally:
            conn.close()

    def counts(self):
        rows = self._execute(f"SELECT status, count(*) FROM {self.table} GROUP BY status")
        return Counts(**dict(rows))  # the statuses are Counts' field names
