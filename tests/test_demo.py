"""``kronix demo`` run the way a new user runs it: a subprocess with real worker processes.

The expected outcome is computed here from the generator: the chunks that hold
its bad rows must be exactly the ones that fail, with the error each bad row causes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


from kronix_data import DatabaseQueueDriver, Job
from kronix_data.demo import TASK_NAME, generate_sales

from helpers import database_url, drop_table, unique_table

REPOSITORY = Path(__file__).resolve().parents[1]
ROWS, CHUNK_SIZE = 60_000, 5_000


def kronix_demo(*arguments: str, cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **variables}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "kronix_data.cli", "demo", *arguments], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=180)


def expected_failures(rows: int, chunk_size: int) -> dict[int, str]:
    _, bad = generate_sales(rows)
    return bad.failing_chunks(chunk_size)


def test_the_generator_plants_bad_rows_of_both_kinds():
    sales, bad = generate_sales(ROWS)
    assert len(bad.negative_quantity) == len(bad.unknown_currency) == 1
    assert (sales["quantity"] < 0).sum() == 1 and sales.loc[bad.negative_quantity, "quantity"].lt(0).all()
    assert sales["currency"].eq("XXX").sum() == 1 and sales.loc[bad.unknown_currency, "currency"].eq("XXX").all()
    assert len(generate_sales(2_000_000)[1].negative_quantity) == 3  # a few more in the default run


def test_demo_on_sqlite_prints_stats_failures_and_a_summary_that_match_the_data(tmp_path):
    planted = expected_failures(ROWS, CHUNK_SIZE)
    chunks = ROWS // CHUNK_SIZE
    assert planted, "the generator put no bad row in this run"

    # The environment's queue must not be touched: the demo empties its table.
    done = kronix_demo("--rows", str(ROWS), "--chunk-size", str(CHUNK_SIZE), "--processes", "2", cwd=tmp_path,
                       KRONIX_DATABASE_URL=f"sqlite:///{tmp_path / 'precious.db'}", KRONIX_TABLE="precious")

    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert (tmp_path / "kronix_demo.db").exists() and not (tmp_path / "precious.db").exists()
    assert f"enqueued {chunks} chunks of up to {CHUNK_SIZE:,} rows as batch 'demo-sales'" in out
    assert "working them with 2 local worker processes" in out

    stats = out.split("fetch_stats(window=timedelta(seconds=")[1].splitlines()
    assert stats[1].split()[:11] == ["queue", "pending", "processing", "completed", "failed", "waiting", "cancelled",
                                     "oldest_pending_age_s", "wait_s_mean", "wait_s_p50", "wait_s_p95"]
    assert stats[2].split()[:5] == ["default", "0", "0", str(chunks - len(planted)), str(len(planted))]

    failures = out.split("batch.failures(): the dead letters of the batch, one per failed chunk:\n")[1]
    failure_rows = [line.split() for line in failures.split("\n\n")[0].splitlines()[1:]]
    assert {int(row[0]): row[3] for row in failure_rows} == planted
    assert all(row[1] == TASK_NAME and row[2] == "2" for row in failure_rows)  # run, retried once, dead

    failed_rows = sum(min(CHUNK_SIZE, ROWS - chunk * CHUNK_SIZE) for chunk in planted)
    assert f"rows processed      {ROWS - failed_rows:,} of {ROWS:,}" in out
    assert f"chunks              {chunks}: {chunks - len(planted)} completed, {len(planted)} failed" in out
    by_type = {error: list(planted.values()).count(error) for error in set(planted.values())}
    assert "failed by error     " + ", ".join(f"{error} {count}" for error, count in sorted(by_type.items())) in out
    assert "exactly those failed" in out
    assert re.search(r"wall time +[\d.]+ s \(generate [\d.]+ s, enqueue [\d.]+ s, work [\d.]+ s\)", out)
    assert re.search(r"throughput +[\d.]+ jobs/s", out)
    revenue = out.split("revenue per store (batch.results(), concatenated per chunk):\n")[1].split("\n\n")[0]
    orders = sum(int(line.split()[1]) for line in revenue.splitlines()[2:])
    assert orders == ROWS - failed_rows

    # Run again: the table is emptied first, so the figures are this run's, not the sum of two.
    again = kronix_demo("--rows", str(ROWS), "--chunk-size", str(CHUNK_SIZE), "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["chunks"], summary["completed"], summary["failed"]) == (chunks, chunks - len(planted),
                                                                            len(planted))


def test_demo_on_postgresql_with_json_output(tmp_path):
    url, table = database_url("postgresql", tmp_path), unique_table()
    rows, chunk_size = 800_000, 100_000  # two bad rows of each kind
    planted = expected_failures(rows, chunk_size)
    try:
        done = kronix_demo("--db", url, "--table", table, "--rows", str(rows), "--chunk-size", str(chunk_size),
                           "--json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)  # stdout holds the JSON only; progress goes to stderr
        assert summary["failed_chunks"] == {str(chunk): error for chunk, error in sorted(planted.items())}
        assert summary["planted_failures"] == summary["failed_chunks"]
        assert (summary["chunks"], summary["completed"], summary["failed"]) == (8, 8 - len(planted), len(planted))
        assert summary["rows_processed"] == rows - chunk_size * len(planted)
        assert sum(summary["failed_by_error_type"].values()) == len(planted)
        assert "demo.clean_sales" in done.stderr and f"{rows}/{rows} rows" in done.stderr  # the tqdm bar, by rows
        with DatabaseQueueDriver(url, table=table) as driver:
            assert driver.batch("demo-sales").progress()["completed"] == 8 - len(planted)
    finally:
        drop_table(url, table)


def test_demo_refuses_a_table_that_holds_other_jobs(tmp_path):
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    with DatabaseQueueDriver(url, table="jobs") as driver:
        driver.create_table()
        job_id = driver.push(Job("etl.important", {"file": "a.csv"}))

    done = kronix_demo("--db", url, "--table", "jobs", "--rows", "1000", cwd=tmp_path)

    assert done.returncode == 1
    assert "table 'jobs' holds jobs that are not the demo's (e.g. 'etl.important')" in done.stderr
    with DatabaseQueueDriver(url, table="jobs") as driver:
        assert driver.get_job(job_id).payload == {"file": "a.csv"}


def test_demo_rejects_bad_numbers_as_usage_errors(tmp_path):
    done = kronix_demo("--rows", "0", cwd=tmp_path)
    assert done.returncode == 2 and "--rows: must be >= 1, got '0'" in done.stderr
    assert not (tmp_path / "kronix_demo.db").exists()
