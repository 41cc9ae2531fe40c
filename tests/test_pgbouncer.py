"""Workers through a real PgBouncer in transaction pooling, on a PostgreSQL with fewer connections than
workers: every job completed once, no prepared-statement errors, and LISTEN off (workers poll).

The server is private (``max_connections=30``) and PgBouncer is Debian's ``pgbouncer``, started by the
test on a free port with a pool of 10 server connections for 40 worker processes.  The URL says
``?kronix_pgbouncer=transaction``: that is how kronix knows (PgBouncer is not visible from a
connection), and it turns psycopg's prepared statements off and LISTEN off.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import sqlalchemy as sa

from helpers import (TESTS, attempts_histogram, cli_environment, pgbouncer_in_front_of, private_postgres, select,
                     status_counts, unique_table, wait_until)
from kronix_data import DatabaseQueueDriver, InvalidInputError, Job

WORKERS, JOBS, POOL = 40, 2000, 10


def server_sessions(url: str) -> int:
    """Client sessions on the server itself (PgBouncer's server connections), not counting this one."""
    return select(url, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                       "AND datname = 'test' AND pid <> pg_backend_pid()")[0][0]


def test_forty_workers_through_pgbouncer_complete_every_job_once_on_a_server_of_30_connections(tmp_path):
    with private_postgres({"max_connections": "30"}) as server, \
            pgbouncer_in_front_of(server, pool_mode="transaction", pool_size=POOL) as bouncer:
        assert int(select(server.url, "SHOW max_connections")[0][0]) < WORKERS
        url = f"{bouncer.url}?kronix_pgbouncer=transaction"
        table = unique_table()
        driver = DatabaseQueueDriver(url, table=table)
        driver.create_table()
        command = [sys.executable, "-m", "kronix_data.cli", "--db", url, "--table", table, "-v", "worker",
                   "-m", "worker_jobs", "-c", "2"]
        logs = [tmp_path / f"worker-{n}.log" for n in range(WORKERS)]
        workers = []
        peak = 0
        try:
            for log in logs:
                with open(log, "w") as output:
                    workers.append(subprocess.Popen(command, cwd=TESTS, env=cli_environment(), stdout=output,
                                                    stderr=subprocess.STDOUT))
            wait_until(lambda: (driver.workers()["state"] == "live").sum() == WORKERS, 300,
                       f"{WORKERS} workers to register through PgBouncer", interval=0.5)
            driver.push_many([Job("test.noop", n) for n in range(JOBS)])

            def all_done() -> bool:
                nonlocal peak
                peak = max(peak, server_sessions(server.url))
                return status_counts(driver)["completed"] == JOBS

            wait_until(all_done, 300, "every job to complete", interval=0.2)
            assert all(worker.poll() is None for worker in workers)  # nobody gave up
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                worker.wait(timeout=120)

        assert [worker.returncode for worker in workers] == [0] * WORKERS
        assert status_counts(driver) == {"pending": 0, "processing": 0, "completed": JOBS, "failed": 0}
        assert attempts_histogram(driver) == {1: JOBS}  # none lost, none claimed twice
        with driver.engine.connect() as conn:
            doers = conn.execute(sa.select(sa.func.count(sa.distinct(driver.table.c.reserved_by)))).scalar_one()
        assert doers > 1
        assert 0 < peak <= POOL  # the server saw PgBouncer's pool, never the 40 workers
        outputs = [log.read_text() for log in logs]
        for output in outputs:
            assert "LISTEN is off: the database is reached through PgBouncer in transaction pooling mode" in output
            assert "prepared statement" not in output and "database error" not in output, output[-2000:]
        driver.drop_table()
        driver.close()


def test_the_pgbouncer_option_is_checked_and_taken_out_before_psycopg_sees_the_url():
    with pytest.raises(InvalidInputError, match="kronix_pgbouncer must be one of session, transaction, statement"):
        DatabaseQueueDriver("postgresql://postgres@127.0.0.1:5432/test?kronix_pgbouncer=yes")


@pytest.mark.parametrize("backend", ["postgresql"])
def test_transaction_pooling_turns_prepared_statements_and_listen_off_and_session_pooling_neither(db_url):
    """On the shared server directly (the option only changes what kronix asks of the connection)."""
    def options(mode: str) -> tuple:
        with DatabaseQueueDriver(f"{db_url}?kronix_pgbouncer={mode}", table=unique_table()) as driver:
            with driver.engine.connect() as conn:
                threshold = conn.connection.driver_connection.prepare_threshold
            listener = driver.store.listener()
            if listener is not None:
                listener.close()
            # The URL handed to worker processes keeps the option.
            return threshold, listener is not None, "kronix_pgbouncer=" in driver.store.url_with_password

    assert options("transaction") == (None, False, True)
    assert options("statement") == (None, False, True)
    assert options("session") == (5, True, True)  # psycopg's default; LISTEN works in session pooling
