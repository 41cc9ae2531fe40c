"""Worker processes on this machine, for users without a cluster.

``start_local_workers(driver, 4, modules=["my_jobs"])`` from a notebook starts
four ``Worker`` processes against the driver's database and table; ``stop()``
sends them SIGTERM (graceful) and kills any that outlive the timeout.
Processes are spawned fresh, so job functions must live in importable modules
(``modules``), not only in the notebook.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import sys
from typing import Any

from .driver import DatabaseQueueDriver
from .errors import InvalidInputError
from .worker_options import WorkerOptions

log = logging.getLogger(__name__)


def _worker_process(url: str, table: str, modules: list[str], path: list[str], options: dict[str, Any]) -> None:
    """Entry point of one spawned worker process."""
    from .worker import Worker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s %(message)s")
    sys.path[:0] = [entry for entry in path if entry not in sys.path]
    for module in modules:
        importlib.import_module(module)
    driver = DatabaseQueueDriver(url, table=table)
    Worker(driver, **options).run()


class LocalWorkers:
    """A group of local worker processes; also a context manager that stops them."""

    def __init__(self, driver: DatabaseQueueDriver, processes: int = 2, *, modules: tuple[str, ...] = (),
                 **worker_options: Any):
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise InvalidInputError(f"processes must be an int >= 1, got {processes!r}")
        WorkerOptions(**worker_options)  # a bad option fails here, not in every child
        self.url = driver.store.url_with_password
        self.table = driver.table_name
        self.modules = list(modules)
        self.worker_options = worker_options
        self.count = processes
        self.processes: list[multiprocessing.Process] = []

    def __repr__(self) -> str:
        return f"LocalWorkers({len(self.alive())}/{self.count} alive, pids={self.pids})"

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def alive(self) -> list[multiprocessing.Process]:
        return [process for process in self.processes if process.is_alive()]

    def start(self) -> LocalWorkers:
        context = multiprocessing.get_context("spawn")
        path = [os.getcwd(), *sys.path]
        for _ in range(self.count):
            process = context.Process(target=_worker_process, daemon=False,
                                      args=(self.url, self.table, self.modules, path, self.worker_options))
            process.start()
            self.processes.append(process)
        return self

    def join(self, timeout: float | None = None) -> None:
        """Wait for the processes to end by themselves (burst workers do)."""
        for process in self.processes:
            process.join(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker, wait up to ``timeout`` for them, then kill the rest."""
        for process in self.alive():
            process.terminate()
        for process in self.processes:
            process.join(timeout)
            if process.is_alive():
                log.warning("worker process %s did not stop within %ss; killing it", process.pid, timeout)
                process.kill()
                process.join()

    def __enter__(self) -> LocalWorkers:
        return self if self.processes else self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def start_local_workers(driver: DatabaseQueueDriver, processes: int = 2, *, modules: tuple[str, ...] = (),
                        **worker_options: Any) -> LocalWorkers:
    """Start ``processes`` local worker processes on ``driver``'s database and table.

    ``worker_options`` go to :class:`~kronix_data.Worker` (queues, concurrency,
    burst, lease_timeout...).
    """
    return LocalWorkers(driver, processes, modules=modules, **worker_options).start()
