"""Worker processes that start together: spawned, connected, then released at once.

Every worker process sets itself up (imports, connections) and reports ready;
only when all are ready does the clock start and one event release them all.
Each reports when its worker returned (``time.monotonic()``, one clock for all
processes on Linux), so a drain is timed from the release until the last
worker saw the queue empty, with no start-up cost in it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback
from typing import Any

from .systems import load
from .systems.base import BenchmarkError, Options

_CONTEXT = multiprocessing.get_context("spawn")


def _worker_process(system_name: str, url: str, namespace: str, options: dict[str, Any], burst: bool,
                    env: dict[str, str], ready, release, results) -> None:
    """Entry point of one worker process (spawned: nothing is inherited but the arguments)."""
    os.environ.update(env)
    try:
        system = load(system_name)(url, namespace, Options(**options))

        def gate() -> None:
            ready.put(os.getpid())
            release.wait()

        finished = system.work(gate, burst)
        results.put({"pid": os.getpid(), "end": time.monotonic(), "finished": finished})
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put({"pid": os.getpid(), "error": traceback.format_exc()})


class WorkerGroup:
    """``processes`` worker processes of one system, started before the clock and released together."""

    def __init__(self, system, processes: int, *, burst: bool, env: dict[str, str] | None = None):
        self.system = system
        self.count = processes
        self.burst = burst
        self.env = env or {}
        self.ready = _CONTEXT.Queue()
        self.results = _CONTEXT.Queue()
        self.release_event = _CONTEXT.Event()
        self.processes: list[multiprocessing.Process] = []
        self._results: list[dict[str, Any]] = []

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the processes and wait until every one is connected and waiting."""
        arguments = (self.system.name, self.system.url, self.system.namespace, self.system.options.as_dict(),
                     self.burst, self.env, self.ready, self.release_event, self.results)
        for _ in range(self.count):
            process = _CONTEXT.Process(target=_worker_process, args=arguments, daemon=True)
            process.start()
            self.processes.append(process)
        deadline = time.monotonic() + timeout
        waiting = self.count
        while waiting:
            try:
                self.ready.get(timeout=0.2)
                waiting -= 1
            except queue.Empty:
                self._check_processes()
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"{waiting} worker processes were not ready within {timeout:g}s")

    def release(self) -> float:
        """Start the clock and release every worker; returns the start time."""
        started = time.monotonic()
        self.release_event.set()
        return started

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Wait for every worker to return (burst workers do when the queue is empty)."""
        deadline = time.monotonic() + timeout
        while len(self._results) < self.count:
            try:
                self._take(self.results.get(timeout=0.2))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"workers did not finish within {timeout:g}s "
                                         f"({len(self._results)} of {self.count} done)") from None
                self._check_processes()
        return self._results

    def stop(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """SIGTERM the workers (a graceful stop for each system) and collect what they report."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        return self.wait(timeout)

    def close(self) -> None:
        """Make sure no worker outlives the run."""
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()

    def _take(self, result: dict[str, Any]) -> None:
        if "error" in result:
            raise BenchmarkError(f"worker process {result['pid']} failed:\n{result['error']}")
        self._results.append(result)

    def _check_processes(self) -> None:
        """Take every report waiting in the pipe; fail if a process died without one."""
        # Exit codes first: a process that had exited by now has its report in the pipe already.
        exited = [process for process in self.processes if process.exitcode is not None]
        try:
            while True:
                self._take(self.results.get_nowait())
        except queue.Empty:
            pass
        reported = {result["pid"] for result in self._results}
        for process in exited:
            if process.pid not in reported:
                raise BenchmarkError(f"worker process {process.pid} exited with code {process.exitcode} "
                                     "without reporting")
