"""Beyond one PostgreSQL server: analytics read from a hot standby, and a primary failover survived.

Every test starts its own primary and synchronous hot standby (``helpers.replicated_postgres``:
``initdb``, ``pg_basebackup``, free ports, a temporary directory), never the shared server.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

import chaos_jobs
from helpers import (TESTS, audit_chaos_jobs, cli_environment, create_audit, kronix_in_parallel, replicated_postgres,
                     run_burst, select, unique_table, wait_until)
from kronix_data import DatabaseQueueDriver, Job, Worker, task
from kronix_data.monitor import QueueMonitor

STATEMENTS = {"shared_preload_libraries": "pg_stat_statements", "pg_stat_statements.track": "all"}
#: Writes, and what every connection runs for itself: not the analytics reads the test counts.
NOT_A_VIEW = ("INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP", "WITH", "BEGIN", "COMMIT", "SET", "SHOW")


@pytest.fixture(scope="module")
def pair():
    with replicated_postgres(settings=STATEMENTS) as (primary, standby):
        engine = sa.create_engine(primary.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE EXTENSION pg_stat_statements")
        engine.dispose()
        yield primary, standby


def statements_on(url: str, table: str) -> list[str]:
    """The reads of ``table`` a server ran since its statistics were last reset."""
    rows = select(url, "SELECT query FROM pg_stat_statements WHERE query LIKE :table", {"table": f"%{table}%"})
    return [query for (query,) in rows if not query.lstrip().upper().startswith(NOT_A_VIEW)]


def reset_statements(url: str) -> None:
    select(url, "SELECT pg_stat_statements_reset()")


@task(name="standby.chunk", max_retries=0)
def chunk(payload):
    if payload["chunk"] in FAILING:
        raise ValueError(f"chunk {payload['chunk']} fails until fixed")
    return [{"n": n} for n in range(payload["start"], payload["stop"])]


FAILING: set[int] = set()


def rows_replayed(standby_url: str, table: str) -> int | None:
    """How many rows ``table`` has on the standby; None until the standby has replayed its creation."""
    if select(standby_url, "SELECT to_regclass(:table)", {"table": table})[0][0] is None:
        return None
    return select(standby_url, f"SELECT count(*) FROM {table}")[0][0]


def created_on_both(primary_url: str, standby_url: str, table: str, **options) -> DatabaseQueueDriver:
    """A driver on a new table, returned once the standby has replayed the table's creation (reading
    it there before would be an error, not a stale answer)."""
    driver = DatabaseQueueDriver(primary_url, table=table, **options)
    driver.create_table()
    wait_until(lambda: rows_replayed(standby_url, table) is not None, 30, "the standby to replay the new table")
    return driver


def test_the_views_and_a_refreshing_monitor_read_the_standby_and_send_the_primary_no_query(pair):
    primary, standby = pair
    table = unique_table()
    driver = created_on_both(primary.url, standby.url, table, read_db=standby.url)
    try:
        FAILING.clear()
        FAILING.add(2)
        batch = driver.map(chunk, range(50), chunk_size=10)
        run_burst(driver)
        wait_until(lambda: batch.progress()["failed"] == 1, 30, "the standby to replay the batch")
        reset_statements(primary.url)
        reset_statements(standby.url)

        monitor = QueueMonitor(driver, refresh=0.2)
        try:
            wait_until(lambda: monitor.refresh_count >= 10, 60, "ten refreshes of the monitor")
        finally:
            monitor.close()
        views = {"fetch_stats": driver.fetch_stats(), "jobs": driver.jobs(), "dead_letter_jobs": driver.dead_letter_jobs(),
                 "batches": driver.batches(), "queues": driver.queues(), "failures": batch.failures()}
        progress = batch.progress()

        assert statements_on(primary.url, table) == []  # not one analytics read reached the primary
        assert len(statements_on(standby.url, table)) >= 5  # they all went to the standby
        assert progress["completed"] == 4 and progress["failed"] == 1 and monitor.error_count == 0
        assert all(isinstance(frame.attrs["replica_lag_s"], float) and frame.attrs["replica_lag_s"] >= 0
                   for frame in views.values())
        assert "read from a standby" in monitor.status.value
        assert "read_db=" in repr(driver) and standby.url.split("@")[1] in repr(driver)
        plain = DatabaseQueueDriver(primary.url, table=table)
        assert plain.fetch_stats().attrs["replica_lag_s"] == 0.0  # read from the primary: not stale at all
        plain.close()
    finally:
        driver.drop_table()
        driver.close()


def test_a_lagging_standby_says_so_and_batch_wait_still_ends_only_when_the_primary_is_done(pair):
    primary, standby = pair
    table = unique_table()
    driver = created_on_both(primary.url, standby.url, table, read_db=standby.url)
    paused = False
    try:
        FAILING.clear()
        FAILING.add(1)
        batch = driver.map(chunk, range(30), chunk_size=10)
        run_burst(driver)
        wait_until(lambda: batch.progress()["failed"] == 1, 30, "the standby to replay the failure")

        select(standby.url, "SELECT pg_wal_replay_pause()")  # from now on the standby falls behind
        paused = True
        FAILING.clear()
        assert batch.retry_failures() == 1  # pending again, on the primary only
        assert batch.progress()["failed"] == 1  # the standby still says: done, one failed
        lag = wait_until(lambda: (lag := driver.fetch_stats().attrs["replica_lag_s"]) > 0 and lag, 30,
                         "the standby's lag to show")
        assert lag > 0

        worker = Worker(driver, concurrency=1, lease_timeout=10, poll_interval=0.05).start()
        try:
            batch.wait(progress=False, timeout=60, poll_interval=0.05)
            returned = datetime.now(timezone.utc)
        finally:
            worker.stop()
        [retried] = [job_id for job_id in driver.jobs(batch=batch.id)["id"]
                     if driver.get_job(job_id).attempts == 1 and driver.get_job(job_id).payload["chunk"] == 1]
        finished = driver.get_job(retried).finished_at  # read on the primary
        assert finished is not None and finished <= returned  # wait ended only after the primary was done
        assert batch.progress(on_primary=True)["completed"] == 3
        assert len(batch.results()) == 30  # the lagging standby lacks a result: results() reads the primary
    finally:
        if paused:
            select(standby.url, "SELECT pg_wal_replay_resume()")
        driver.drop_table()
        driver.close()


def test_kronix_stats_reads_the_standby_given_by_read_db_or_the_environment(pair, tmp_path):
    primary, standby = pair
    table = unique_table()
    driver = created_on_both(primary.url, standby.url, table)
    try:
        driver.push_many([Job("n", i, queue="etl") for i in range(3)])
        wait_until(lambda: rows_replayed(standby.url, table) == 3, 30, "the standby to replay the jobs")
        reset_statements(primary.url)
        by_option, by_environment = kronix_in_parallel(
            ["--db", primary.url, "--read-db", standby.url, "--table", table, "--json", "stats"],
            ["--db", primary.url, "--table", table, "--json", "queues"], cwd=tmp_path,
            environment=cli_environment(KRONIX_READ_DATABASE_URL=standby.url))
        assert by_option.returncode == by_environment.returncode == 0, by_option.stderr + by_environment.stderr
        assert json.loads(by_option.stdout)[0]["pending"] == 3 and json.loads(by_environment.stdout)[0]["pending"] == 3
        assert statements_on(primary.url, table) == []
    finally:
        driver.drop_table()
        driver.close()


# -- failover ------------------------------------------------------------------------------------

JOBS = 20_000
WORKERS = 4
LEASE_SECONDS = 20.0  # far longer than the failover: no job is taken from a worker that is just reconnecting


def test_workers_on_a_multi_host_url_survive_the_primary_failing_over_to_the_standby(tmp_path, capsys):
    with replicated_postgres() as (primary, standby):
        url = (f"postgresql+psycopg://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/test"
               "?target_session_attrs=read-write")
        table = unique_table()
        runs, audit = f"runs_{table}", f"audit_{table}"
        driver = DatabaseQueueDriver(url, table=table)
        driver.create_table()
        chaos_jobs.create_runs_table(primary.url, runs)
        create_audit(primary.url, table, audit)
        runs_url = driver.store.url_with_password  # the jobs' side effects follow the failover too (SQLAlchemy's form)
        driver.push_many(Job(chaos_jobs.NAME, {"n": n, "url": runs_url, "runs": runs, "sleep": 0.002},
                             id=f"c{n:07d}", max_retries=chaos_jobs.MAX_RETRIES) for n in range(JOBS))
        stats_dir = tmp_path / "stats"
        stats_dir.mkdir()
        log = tmp_path / "workers.log"
        with open(log, "w") as output:
            workers = [subprocess.Popen([sys.executable, "-m", "chaos_jobs", url, table, str(stats_dir),
                                         str(LEASE_SECONDS)], cwd=TESTS, stdout=output, stderr=output)
                       for _ in range(WORKERS)]
        try:
            wait_until(lambda: final_jobs(driver) >= 0.3 * JOBS, 180, "30% of the jobs to be done")
            primary.crash()  # an immediate stop: no checkpoint, every session cut
            stopped_at = datetime.now(timezone.utc)  # from here on, a completion can only be the new primary's
            standby.promote()
            promoted_at = datetime.now(timezone.utc)
            wait_until(lambda: final_jobs(driver) == JOBS, 300, "every job to be final on the new primary")
            alive = [worker.poll() is None for worker in workers]
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            exit_codes = [worker.wait(timeout=120) for worker in workers]
            report = audit_chaos_jobs(driver, standby.url, runs, audit, JOBS, killed_at={})
            first_after = select(standby.url, f"SELECT min(finished_at) FROM {table} WHERE finished_at > :t",
                                 {"t": stopped_at})[0][0]
            workers_after = {worker for (worker,) in select(
                standby.url, f"SELECT DISTINCT reserved_by FROM {table} WHERE finished_at > :t", {"t": stopped_at})}
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
            driver.close()
        stats = worker_stats(stats_dir)

    gap = (first_after - stopped_at).total_seconds()
    with capsys.disabled():
        print(f"\nfailover: {JOBS} jobs through {WORKERS} workers on a multi-host URL; primary stopped "
              f"(-m immediate) at {0.3:.0%}, standby promoted {(promoted_at - stopped_at).total_seconds():.2f}s "
              f"after the stop, first completion on the new primary {gap:.2f}s after the stop; completed {report['completed']}, "
              f"dead-lettered {report['dead']} ({report['dead_by_design']} by design), "
              f"reconnects {stats.get('database_errors', 0)} (workers' database errors), "
              f"lease recoveries {stats.get('recovered', 0)}, re-executions {report['re_executed']} (at-least-once), "
              f"duplicates {report['duplicates']}, lost {report['lost']}")
    assert alive == [True] * WORKERS and exit_codes == [0] * WORKERS, log.read_text()[-3000:]
    assert report["duplicates"] == 0 and report["lost"] == 0 and report["problems"] == [], report["problems"][:20]
    assert report["completed"] + report["dead"] == JOBS and report["dead"] == report["dead_by_design"]
    assert len(workers_after) == WORKERS  # every worker found the new primary and went on working


def final_jobs(driver: DatabaseQueueDriver) -> int:
    """Completed and dead-lettered jobs, or -1 while no host is read-write (mid-failover)."""
    try:
        stats = driver.fetch_stats()
    except sa.exc.DBAPIError:
        return -1
    return int(stats["completed"].sum() + stats["failed"].sum())


def worker_stats(directory) -> dict[str, int]:
    totals: collections.Counter = collections.Counter()
    for path in directory.glob("*.json"):
        totals.update(json.loads(path.read_text()))
    return dict(totals)
