"""Four processes pushing and popping one SQLite file at once.

No "database is locked" reaches the caller, no job is lost or handed out twice, every
process gets a fair share of the work, and no write transaction waits long for the lock.
SQLite's own busy handler sleeps and retries, so a process that commits and begins again
at once keeps winning the lock while the others sleep: the dialect makes writers take
turns (see ``SQLiteDialect``), and this test measures the turns.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time

import pytest
import sqlalchemy as sa

from kronix_data import DatabaseQueueDriver, Job

PROCESSES = 4
JOBS = int(os.environ.get("KRONIX_SQLITE_JOBS", "8000"))
BATCH = 10
PUSH_BATCH = 40  # pushes outrun pops, so most of the queue is drained by pops alone, as in the issue


def push_and_pop(url: str, table: str, me: int, start, finished_pushing) -> dict:
    """Push this process's quota in batches, popping and completing between them, until the queue is empty.

    The wait for the write lock is measured around BEGIN IMMEDIATE: from the first
    "begin" listener (before the dialect's) to the last (after it).
    """
    engine = sa.create_engine(url, connect_args={"timeout": 30.0})  # as the driver makes it from a URL
    waits: list[float] = []
    writing = lambda conn: "kronix_sqlite_begin" not in conn.get_execution_options()  # noqa: E731
    sa.event.listen(engine, "begin", lambda conn: conn.info.__setitem__("asked", time.perf_counter()))
    driver = DatabaseQueueDriver(engine, table=table)
    sa.event.listen(engine, "begin", lambda conn: writing(conn) and waits.append(
        time.perf_counter() - conn.info.pop("asked")))
    quota = JOBS // PROCESSES
    pushed, done, popped, locked = 0, [], [], []
    start.wait()
    began = time.perf_counter()
    while True:
        try:
            if pushed < quota:
                count = min(PUSH_BATCH, quota - pushed)
                driver.push_many(Job("sqlite.work", {"by": me, "i": pushed + k}) for k in range(count))
                pushed += count
                if pushed == quota:
                    finished_pushing.append(me)
            jobs = driver.pop_many(BATCH)
            popped += [job.id for job in jobs]
            if jobs:
                assert driver.complete_many(jobs) == len(jobs)
                done += [job.id for job in jobs]
            elif len(finished_pushing) == PROCESSES and driver.size() == 0:
                break
        except sa.exc.OperationalError as error:  # "database is locked" would land here
            locked.append(str(error.orig))
            if len(locked) > 100:
                break
    elapsed = time.perf_counter() - began
    driver.close()
    return {"me": me, "done": done, "popped": popped, "locked": locked, "waits": waits, "elapsed": elapsed}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def test_four_processes_share_one_sqlite_file_fairly_without_locked_errors(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with DatabaseQueueDriver(url, table="jobs") as driver:
        driver.create_table()
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Barrier(PROCESSES)
        finished_pushing = manager.list()
        with context.Pool(PROCESSES) as pool:
            results = pool.starmap(push_and_pop, [(url, "jobs", me, start, finished_pushing)
                                                  for me in range(PROCESSES)])

    shares = {result["me"]: len(result["done"]) for result in results}
    total = sum(shares.values())
    waits = [wait for result in results for wait in result["waits"]]
    with capsys.disabled():
        print(f"\nSQLite, {PROCESSES} processes, {JOBS} jobs in {max(r['elapsed'] for r in results):.1f}s: "
              f"shares {[f'{shares[me] / total:.1%}' for me in sorted(shares)]}, "
              f"write-lock waits over {len(waits)} transactions: median {percentile(waits, 0.5) * 1000:.1f} ms, "
              f"p99 {percentile(waits, 0.99) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms")

    assert [result["locked"] for result in results] == [[]] * PROCESSES  # no "database is locked" reached anyone
    popped = collections.Counter(job_id for result in results for job_id in result["popped"])
    assert [job_id for job_id, times in popped.items() if times > 1] == []  # none handed out twice
    with DatabaseQueueDriver(url, table="jobs") as driver:
        stats = driver.fetch_stats().set_index("queue").loc["default"]
    assert total == JOBS == len(popped) and (stats["completed"], stats["pending"], stats["processing"]) == (JOBS, 0, 0)
    # Fair: every process did at least half of an equal share (the issue saw 100 % / 0 / 0 / 0).
    assert min(shares.values()) >= total / PROCESSES / 2, shares
    assert max(waits) < 1.0  # no write waited anywhere near the 30 s busy timeout


def hold_a_write_transaction(url: str, ready) -> None:
    """Begin a write transaction (taking the turn and SQLite's lock), say so, and wait to be killed."""
    engine = sa.create_engine(url)
    driver = DatabaseQueueDriver(engine, table="jobs")
    with driver.engine.begin() as conn:
        conn.execute(driver.table.delete().where(driver.table.c.id == "nothing"))
        ready.set()
        time.sleep(600)


def test_a_writer_killed_mid_transaction_does_not_block_the_others(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    driver = DatabaseQueueDriver(url, table="jobs")
    driver.create_table()
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=hold_a_write_transaction, args=(url, ready))
    holder.start()
    try:
        assert ready.wait(60)
        os.kill(holder.pid, 9)
        holder.join()
        started = time.perf_counter()
        driver.push(Job("after.the.kill"))
        assert time.perf_counter() - started < 5  # the kernel dropped both of the dead process's locks
        assert driver.pop().name == "after.the.kill"
    finally:
        if holder.is_alive():
            holder.kill()
        driver.close()


@pytest.mark.parametrize("engines", ["one engine", "two engines"])
def test_a_thread_nesting_two_writes_gets_sqlites_error_not_a_hang(tmp_path, engines):
    """The turn is re-entrant per thread and file: the inner write waits for the busy timeout and fails, as before."""
    url = f"sqlite:///{tmp_path / 'nested.db'}"
    outer_engine = sa.create_engine(url, connect_args={"timeout": 0.5})
    inner_engine = outer_engine if engines == "one engine" else sa.create_engine(url, connect_args={"timeout": 0.5})
    outer_driver = DatabaseQueueDriver(outer_engine, table="jobs")
    driver = DatabaseQueueDriver(inner_engine, table="jobs")
    driver.create_table()
    outcome = []

    def nest():
        with outer_engine.begin() as outer:
            outer.execute(outer_driver.table.delete())
            try:
                driver.push(Job("inner"))
            except sa.exc.OperationalError as error:
                outcome.append(str(error.orig))

    thread = threading.Thread(target=nest, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "a nested write hung on its own thread's turn"
    assert outcome == ["database is locked"]
    driver.push(Job("afterwards"))  # the turn was given back
    assert outer_driver.size() == 1


def test_two_drivers_can_share_one_sqlite_engine(tmp_path):
    """The second driver on an engine once failed: its dialect never set up the reader."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'shared.db'}")
    first, second = DatabaseQueueDriver(engine, table="first"), DatabaseQueueDriver(engine, table="second")
    first.create_table()
    second.create_table()
    first.push(Job("a"))
    assert (first.size(), second.size()) == (1, 0)
