"""How fast the DataFrame views (stats, history, batches, timeline) and the monitor stay on a big table:
finished jobs on PostgreSQL.

    python benchmarks/stats_at_scale.py [--db URL] [--finished 1000000] [--pending 100000] [--runs 7]
        [--keep] [--reuse TABLE] [--no-prune]

Fills a new table of its own (``INSERT ... SELECT generate_series``, about
half a minute per million) with finished jobs spread over 30 days (1 in 1,000
a dead letter, in batches of 1,000 chunks), plus pending chunks (in batches
of 1,000, created in the last minutes) and running jobs, runs ``VACUUM
ANALYZE``, counts the rollup afresh (what an upgrade of an older table does
once), then prints the median wall time of each view and of one
``QueueMonitor.refresh_now()`` over ``--runs`` runs, and beside them the
statements the previous release ran for the counts and ``batches()`` (a
GROUP BY over the whole table), and drops the table.  The URL defaults to
``KRONIX_BENCH_POSTGRES_URL`` or this machine's server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from kronix_data import DatabaseQueueDriver  # noqa: E402
from kronix_data.monitor import QueueMonitor  # noqa: E402

DEFAULT_URL = os.environ.get("KRONIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
DAYS = 30
BATCH_SIZE = 1_000


def fill(driver: DatabaseQueueDriver, finished: int, pending: int, running: int) -> None:
    """Finished jobs spread over DAYS (finish times evenly, waits 0-2 s, runs 0.1-5 s), then pending and running."""
    table = driver.engine.dialect.identifier_preparer.format_table(driver.table)
    span = DAYS * 86400.0
    with driver.engine.begin() as conn:
        conn.execute(sa.text(f"""
            INSERT INTO {table} (id, name, queue, status, attempts, max_retries, payload, last_error,
                                 created_at, available_at, reserved_at, finished_at, reserved_by,
                                 result, job_key, batch_id)
            SELECT 'f' || lpad(i::text, 9, '0'), 'etl.clean', CASE WHEN i % 4 = 0 THEN 'reports' ELSE 'default' END,
                   CASE WHEN i % 1000 = 7 THEN 'failed' ELSE 'completed' END, 1, 3,
                   '{{"chunk": ' || (i % {BATCH_SIZE}) || '}}',
                   CASE WHEN i % 1000 = 7 THEN (ARRAY['ValueError: bad row ', 'KeyError: missing column ',
                        'TimeoutError: slow chunk '])[1 + i % 3] || i || E'\\n\\nTraceback ...' END,
                   done - run - wait, done - run - wait, done - run, done, 'bench-worker',
                   CASE WHEN i % 1000 = 7 THEN NULL ELSE '{{"rows": 100}}' END,
                   'b' || (i / {BATCH_SIZE}) || ':' || (i % {BATCH_SIZE}), 'b' || (i / {BATCH_SIZE})
            FROM (SELECT i, now() - make_interval(secs => (:finished - i) * :step) AS done,
                         make_interval(secs => (i % 2000) / 1000.0) AS wait,
                         make_interval(secs => 0.1 + (i % 4900) / 1000.0) AS run
                  FROM generate_series(1, :finished) AS i) AS generated
        """), {"finished": finished, "step": span / finished})
        conn.execute(sa.text(f"""
            INSERT INTO {table} (id, name, queue, status, attempts, max_retries, payload, created_at, available_at)
            SELECT 'p' || lpad(i::text, 9, '0'), 'etl.clean', 'default', 'pending', 0, 3, '{{}}',
                   now() - make_interval(secs => i), now() - make_interval(secs => i)
            FROM generate_series(1, :pending) AS i
        """), {"pending": pending})
        conn.execute(sa.text(f"""
            INSERT INTO {table} (id, name, queue, status, attempts, max_retries, payload, created_at, available_at,
                                 reserved_at, heartbeat_at, reserved_by)
            SELECT 'r' || lpad(i::text, 9, '0'), 'etl.clean', 'default', 'processing', 1, 3, '{{}}',
                   now() - interval '10 seconds', now() - interval '10 seconds', now(), now(), 'bench-worker'
            FROM generate_series(1, :running) AS i
        """), {"running": running})
    with driver.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f"VACUUM ANALYZE {table}"))


def add_chunks(driver: DatabaseQueueDriver, chunks: int) -> None:
    """One batch of ``chunks`` pending chunks, as ``driver.map`` leaves it before workers start (then VACUUM)."""
    table = driver.engine.dialect.identifier_preparer.format_table(driver.table)
    with driver.engine.begin() as conn:
        conn.execute(sa.text(f"""
            INSERT INTO {table} (id, name, queue, status, attempts, max_retries, payload, created_at, available_at,
                                 job_key, batch_id)
            SELECT 'c' || lpad(i::text, 9, '0'), 'etl.load', 'default', 'pending', 0, 3, '{{"chunk": ' || i || '}}',
                   now(), now(), 'load:' || i, 'load'
            FROM generate_series(1, :chunks) AS i
        """), {"chunks": chunks})
    with driver.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f"VACUUM ANALYZE {table}"))


def remove_chunks(driver: DatabaseQueueDriver) -> None:
    """Delete what add_chunks added (pending jobs only: the rollup does not hold them)."""
    table = driver.engine.dialect.identifier_preparer.format_table(driver.table)
    with driver.engine.begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {table} WHERE batch_id = 'load'"))
    with driver.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f"VACUUM ANALYZE {table}"))


def previous_counts(driver: DatabaseQueueDriver) -> list:
    """What the previous release's fetch_stats() counted: every row, grouped (an index-only scan of _status)."""
    c = driver.table.c
    with driver.engine.connect() as conn:
        return conn.execute(sa.select(c.queue, c.status, sa.func.count()).group_by(c.status, c.queue)).all()


def previous_batches(driver: DatabaseQueueDriver) -> list:
    """What the previous release's batches() ran: a GROUP BY of every job of every batch."""
    c = driver.table.c
    with driver.engine.connect() as conn:
        return conn.execute(sa.select(c.batch_id, c.status, sa.func.count(), sa.func.min(c.name),
                                      sa.func.max(c.name), sa.func.min(c.created_at), sa.func.max(c.finished_at))
                            .where(c.batch_id.is_not(None)).group_by(c.batch_id, c.status)).all()


def median_ms(call, runs: int) -> tuple[float, object]:
    call()  # warm the caches and the connection pool
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def report(label: str, call, runs: int, monitor: QueueMonitor) -> None:
    milliseconds, result = median_ms(call, runs)
    size = f"{len(result):,} rows" if hasattr(result, "__len__") and not isinstance(result, dict) else result
    if label == "monitor.refresh_now()":
        size = f"ok={result}, {len(monitor.batch_progress)} batches shown, error={monitor.last_error}"
    print(f"  {label:<42} {milliseconds:8.1f} ms   ({size})")


def _summed(rows) -> list:
    totals: dict = {}
    for queue, status, n in rows:
        totals[(queue, status)] = totals.get((queue, status), 0) + n
    return [(queue, status, n) for (queue, status), n in totals.items() if n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=DEFAULT_URL, help="a PostgreSQL URL (default: %(default)s)")
    parser.add_argument("--finished", type=int, default=1_000_000, help="finished jobs (default: %(default)s)")
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--chunks", type=int, default=100_000,
                        help="pending chunks of one batch added before the monitor is timed (default: %(default)s)")
    parser.add_argument("--running", type=int, default=50)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the table (to EXPLAIN its statements)")
    parser.add_argument("--reuse", metavar="TABLE", help="time a table kept by --keep again instead of filling one")
    parser.add_argument("--no-prune", action="store_true",
                        help="skip the prune at the end (it deletes 9 jobs in 10): a table kept for --reuse stays whole")
    args = parser.parse_args(argv)

    table = args.reuse or f"bench_stats_{uuid.uuid4().hex[:10]}"
    driver = DatabaseQueueDriver(args.db, table=table)
    if driver.engine.dialect.name != "postgresql":
        parser.error("this benchmark fills the table with PostgreSQL's generate_series; give a PostgreSQL URL")
    driver.create_table()
    try:
        started = time.perf_counter()
        if args.reuse:
            remove_chunks(driver)
            print(f"reusing {table} (its chunks removed)")
        else:
            fill(driver, args.finished, args.pending, args.running)
            print(f"filled {table}: {args.finished:,} finished jobs over {DAYS} days, {args.pending:,} pending, "
                  f"{args.running} running in {time.perf_counter() - started:.1f}s (incl. VACUUM ANALYZE)")
        started = time.perf_counter()
        folded = driver.store.rebuild_rollup()  # the rows came in behind the store's back, as on an upgrade
        print(f"rollup counted afresh (what create_table does once on an older table): {folded:,} jobs in "
              f"{time.perf_counter() - started:.1f}s")
        monitor = QueueMonitor(driver, start=False)
        batch = driver.batch(f"b{args.finished // BATCH_SIZE // 2}")
        views = {
            "fetch_stats()  [1 h window]": driver.fetch_stats,
            "fetch_stats(window=24 h)": lambda: driver.fetch_stats(window=timedelta(hours=24)),
            "dead_letter_jobs()": driver.dead_letter_jobs,
            "jobs(limit=1000)": driver.jobs,
            "jobs(status='failed', limit=1000)": lambda: driver.jobs(status="failed"),
            "batch.progress()": batch.progress,
            "batches(since=1 day)": lambda: driver.batches(since=timedelta(days=1)),
            "batches()  [all]": driver.batches,
            "timeline()  [1 h by 1 min]": driver.timeline,
            "timeline('1h', since=1 day)": lambda: driver.timeline("1h", since=timedelta(days=1)),
            "timeline('1h', queue='reports', 1 day)": lambda: driver.timeline("1h", timedelta(days=1), "reports"),
            "timeline('1D', since=31 days)  [all]": lambda: driver.timeline("1D", since=timedelta(days=DAYS + 1)),
            "fold_finished()  [nothing new]": driver.store.fold_finished,
            "before: COUNT by status, queue": lambda: previous_counts(driver),
            "before: GROUP BY batch_id, status": lambda: previous_batches(driver),
        }
        with_chunks = {
            "monitor.refresh_now()": monitor.refresh_now,
            "fetch_stats()  [1 h window]": driver.fetch_stats,
            "fetch_stats(window=1 min)  [the monitor's]": lambda: driver.fetch_stats(window=timedelta(minutes=1)),
            "batches(since=1 day)": lambda: driver.batches(since=timedelta(days=1)),
            "batches()  [all, and the chunks' one]": driver.batches,
        }
        print(f"median of {args.runs} runs, PostgreSQL {'.'.join(map(str, driver.engine.dialect.server_version_info))}")
        for label, call in views.items():
            report(label, call, args.runs, monitor)
        add_chunks(driver, args.chunks)
        print(f"with one batch of {args.chunks:,} pending chunks added:")
        for label, call in with_chunks.items():
            report(label, call, args.runs, monitor)
        stats = driver.fetch_stats().set_index("queue")
        print(stats[["completed", "failed", "pending", "run_s_p50", "run_s_p95", "throughput_per_s"]].to_string())
        if args.no_prune:
            return 0
        started = time.perf_counter()
        pruned = driver.prune(timedelta(days=DAYS - 3))
        left = int(driver.fetch_stats()["completed"].sum())
        print(f"prune(older_than=27 days): {pruned:,} rows in {time.perf_counter() - started:.1f}s "
              f"(10,000 per transaction); {left:,} completed jobs left")
        started = time.perf_counter()
        exact = sorted(previous_counts(driver)) == sorted(
            (queue, status, n) for queue, status, n in _summed(driver.store.count_jobs_by_queue_and_status()))
        print(f"counts equal a plain COUNT of the table after the prune: {exact}")
    finally:
        if args.keep:
            print(f"kept {table}")
        else:
            driver.drop_table()
        driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
