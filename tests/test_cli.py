"""The ``kronix`` command line, run as a real subprocess against SQLite, PostgreSQL and MariaDB.

State is set up with the Python driver; the tests check the CLI's output values,
exit codes and stderr.  Independent error cases run as parallel subprocesses
to keep the file fast (each start imports pandas).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import pytest

from kronix_data import DatabaseQueueDriver, Job, JobStatus
from kronix_data.cli import ERROR_WIDTH

from helpers import (cli_environment, database_url, drop_table, finish, kronix, kronix_in_parallel, start_kronix,
                     unique_table)

UNREACHABLE_WITH_PASSWORD = "postgresql://postgres:hunter2@127.0.0.1:1/test"


def fail_jobs(driver: DatabaseQueueDriver, jobs: list[Job], error: str) -> list[str]:
    """Push ``jobs`` and dead-letter each of them with ``error``; returns their ids.

    Each job is popped right after its push, so other pending jobs are left alone.
    """
    ids = []
    for job in jobs:
        ids.append(driver.push(job))
        popped = driver.pop(job.queue)
        assert popped.id == job.id
        popped.last_error = error
        assert driver.fail(popped)
    return ids


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return database_url("sqlite", tmp_path)


@pytest.fixture
def sqlite_driver(sqlite_url):
    """A driver on an initialised SQLite table named kronix_jobs (the CLI's default)."""
    with DatabaseQueueDriver(sqlite_url) as driver:
        driver.create_table()
        yield driver


# -- init, stats, and a missing table ---------------------------------------

def test_a_fresh_database_needs_init_and_then_has_no_jobs(tmp_path):
    missing = kronix("stats", cwd=tmp_path)  # the default URL: ./kronix.db
    assert missing.returncode == 4
    assert "does not exist" in missing.stderr and "kronix init" in missing.stderr
    assert "Traceback" not in missing.stderr and missing.stdout == ""

    created = kronix("init", cwd=tmp_path)
    assert created.returncode == 0
    assert "created table 'kronix_jobs'" in created.stdout

    again, human, machine = kronix_in_parallel(["--json", "init"], ["stats"], ["stats", "--json"], cwd=tmp_path)
    assert again.returncode == human.returncode == machine.returncode == 0
    assert json.loads(again.stdout) == {"table": "kronix_jobs", "action": "unchanged", "added": []}
    assert "no jobs" in human.stdout
    assert json.loads(machine.stdout) == []


def test_every_reading_command_needs_the_table(tmp_path, sqlite_url):
    with DatabaseQueueDriver(sqlite_url, table="other_jobs") as driver:
        driver.create_table()  # the database file exists, the table kronix_jobs does not
    results = kronix_in_parallel(["dead-letters"], ["retry", "--all"], ["retry", "some-id"], ["recover"],
                                 cwd=tmp_path, environment=cli_environment(KRONIX_DATABASE_URL=sqlite_url))
    for result in results:
        assert result.returncode == 4, result.args
        assert "table 'kronix_jobs' does not exist" in result.stderr and "kronix init" in result.stderr


def test_every_inspecting_command_on_a_sqlite_file_that_does_not_exist_says_so_and_creates_nothing(tmp_path):
    missing = tmp_path / "typo.db"
    commands = [["stats"], ["dead-letters"], ["retry", "--all"], ["retry", "some-id"], ["recover"],
                ["worker", "--burst"]]
    results = kronix_in_parallel(*commands, cwd=tmp_path,
                                 environment=cli_environment(KRONIX_DATABASE_URL=f"sqlite:///{missing}"))
    for result in results:
        assert result.returncode == 4, (result.args, result.stderr)
        assert f"SQLite database file '{missing}' does not exist" in result.stderr, result.stderr
        assert "kronix init" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    created = kronix("--db", f"sqlite:///{missing}", "init", cwd=tmp_path)
    assert created.returncode == 0 and missing.exists()


def test_init_upgrades_a_table_that_lacks_columns(tmp_path, sqlite_url, sqlite_driver):
    with sqlite_driver.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE kronix_jobs DROP COLUMN result")

    result = kronix("init", "--db", sqlite_url, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"table": "kronix_jobs", "action": "upgraded", "added": ["column result"]}


def test_stats_counts_each_queue(tmp_path, sqlite_url, sqlite_driver):
    fail_jobs(sqlite_driver, [Job("etl.load", queue="emails")], "boom")
    sqlite_driver.push_many([Job("etl.load", {"chunk": n}) for n in range(3)] + [Job("mail", queue="emails")])
    assert sqlite_driver.pop() is not None  # one default job running

    human, machine = kronix_in_parallel(["stats"], ["stats", "--json"], cwd=tmp_path,
                                        environment=cli_environment(KRONIX_DATABASE_URL=sqlite_url))
    assert human.returncode == machine.returncode == 0
    stats = {row["queue"]: row for row in json.loads(machine.stdout)}
    assert set(stats) == {"default", "emails"}
    assert [stats["default"][key] for key in ("pending", "processing", "completed", "failed")] == [2, 1, 0, 0]
    assert [stats["emails"][key] for key in ("pending", "processing", "completed", "failed")] == [1, 0, 0, 1]
    assert stats["default"]["run_s_mean"] is None  # NaN (no completed job) is null
    assert stats["default"]["oldest_pending_age_s"] >= 0
    header, *lines = human.stdout.splitlines()
    assert header.split()[:5] == ["queue", "pending", "processing", "completed", "failed"]
    assert [line.split()[0] for line in lines] == ["default", "emails"]


# -- dead letters and retry ---------------------------------------------------

def test_dead_letters_as_json_and_as_a_table(tmp_path, sqlite_url, sqlite_driver):
    long_error = "Traceback (most recent call last):\n  File 'etl.py'\nValueError: " + "bad row " * 30
    first = fail_jobs(sqlite_driver, [Job("etl.clean", {"file": "a.csv", "rows": [1, 2]}, max_retries=0)], long_error)
    second = fail_jobs(sqlite_driver, [Job("etl.load", queue="reports")], "short error")

    machine, table, limited = kronix_in_parallel(
        ["dead-letters", "--json"], ["dead-letters", "--queue", "default"], ["dead-letters", "--limit", "1"],
        cwd=tmp_path, environment=cli_environment(KRONIX_DATABASE_URL=sqlite_url))
    assert machine.returncode == table.returncode == limited.returncode == 0

    records = {record["id"]: record for record in json.loads(machine.stdout)}
    assert set(records) == set(first + second)
    record = records[first[0]]
    assert (record["name"], record["queue"], record["attempts"], record["max_retries"]) == ("etl.clean", "default", 1, 0)
    assert record["payload"] == {"file": "a.csv", "rows": [1, 2]}
    assert record["last_error"] == long_error
    assert datetime.fromisoformat(record["finished_at"]).tzinfo is not None
    assert datetime.fromisoformat(record["created_at"]) <= datetime.fromisoformat(record["finished_at"])

    header, row = table.stdout.splitlines()
    assert header.split() == ["id", "name", "queue", "attempts", "last_error"]
    assert row.startswith(first[0]) and "etl.clean" in row and second[0] not in table.stdout
    shown_error = row[header.index("last_error"):]
    assert len(shown_error) == ERROR_WIDTH and shown_error.startswith("Traceback (most recent call last): File")
    assert shown_error.endswith("...")

    assert limited.stdout.count("\n") == 3 and "1 more" in limited.stdout


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path, sqlite_url, sqlite_driver):
    """`kronix dead-letters | head -1`: the pipe closes after one line; no traceback, the SIGPIPE status."""
    sqlite_driver.push_many([Job("etl.clean", {"n": n}, max_retries=0) for n in range(3000)])
    for job in sqlite_driver.pop_many(3000):
        job.last_error = "ValueError: bad row " * 4
        assert sqlite_driver.fail(job)
    process = start_kronix(["dead-letters", "--limit", "3000", "--db", sqlite_url], cwd=tmp_path)
    assert process.stdout.readline().split() == ["id", "name", "queue", "attempts", "last_error"]
    process.stdout.close()  # the reader goes away with more than a pipe's buffer still to come
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_retry_one_dead_letter_then_an_unknown_id(tmp_path, sqlite_url, sqlite_driver):
    [job_id] = fail_jobs(sqlite_driver, [Job("etl.clean")], "boom")

    retried = kronix("retry", job_id, "--db", sqlite_url, cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    assert job_id in retried.stdout
    job = sqlite_driver.get_job(job_id)
    assert (job.status, job.attempts, job.last_error) == (JobStatus.PENDING, 0, None)

    again = kronix("retry", job_id, "--db", sqlite_url, cwd=tmp_path)  # pending now, not a dead letter
    assert again.returncode == 1
    assert f"job {job_id!r} is not a dead letter" in again.stderr and again.stdout == ""


def test_retry_all_filters_by_queue_and_name(tmp_path, sqlite_url, sqlite_driver):
    fail_jobs(sqlite_driver, [Job("a", queue="q1"), Job("b", queue="q1"), Job("a", queue="q2")], "boom")

    result = kronix("retry", "--all", "--queue", "q1", "--name", "a", "--db", sqlite_url, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "retried 1 dead letter"
    assert sorted((job.queue, job.name) for job in sqlite_driver.dead_letter_jobs().itertuples()) == [
        ("q1", "b"), ("q2", "a")]
    assert sqlite_driver.size("q1") == 1


def test_retry_needs_exactly_one_of_an_id_and_all(tmp_path):
    neither, both, filter_with_id, no_command = kronix_in_parallel(
        ["retry"], ["retry", "some-id", "--all"], ["retry", "some-id", "--queue", "q"], [], cwd=tmp_path)
    for result in (neither, both, filter_with_id, no_command):
        assert result.returncode == 2, result.args
        assert "usage:" in result.stderr and "Traceback" not in result.stderr
    assert "not allowed with argument" in both.stderr
    assert "--queue and --name go with --all" in filter_with_id.stderr
    assert not (tmp_path / "kronix.db").exists()  # usage errors never open the database


def test_recover_returns_held_jobs_to_pending(tmp_path, sqlite_url, sqlite_driver):
    sqlite_driver.push_many([Job("a"), Job("b")])
    held = sqlite_driver.pop()

    result = kronix("recover", "--timeout", "0", "--json", "--db", sqlite_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"recovered": 1}
    assert sqlite_driver.get_job(held.id).status is JobStatus.PENDING and sqlite_driver.size() == 2


# -- configuration, environment, errors ------------------------------------------

def test_environment_variables_choose_database_and_table_and_flags_win(tmp_path):
    environment = cli_environment(KRONIX_DATABASE_URL=f"sqlite:///{tmp_path / 'from_env.db'}",
                                  KRONIX_TABLE="env_jobs")
    created = kronix("init", "--json", cwd=tmp_path, environment=environment)
    assert created.returncode == 0 and json.loads(created.stdout)["table"] == "env_jobs"
    assert (tmp_path / "from_env.db").exists() and not (tmp_path / "kronix.db").exists()
    with DatabaseQueueDriver(f"sqlite:///{tmp_path / 'from_env.db'}", table="env_jobs") as driver:
        driver.push(Job("x", queue="from-env"))

    from_env, flag_wins = kronix_in_parallel(["stats", "--json"], ["stats", "--table", "other_jobs"],
                                             cwd=tmp_path, environment=environment)
    assert [row["queue"] for row in json.loads(from_env.stdout)] == ["from-env"]
    assert flag_wins.returncode == 4 and "'other_jobs' does not exist" in flag_wins.stderr


def test_invalid_configuration_exits_3(tmp_path):
    bad_table, unsupported, unparsable, bad_host = kronix_in_parallel(
        ["stats", "--table", "jobs; DROP TABLE x"],
        ["stats", "--db", "oracle://scott:hunter2@db.example/orcl"],
        ["stats", "--db", "not a url:hunter2@host"],
        ["stats", "--db", "postgresql://postgres:hun@hunter2@127.0.0.1:1/test"], cwd=tmp_path)
    for result in (bad_table, unsupported, unparsable, bad_host):
        assert result.returncode == 3, (result.args, result.stderr)
        assert result.stderr.startswith("kronix: invalid configuration") and result.stderr.count("\n") == 1
        assert "hunter2" not in result.stdout + result.stderr
    assert "invalid table name" in bad_table.stderr
    assert "unsupported database 'oracle'" in unsupported.stderr and "oracle://scott:***@db.example" in unsupported.stderr
    assert not (tmp_path / "kronix.db").exists()


def test_an_unreachable_database_exits_4_without_showing_the_password(tmp_path):
    misplaced, unreachable = kronix_in_parallel(
        ["stats", UNREACHABLE_WITH_PASSWORD],  # a URL given where no argument goes is echoed by argparse
        ["-v", "--json", "dead-letters", "--db", UNREACHABLE_WITH_PASSWORD], cwd=tmp_path)
    assert misplaced.returncode == 2 and "postgres:***@" in misplaced.stderr
    assert unreachable.returncode == 4
    assert "kronix: database error (postgresql://postgres:***@127.0.0.1:1/test)" in unreachable.stderr
    assert "using table 'kronix_jobs'" in unreachable.stderr  # -v logs, and scrubs them too
    assert "Traceback" not in unreachable.stderr and unreachable.stdout == ""
    for result in (misplaced, unreachable):
        assert "hunter2" not in result.stdout + result.stderr


def test_worker_fails_on_a_module_that_cannot_be_imported_before_opening_the_database(tmp_path):
    (tmp_path / "myjobs.py").write_text("import no_such_dependency_of_myjobs\n")
    url = f"sqlite:///{tmp_path / 'never.db'}"
    console_script = Path(sys.executable).with_name("kronix")
    missing = start_kronix(["worker", "-m", "no_such_module", "--db", url], cwd=tmp_path)
    # The console script does not put the current directory on sys.path; the worker command must.
    broken = start_kronix(["worker", "-m", "myjobs", "--db", url], cwd=tmp_path,
                   command=[str(console_script)] if console_script.exists() else None)
    missing, broken = finish(missing), finish(broken)

    assert missing.returncode == broken.returncode == 5
    assert "cannot import module 'no_such_module'" in missing.stderr and "No module named" in missing.stderr
    assert "cannot import module 'myjobs'" in broken.stderr and "no_such_dependency_of_myjobs" in broken.stderr
    assert not (tmp_path / "never.db").exists()


def test_help_documents_exit_codes_and_environment(tmp_path):
    result = kronix("--help", cwd=tmp_path)
    assert result.returncode == 0
    for text in ("KRONIX_DATABASE_URL", "KRONIX_TABLE", "exit codes", "3  invalid configuration",
                 "5  a module given to 'worker -m'", "dead-letters", "worker"):
        assert text in result.stdout


# -- servers ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_init_stats_dead_letters_and_retry_on_a_server(backend, tmp_path):
    url = database_url(backend, tmp_path)
    table = unique_table()
    environment = cli_environment(KRONIX_DATABASE_URL=url, KRONIX_TABLE=table)
    try:
        created = kronix("init", "--json", cwd=tmp_path, environment=environment)
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout) == {"table": table, "action": "created", "added": []}

        with DatabaseQueueDriver(url, table=table) as driver:
            failed = fail_jobs(driver, [Job("etl.clean", {"file": "a.csv"}), Job("etl.clean", queue="loads")], "boom")
            driver.push(Job("etl.load", {"n": 1}, queue="loads"))

            stats, dead = kronix_in_parallel(["stats", "--json"], ["dead-letters", "--json"],
                                             cwd=tmp_path, environment=environment)
            assert stats.returncode == dead.returncode == 0, stats.stderr + dead.stderr
            counts = {row["queue"]: (row["pending"], row["failed"]) for row in json.loads(stats.stdout)}
            assert counts == {"default": (0, 1), "loads": (1, 1)}
            records = json.loads(dead.stdout)
            assert sorted(record["id"] for record in records) == sorted(failed)
            assert {record["queue"]: record["payload"] for record in records} == {"default": {"file": "a.csv"},
                                                                                  "loads": None}
            assert all(datetime.fromisoformat(record["finished_at"]).tzinfo for record in records)

            retried = kronix("retry", "--all", "--queue", "loads", "--json", cwd=tmp_path, environment=environment)
            assert retried.returncode == 0 and json.loads(retried.stdout) == {"retried": 1}
            assert driver.size("loads") == 2 and len(driver.dead_letter_jobs()) == 1
    finally:
        drop_table(url, table)


def test_cancel_pause_resume_and_queues(tmp_path, sqlite_url, sqlite_driver):
    ids = sqlite_driver.push_many([Job("n", i, queue="etl") for i in range(3)])
    waiting = Job("n", "after", queue="etl", depends_on=[ids[0]])
    sqlite_driver.push(waiting)
    batch = sqlite_driver.map("chunk", [1, 2, 3], chunk_size=1, queue="load")
    environment = cli_environment(KRONIX_DATABASE_URL=sqlite_url)

    paused, listed = kronix("pause", "etl", cwd=tmp_path, environment=environment), \
        kronix("--json", "queues", cwd=tmp_path, environment=environment)
    assert paused.returncode == 0 and "paused queue 'etl'" in paused.stdout
    queues = {row["queue"]: row for row in json.loads(listed.stdout)}
    assert queues["etl"]["paused"] is True and queues["etl"]["waiting"] == 1 and queues["load"]["pending"] == 3
    assert sqlite_driver.pop("etl") is None
    assert kronix("resume", "etl", cwd=tmp_path, environment=environment).returncode == 0
    assert sqlite_driver.pop("etl").id == ids[0]

    cancelled = kronix("cancel", ids[1], cwd=tmp_path, environment=environment)
    assert cancelled.returncode == 0 and f"cancelled job {ids[1]}" in cancelled.stdout
    by_batch, again, unknown, neither = kronix_in_parallel(
        ["--json", "cancel", "--batch", batch.id], ["cancel", ids[1]], ["cancel", "nope"], ["cancel"],
        cwd=tmp_path, environment=environment)
    assert json.loads(by_batch.stdout) == {"batch": batch.id, "pending": 3, "waiting": 0, "running": 0}
    assert (again.returncode, unknown.returncode, neither.returncode) == (1, 1, 2)
    assert "already finished" in again.stderr and "no job has id 'nope'" in unknown.stderr
    assert "give a job id or --batch" in neither.stderr
    assert sqlite_driver.get_job(ids[1]).status is JobStatus.CANCELLED and batch.progress()["cancelled"] == 3
    missing = kronix("cancel", "--batch", "no-such-batch", cwd=tmp_path, environment=environment)
    assert missing.returncode == 1 and "no job has batch id 'no-such-batch'" in missing.stderr


# -- stats --plot ---------------------------------------------------------------------------------


def test_stats_plot_writes_the_throughput_chart_as_a_png(tmp_path, sqlite_url, sqlite_driver):
    from datetime import timedelta

    from helpers import color_fraction, db_now, finished_job, png_pixels

    now = db_now(sqlite_driver)
    for minute in range(20):
        for _ in range(1 + minute % 4):
            finished_job(sqlite_driver, due=now - timedelta(minutes=25 - minute), wait=0.5, run=1)
    finished_job(sqlite_driver, queue="reports", status="failed", due=now - timedelta(minutes=10), wait=0, run=1,
                 last_error="ValueError: bad")
    environment = cli_environment(KRONIX_DATABASE_URL=sqlite_url)
    chart = tmp_path / "throughput.png"
    plotted, bad_freq, bad_since, unwritable = kronix_in_parallel(
        ["stats", "--plot", str(chart), "--since", "30min"], ["stats", "--plot", "x.png", "--freq", "often"],
        ["stats", "--plot", "x.png", "--since", "lately"], ["stats", "--plot", str(tmp_path / "no" / "dir.png")],
        cwd=tmp_path, environment=environment)
    assert plotted.returncode == 0, plotted.stderr
    assert f"written to {chart}" in plotted.stdout and "default" in plotted.stdout
    pixels = png_pixels(chart.read_bytes())
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    assert color_fraction(pixels, "#1f77b4") > 0.002 and color_fraction(pixels, "#c62828", tolerance=0.04) > 0.0005
    assert (bad_freq.returncode, bad_since.returncode, unwritable.returncode) == (2, 2, 1)
    assert "freq" in bad_freq.stderr and "--since" in bad_since.stderr and "cannot write the plot" in unwritable.stderr
    assert not (tmp_path / "x.png").exists()


def test_limits_sets_shows_and_clears_a_queue_limits_and_queues_lists_them(tmp_path, sqlite_url, sqlite_driver):
    sqlite_driver.push_many([Job("n", i, queue="api") for i in range(4)])
    environment = cli_environment(KRONIX_DATABASE_URL=sqlite_url)

    set_, rated, shown, listed = (kronix(*arguments, cwd=tmp_path, environment=environment) for arguments in (
        ["limits", "api", "--concurrency", "4"], ["--json", "limits", "api", "--concurrency", "2", "--rate", "100/min"],
        ["--json", "limits", "api"], ["--json", "queues"]))
    assert set_.returncode == 0 and "api" in set_.stdout and "4" in set_.stdout
    assert rated.returncode == 0, rated.stderr
    assert json.loads(rated.stdout) == json.loads(shown.stdout)
    assert {key: json.loads(shown.stdout)[key] for key in ("concurrency", "rate", "per_s")} == \
        {"concurrency": 2, "rate": 100, "per_s": 60.0}
    assert json.loads(listed.stdout)[0]["concurrency"] == 2
    assert len(sqlite_driver.pop_many(4, "api")) == 2

    numeric = kronix("--json", "limits", "api", "--rate", "5", "--per", "2", cwd=tmp_path, environment=environment)
    assert json.loads(numeric.stdout)["rate"] == 5 and json.loads(numeric.stdout)["concurrency"] is None
    cleared = kronix("--json", "limits", "api", "--clear", cwd=tmp_path, environment=environment)
    assert json.loads(cleared.stdout)["rate"] is None and len(sqlite_driver.pop_many(4, "api")) == 2

    unknown, created, zero, bad_rate, both = kronix_in_parallel(
        ["limits", "apx", "--concurrency", "2"], ["limits", "new", "--concurrency", "2", "--create"],
        ["limits", "api", "--concurrency", "0"], ["limits", "api", "--rate", "lots"],
        ["limits", "api", "--clear", "--rate", "5"], cwd=tmp_path, environment=environment)
    assert unknown.returncode == 1 and "queue 'apx' has no jobs and no settings" in unknown.stderr
    assert created.returncode == 0
    assert zero.returncode == 2 and "must be >= 1" in zero.stderr
    assert bad_rate.returncode == 1 and "invalid rate 'lots'" in bad_rate.stderr
    assert both.returncode == 2 and "--clear removes every limit" in both.stderr
