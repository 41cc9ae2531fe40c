"""Resource-aware claiming: a worker claims only jobs its resources cover, in the claim statement, runs no
more at once than they allow, and a job no live worker can run is counted as such."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

import isolation_jobs
from helpers import TESTS, kronix, wait_until
from kronix_data import InvalidInputError, Job, Worker, WorkerOptions, task
from kronix_data.resources import checked_resources, covers, encode_requirements, parse_resources, parse_size
from worker_jobs import fetch_runs

GIB = 1024 ** 3


def test_sizes_and_resources_are_parsed():
    assert parse_size("2GiB") == parse_size("2G") == parse_size("2 gib") == 2 * GIB
    assert parse_size("500MB") == 500e6 and parse_size(1024) == 1024 and parse_size("1.5K") == 1536
    assert parse_resources("gpu=1, mem=64G") == {"gpu": 1.0, "mem": 64.0 * GIB}
    assert checked_resources({}, "requires") is None
    assert encode_requirements(checked_resources({"mem": "1K", "gpu": 2}, "r")) == '{"gpu":2.0,"mem":1024.0}'
    assert covers({"gpu": 1.0}, None) and covers({"gpu": 1.0}, {"gpu": 1.0}) and not covers({}, {"gpu": 0.5})
    for bad, message in [("gpu", "is not NAME=AMOUNT"), ("GPU=1", "resource name 'GPU'"), ("gpu=lots", "gpu"),
                         ("gpu=-1", "gpu")]:
        with pytest.raises(InvalidInputError, match=message):
            parse_resources(bad)
    with pytest.raises(InvalidInputError, match=r"requires of job 'x'\['gpu'\] must be a finite size"):
        checked_resources({"gpu": float("inf")}, "requires of job 'x'")
    with pytest.raises(InvalidInputError, match="resources: resource name 'GPU'"):
        WorkerOptions(resources={"GPU": 1})
    assert WorkerOptions(resources="gpu=1").resources == {"gpu": 1.0} and WorkerOptions().resources == {}


def test_bad_requirements_are_refused_on_push(driver):
    with pytest.raises(InvalidInputError, match="requires of job 'x'"):
        driver.push(Job("x", requires={"gpu!": 1}))
    with pytest.raises(InvalidInputError, match="requires of task 'test_resources.bad'"):
        task(name="test_resources.bad", requires=["gpu"])(lambda payload: None)


NEEDS = {"plain": None, "gpu1": {"gpu": 1}, "gpu2": {"gpu": 2}, "mem": {"mem": "64G"},
         "gpu_mem": {"gpu": 1, "mem": "1G"}, "tpu": {"tpu": 1}, "gpu_tpu": {"gpu": 1, "tpu": 1}}


@pytest.mark.parametrize("resources, claimable", [
    (None, {"plain"}),
    ({"gpu": 1.0, "mem": 64.0 * GIB}, {"plain", "gpu1", "mem", "gpu_mem"}),
    ({"gpu": 0.0, "mem": 64.0 * GIB}, {"plain", "mem"}),  # its GPU is busy
    ({"gpu": 2.0}, {"plain", "gpu1", "gpu2"}),
    ({"tpu": 1.0, "gpu": 1.0}, {"plain", "gpu1", "tpu", "gpu_tpu"}),
])
def test_the_claim_statement_takes_only_what_the_resources_cover(driver, resources, claimable):
    ids = {label: driver.push(Job("test.noop", label, requires=needs)) for label, needs in NEEDS.items()}
    assert driver.get_job(ids["mem"]).requires == {"mem": 64.0 * GIB}
    rows = driver.store.claim(driver.worker_id, 100, "default", resources)
    assert {row["payload"].strip('"') for row in rows} == claimable


def test_two_workers_one_with_a_gpu(driver, db_url, table_name, runs_table):
    """Every GPU job runs on the GPU worker, one at a time beside its CPU jobs; CPU jobs go to both."""
    gpu_jobs = [isolation_jobs.gpu.job({"n": 1000 + n, "url": db_url, "runs": runs_table, "sleep": 0.02})
                for n in range(20)]
    # The CPU jobs begin with a meeting of both workers, so each surely runs some of them.
    cpu_jobs = [Job("test.meet", {"n": n, "url": db_url, "runs": runs_table, "parties": 2}) for n in range(8)]
    driver.push_many(cpu_jobs + gpu_jobs + [Job("test.noop", n) for n in range(300)])
    command = [sys.executable, "-m", "kronix_data.cli", "--db", db_url, "--table", table_name, "worker",
               "-m", "worker_jobs", "-m", "isolation_jobs", "-c", "4"]
    # The GPU worker runs until every job is final, then is stopped: in burst mode it once left (1 run in
    # about 10, see the issue 16 note) while GPU jobs were still pending, a fault of burst mode's exit
    # test with resources that this test does not prove; the CPU worker is a burst worker.
    terminals = [subprocess.Popen(command + ["--resources", "gpu=1,mem=64G"], cwd=TESTS, stderr=subprocess.PIPE,
                                  text=True),
                 subprocess.Popen(command + ["--burst"], cwd=TESTS, stderr=subprocess.PIPE, text=True)]
    try:
        wait_until(lambda: set(driver.jobs(limit=1000)["status"]) == {"completed"}, 180, "every job to complete")
    finally:
        terminals[0].send_signal(signal.SIGTERM)
    outputs = [terminal.communicate(timeout=180)[1] for terminal in terminals]
    assert [terminal.returncode for terminal in terminals] == [0, 0], outputs
    jobs = driver.jobs(limit=1000)
    runs = fetch_runs(db_url, runs_table)
    gpu_runs = sorted((started, ended, pid) for job, pid, started, ended in runs if job >= 1000)
    assert len(gpu_runs) == 20 and {pid for _, _, pid in gpu_runs} == {terminals[0].pid}
    assert all(later[0] >= earlier[1] for earlier, later in zip(gpu_runs, gpu_runs[1:])), "two GPU jobs at once"
    cpu_pids = {pid for job, pid, _, _ in runs if job < 1000}
    assert cpu_pids == {terminals[0].pid, terminals[1].pid}  # the meeting: CPU jobs ran on both, by construction
    # (Who takes the 300 no-ops is a race: one worker may claim them all ahead while the other is still meeting.)


def test_a_job_no_live_worker_can_run_shows_in_the_stats(driver, db_url, table_name):
    driver.push(Job("test.noop", 1, requires={"tpu": 1}))
    driver.push(Job("test.noop", 2, requires={"gpu": 1}, queue="other"))
    driver.push(Job("test.noop", 3, requires={"gpu": 1}))
    stats = driver.fetch_stats().set_index("queue")
    assert stats.loc["default", "unrunnable"] == 2 and stats.loc["other", "unrunnable"] == 1  # no worker at all
    worker = Worker(driver, queues=["other", "elsewhere"], resources={"gpu": 1}).start()
    try:
        wait_until(lambda: (driver.workers()["state"] == "live").any(), 30, "the worker to register")
        assert driver.workers()["resources"].iloc[0] == {"gpu": 1.0}
        wait_until(lambda: driver.get_job(driver.jobs(queue="other")["id"].iloc[0]).status.finished, 30,
                   "the GPU job of queue other to run")
        stats = driver.fetch_stats().set_index("queue")
        # The GPU worker does not serve "default": both of its jobs still wait for ever.
        assert stats.loc["default", "unrunnable"] == 2 and stats.loc["other", "unrunnable"] == 0
    finally:
        worker.stop()
    shown = kronix("stats", "--db", db_url, "--table", table_name, "--json", cwd=TESTS)
    assert shown.returncode == 0, shown.stderr
    assert {record["queue"]: record["unrunnable"] for record in json.loads(shown.stdout)} == {"default": 2, "other": 0}


def test_kronix_worker_names_a_bad_resources_option(tmp_path):
    done = kronix("worker", "--db", f"sqlite:///{tmp_path / 'q.db'}", "--resources", "gpu", "--burst", cwd=TESTS)
    assert done.returncode == 2 and "--resources: resources: 'gpu' is not NAME=AMOUNT" in done.stderr


def test_kronix_workers_shows_each_workers_resources(driver, db_url, table_name):
    worker = Worker(driver, resources="gpu=1,mem=64G").start()
    try:
        wait_until(lambda: (driver.workers()["state"] == "live").any(), 30, "the worker to register")
        shown = kronix("workers", "--db", db_url, "--table", table_name, cwd=TESTS)
        listed = kronix("workers", "--db", db_url, "--table", table_name, "--json", cwd=TESTS)
    finally:
        worker.stop()
    assert shown.returncode == 0, shown.stderr
    assert "resources" in shown.stdout.splitlines()[0] and "gpu=1,mem=64G" in shown.stdout
    assert json.loads(listed.stdout)[0]["resources"] == {"gpu": 1.0, "mem": 64.0 * GIB}
