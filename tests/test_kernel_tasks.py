"""Tasks defined in ``__main__`` (a notebook cell, a script) run on the local workers that process started.

The function travels by cloudpickle over each worker's socketpair, never through the table: mapped over
a DataFrame on two real worker processes on each database; redefined and retried, the same processes run
the new version; a remote ``kronix worker`` says where such a task runs; the channel's own protocol
(a version sent once, a kernel that is gone).
"""

from __future__ import annotations

import os
import socket
import threading

import pandas as pd
import pytest

from helpers import cli_environment, database_url, define_in_main, kronix, status_counts, unique_table, wait_until
from kronix_data import DatabaseQueueDriver, Job, start_local_workers
from kronix_data.kernel_tasks import KernelTasks, KernelTaskServer, defined_in_main
from kronix_data.tasks import task

CELL = """
    import os
    import kronix_data

    @kronix_data.task(name="nb.clean", max_retries=0)
    def clean(payload):
        frame = kronix_data.as_frame(payload)
        if VERSION == 1 and frame["x"].max() >= 50:
            raise ValueError(f"version 1 cannot take x={frame['x'].max()}")
        return {"pid": [os.getpid()], "version": [VERSION], "total": [int((frame["x"] * 2).sum())]}
"""


def define_clean(version: int):
    return define_in_main(f"VERSION = {version}\n" + CELL.replace("\n    ", "\n"))["clean"]


def test_a_task_defined_in_main_maps_over_a_dataframe_on_two_local_workers(driver):
    clean = define_clean(2)
    assert defined_in_main(clean)
    batch = driver.map(clean, pd.DataFrame({"x": range(100)}), chunk_size=10)
    with start_local_workers(driver, 2, burst=True, concurrency=1) as workers:
        workers.join(timeout=180)

    assert [process.exitcode for process in workers.processes] == [0, 0]
    assert batch.progress()["completed"] == 10
    results = batch.results()
    assert int(results["total"].sum()) == 2 * sum(range(100))
    assert set(results["pid"]) <= set(workers.pids) and os.getpid() not in set(results["pid"])
    stored = driver.jobs(batch=batch.id)
    assert set(stored["name"]) == {"nb.clean"}  # the row holds the name; the function came over the channel


def test_redefining_the_task_and_retrying_failures_runs_the_new_version_on_the_same_workers(driver):
    clean = define_clean(1)
    batch = driver.map(clean, pd.DataFrame({"x": range(100)}), chunk_size=10)
    with start_local_workers(driver, 2, concurrency=2) as workers:
        wait_until(lambda: batch.progress()["failed"] == 5 and batch.progress()["completed"] == 5, 120,
                   "version 1 to fail the chunks with x >= 50")
        assert set(batch.failures()["error_message"].str.startswith("version 1 cannot take x=")) == {True}

        define_clean(2)  # the cell edited and run again
        assert batch.retry_failures() == 5
        wait_until(lambda: batch.progress()["completed"] == 10, 120, "the retried chunks to complete")
        assert len(workers.alive()) == 2  # the same processes: they learnt of version 2 by themselves

    results = batch.results()
    assert sorted(results["version"]) == [1] * 5 + [2] * 5
    assert set(results["pid"]) <= set(workers.pids)
    assert int(results["total"].sum()) == 2 * sum(range(100))


def test_a_remote_worker_says_a_main_task_runs_only_on_local_workers(tmp_path):
    url = database_url("sqlite", tmp_path)
    table = unique_table()
    with DatabaseQueueDriver(url, table=table) as driver:
        driver.create_table()
        unnamed = define_in_main("import kronix_data\n@kronix_data.task\ndef tidy(payload):\n    return payload\n")
        ids = driver.push_many([unnamed["tidy"].job(1), define_clean(2).job(None)])
        result = kronix("--db", url, "--table", table, "worker", "--burst", cwd=tmp_path,
                        environment=cli_environment())
        assert result.returncode == 0, result.stderr
        tidy, clean = (driver.get_job(job_id) for job_id in ids)

    assert tidy.status == clean.status == "failed"
    assert tidy.last_error.startswith(
        "LookupError: task '__main__.tidy' was defined in a notebook or a script's __main__; it runs only on "
        "workers started by start_local_workers from that kernel: put it in a module and start the worker "
        "with -m module (no task or job factory is registered for '__main__.tidy' on worker ")
    assert clean.last_error.startswith("LookupError: no task or job factory is registered for 'nb.clean' on worker ")
    assert "; if it was defined in a notebook, it runs only on workers started by start_local_workers" in clean.last_error


def test_a_task_that_cannot_be_pickled_is_dead_lettered_with_the_reason(tmp_path):
    url = database_url("sqlite", tmp_path)
    with DatabaseQueueDriver(url, table=unique_table()) as driver:
        driver.create_table()
        cell = define_in_main("import threading, kronix_data\nLOCK = threading.Lock()\n"
                              "@kronix_data.task(name='nb.locked')\ndef locked(payload):\n"
                              "    with LOCK:\n        return payload\n")
        job_id = driver.push(cell["locked"].job(1))
        with start_local_workers(driver, 1, burst=True) as workers:
            workers.join(timeout=120)
        dead = driver.get_job(job_id)
    assert dead.status == "failed"
    assert dead.last_error.startswith("could not rebuild job 'nb.locked': LookupError: task 'nb.locked' cannot be "
                                      "sent to the local workers: TypeError: cannot pickle '_thread.lock' object")


@task(name="kernel_tasks.from_a_module")
def from_a_module(payload):
    return payload


def test_the_kernel_sends_each_version_once_and_only_main_tasks():
    """The channel itself, in one process: a worker asks, the kernel answers."""
    ours, theirs = socket.socketpair()
    KernelTaskServer(ours, {"kernel": "here:1", "options": {"burst": True}})
    worker = KernelTasks(theirs.detach())
    assert (worker.kernel, worker.options) == ("here:1", {"burst": True})

    define_clean(2)
    first = worker.factories(["nb.clean", "kernel_tasks.from_a_module", "nb.nobody"])
    assert sorted(first) == ["nb.clean"]  # a module's task never travels; an unknown name is not there
    version_2 = worker._held["nb.clean"][0]
    sent = []
    original = worker.connection.recv_bytes
    worker.connection.recv_bytes = lambda: sent.append(original()) or sent[-1]
    worker.factories(["nb.clean"])
    assert len(sent) == 1  # the answer "same", and no blob
    in_kernel = define_clean(1)
    job = worker.factories(["nb.clean"])["nb.clean"](None)
    assert len(sent) == 3 and worker._held["nb.clean"][0] != version_2  # the answer and the new version
    assert job.task.function.__globals__["VERSION"] == 1
    version_1 = worker._held["nb.clean"][0]
    in_kernel.function.__globals__["VERSION"] = 3  # not redefined: a global it reads changed in the kernel
    assert worker.factories(["nb.clean"])["nb.clean"](None).task.function.__globals__["VERSION"] == 3
    assert worker._held["nb.clean"][0] != version_1

    worker.connection.close()  # as if the kernel had gone: its tasks cannot be had any more


def test_a_worker_whose_kernel_is_gone_dead_letters_its_tasks_with_the_reason():
    ours, theirs = socket.socketpair()
    server = KernelTaskServer(ours, {"kernel": "there:2", "options": {}})
    worker = KernelTasks(theirs.detach())
    server.close()
    server.thread.join(10)
    factory = worker.factories(["nb.clean"])["nb.clean"]
    with pytest.raises(LookupError, match=r"the kernel that started this worker \(there:2\) is gone"):
        factory(None)
    assert worker.gone
