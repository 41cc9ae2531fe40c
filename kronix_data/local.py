"""Worker processes on this machine, for users without a cluster.

``start_local_workers(driver, 4)`` from a notebook or a script starts four
``Worker`` processes against the driver's database and table; ``stop()``
sends them SIGTERM (graceful) and kills any that outlive the timeout.

Each worker is a fresh interpreter, ``python -m kronix_data worker``, not a
multiprocessing child: it never runs the caller's script again, so a script
needs no ``if __name__ == "__main__":`` guard (multiprocessing's spawn re-ran
the whole script in every worker, ``drop_table()`` lines and all).  Job
functions come from the ``modules`` each worker imports and, for tasks defined
in the caller's ``__main__`` (a notebook cell, the script), over a private
channel from this process (kronix_data.kernel_tasks).  A worker whose
caller has gone (it exited, or its kernel was restarted or killed) stops by
itself, as on SIGTERM, so no orphan workers are left behind.  The database URL goes
to the workers in their environment, not on their command line, where ``ps``
would show its password to every user of the machine.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
from typing import Any

from .driver import DatabaseQueueDriver
from .errors import InvalidInputError
from .kernel_tasks import KernelTaskServer, kernel_name
from .worker_options import WorkerOptions

log = logging.getLogger(__name__)


class LocalProcess:
    """One local worker process, with the parts of ``multiprocessing.Process`` callers use."""

    def __init__(self, popen: subprocess.Popen, channel: KernelTaskServer):
        self.popen = popen
        self.channel = channel

    def __repr__(self) -> str:
        return f"LocalProcess(pid={self.pid}, exitcode={self.exitcode})"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        """None while it runs; its exit status, or ``-N`` if signal N ended it."""
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for it to end (None: for ever); returns either way."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return
        self.channel.close()

    def terminate(self) -> None:
        if self.is_alive():
            self.popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()


class LocalWorkers:
    """A group of local worker processes; also a context manager that stops them."""

    def __init__(self, driver: DatabaseQueueDriver, processes: int = 2, *, modules: tuple[str, ...] = (),
                 **worker_options: Any):
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise InvalidInputError(f"processes must be an int >= 1, got {processes!r}")
        unknown = sorted(set(worker_options) - set(WorkerOptions.names()))
        if unknown:
            raise InvalidInputError(f"unknown worker option {unknown[0]!r}; the options are "
                                    f"{', '.join(WorkerOptions.names())}")
        #: The validated options, as every worker gets them (a bad one fails here, not in every child).
        self.options = WorkerOptions(**worker_options)
        self.url = driver.store.url_with_password
        self.table = driver.table_name
        self.modules = list(modules)
        self.worker_options = worker_options
        self.count = processes
        self.processes: list[LocalProcess] = []

    def __repr__(self) -> str:
        return f"LocalWorkers({len(self.alive())}/{self.count} alive, pids={self.pids})"

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def alive(self) -> list[LocalProcess]:
        return [process for process in self.processes if process.is_alive()]

    def command(self, channel_fd: int) -> list[str]:
        """The command line of one worker (no password in it)."""
        modules = [argument for module in self.modules for argument in ("-m", module)]
        return [sys.executable, "-m", "kronix_data", "worker", "--table", self.table,
                "--local-channel", str(channel_fd), *modules]

    def environment(self) -> dict[str, str]:
        """This process's environment, with the database and this process's import path (so the
        workers import what it imports, from its working directory first, as multiprocessing did)."""
        path = [os.getcwd(), *(entry for entry in sys.path if entry)]
        return {**os.environ, "KRONIX_DATABASE_URL": self.url, "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}

    def start(self) -> LocalWorkers:
        hello = {"kernel": kernel_name(), "options": {**self.options.as_dict(), "queues": list(self.options.queues)}}
        environment = self.environment()
        for _ in range(self.count):
            ours, theirs = socket.socketpair()
            try:
                popen = subprocess.Popen(self.command(theirs.fileno()), env=environment, stdin=subprocess.DEVNULL,
                                         pass_fds=(theirs.fileno(),))
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()  # the child's now: a worker that ends closes the channel for good
            self.processes.append(LocalProcess(popen, KernelTaskServer(ours, hello)))
        atexit.register(self._at_exit)
        return self

    def _at_exit(self) -> None:
        """When the caller's interpreter ends: burst workers are waited for, as multiprocessing waited for
        its children (a script may end without ``join()``); others stop by themselves once it has gone."""
        if self.options.burst:
            self.join()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the processes to end by themselves (burst workers do)."""
        for process in self.processes:
            process.join(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker, wait up to ``timeout`` for them, then kill the rest."""
        atexit.unregister(self._at_exit)
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

    Each is ``python -m kronix_data worker`` importing ``modules``; tasks defined
    in this process's ``__main__`` (a notebook cell) run there too, sent over a
    private channel, never through the database.  ``worker_options`` go to
    :class:`~kronix_data.Worker` (queues, concurrency, burst, lease_timeout...).
    """
    return LocalWorkers(driver, processes, modules=modules, **worker_options).start()


def local_worker(driver: DatabaseQueueDriver, channel_fd: int):
    """In the worker process: the Worker its kernel asked for, with the kernel's ``__main__`` tasks."""
    from .kernel_tasks import KernelTasks
    from .tasks import use_kernel_tasks
    from .worker import Worker

    kernel = KernelTasks(channel_fd)
    use_kernel_tasks(kernel)
    worker = Worker(driver, **kernel.options)

    def kernel_gone() -> None:
        log.warning("the process that started this worker (%s) is gone: stopping", kernel.kernel)
        worker.stop(wait=False)  # as on SIGTERM: running jobs finish, unstarted ones go back

    kernel.watch(kernel_gone)
    return worker
