"""Process isolation: a job in a long-lived child process that the worker can kill.

A thread cannot be stopped and a segfault takes its whole process down; a
child process can be killed and can die alone.  Each pool thread of the
worker owns one child (:class:`ProcessSlot`), started at its first isolated
job and reused for the next ones (an interpreter start is paid once per slot,
not per job).  The thread sends the job to its child as one JSON line (the
payload as the very JSON text stored in the table, the task named so the
child imports it) and waits for the answer, watching the clock and, when the
task has a ``memory_limit``, the child's memory:

- past ``timeout``: SIGTERM, then SIGKILL ``kill_grace`` seconds later;
  recorded as ``TimeoutError: killed after N s``;
- past ``memory_limit``: SIGKILL at once; ``MemoryError: ...``;
- dead by a signal (segfault, ``os.abort()``, the kernel's OOM killer):
  ``WorkerCrash: killed by SIGSEGV``.

Then the slot starts a new child for its next job; the worker and its other
slots never notice.  The failure is retried or dead-lettered like any other.

The memory limit is enforced by polling the child's resident set size
(psutil) every :data:`MEMORY_POLL_S`, not with ``RLIMIT_AS``: address space
is not memory (a pandas import reserves far more than it touches, and glibc
gives each thread its own arena), an allocation refused under ``RLIMIT_AS``
surfaces as a ``MemoryError`` the job may catch, or as a crash in C code, and
the limit would have to be lowered and raised in a child that lives on.  RSS
is what the machine runs out of; a kill from outside cannot be caught.  The
cost is overshoot: a job may pass its limit by what it allocates in one poll
interval before it is killed.
"""

from __future__ import annotations

import base64
import builtins
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .errors import WorkerCrash
from .job import Job, encode_value
from .resources import format_size

if TYPE_CHECKING:
    from .context import JobContext

log = logging.getLogger(__name__)

#: How often a slot looks at its child's memory (and at a cancel request) while a job runs.
MEMORY_POLL_S = 0.05
#: The longest a new child may take to import kronix_data and answer.
START_TIMEOUT_S = 120.0
POOLS = ("thread", "process")


def runs_in_process(job: Job, pool: str) -> bool:
    """Whether ``job`` goes to a child: its task asks for it (isolation or a memory limit), or the pool is
    ``process`` and the task does not insist on a thread.  Only ``@task`` jobs can: the child imports
    the task by name; a ``Job`` subclass built by a driver's factory stays on its thread."""
    task = getattr(job, "task", None)
    if task is None:
        return False
    if task.isolation is not None:
        return task.isolation == "process"
    return pool == "process" or task.memory_limit is not None


class JobFailedInChild(Exception):
    """The base of the exception types a child reported that this process has no built-in for."""


def child_error(kind: str, message: str) -> BaseException:
    """An exception named as the child's was (``ValueError``, ``KeyError``, ``MyDomainError``)."""
    builtin = getattr(builtins, kind, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        try:
            return builtin(message)
        except TypeError:  # a built-in whose constructor wants more (UnicodeDecodeError)
            pass
    return type(kind, (JobFailedInChild,), {})(message)


class ProcessSlot:
    """One child process and the pipe to it; used by one pool thread at a time."""

    def __init__(self, kill_grace: float):
        self.kill_grace = kill_grace
        self._process: subprocess.Popen | None = None
        self._buffer = b""
        self.started = 0  # children started, for tests and logs

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def run(self, job: Job, context: JobContext, timeout: float | None,
            memory_limit: float | None) -> tuple[str | None, BaseException | None, str]:
        """Run ``job`` in the child: ``(result JSON, None, "")`` or ``(None, error, traceback text)``."""
        payload, data = job.payload, None
        if isinstance(payload, dict) and isinstance(payload.get("parquet"), bytes):  # a DataFrame chunk's bytes
            data, payload = payload["parquet"], {key: value for key, value in payload.items() if key != "parquet"}
        request = {"task": job.name, "module": job.task.function.__module__,
                   "payload": encode_value(payload, f"payload of job {job.name!r}"),
                   "parquet": None if data is None else base64.b64encode(data).decode("ascii"),
                   "job": {"id": job.id, "attempts": job.attempts, "queue": job.queue, "key": job.key,
                           "batch_id": job.batch_id, "priority": job.priority, "max_retries": job.max_retries}}
        if request["module"] == "__main__":
            return None, LookupError(f"task {job.name!r} is defined in __main__ (a notebook or a script): put it "
                                     "in a module the child process can import"), ""
        process = self._child()
        try:
            self._send(request)
        except OSError:  # the child died between jobs
            return None, self._crash(), ""
        deadline = time.monotonic() + timeout if timeout else None
        watched = psutil.Process(process.pid) if memory_limit else None
        while True:
            wait = MEMORY_POLL_S if deadline is None else min(MEMORY_POLL_S, max(deadline - time.monotonic(), 0))
            line = self._read_line(wait)
            if line is not None:
                if not line:
                    return None, self._crash(), ""
                return self._answer(json.loads(line), job)
            if deadline is not None and time.monotonic() >= deadline:
                self._kill(graceful=True)
                error = TimeoutError(f"killed after {timeout:g} s")
                error.kronix_timeout = True  # the worker counts it in stats.timed_out
                return None, error, ""
            if context.cancel_requested():
                self._kill(graceful=True)
                return None, WorkerCrash("killed: a cancel was asked"), ""
            if watched is not None:
                rss = _rss(watched)
                if rss > memory_limit:
                    self._kill(graceful=False)
                    return None, MemoryError(f"job used {format_size(rss)} of memory, past its memory_limit of "
                                             f"{format_size(memory_limit)}: killed"), ""

    # -- the child -------------------------------------------------------------------------------

    def _child(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        package_root = str(Path(__file__).resolve().parent.parent)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                                os.environ.get("PYTHONPATH")]))}
        self._process = subprocess.Popen([sys.executable, "-m", "kronix_data.isolation_child"], bufsize=0,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment)
        self._buffer = b""
        self.started += 1
        self._send({"path": sys.path})
        deadline = time.monotonic() + START_TIMEOUT_S
        while (line := self._read_line(max(deadline - time.monotonic(), 0))) is None:
            if time.monotonic() >= deadline:
                self._kill(graceful=False)
                raise RuntimeError(f"the job process did not start within {START_TIMEOUT_S:g} s")
        if not line:
            code = self._process.wait()
            raise RuntimeError(f"the job process exited at its start (status {code}); see its stderr")
        return self._process

    def _send(self, message: dict[str, Any]) -> None:
        self._process.stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def _read_line(self, wait: float) -> bytes | None:
        """The child's next line; b"" once it is gone; None if none came within ``wait`` seconds."""
        deadline = time.monotonic() + wait
        stdout = self._process.stdout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([stdout], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                return None
            chunk = os.read(stdout.fileno(), 1 << 16)
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _answer(self, answer: dict[str, Any], job: Job) -> tuple[str | None, BaseException | None, str]:
        if answer["ok"]:
            # A DataFrame result: its Parquet bytes (base64 on the pipe), checked and stored by the worker.
            job.result_data = base64.b64decode(answer["data"]) if answer.get("data") else None
            return answer["result"], None, ""
        return None, child_error(answer["type"], answer["message"]), answer["traceback"]

    def _crash(self) -> WorkerCrash:
        """What ended the child: the signal's name, or its exit status."""
        code = self._process.wait()
        self._process = None
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return WorkerCrash(f"killed by {name}")
        return WorkerCrash(f"the job's process exited with status {code}")

    def _kill(self, graceful: bool) -> None:
        """SIGTERM and ``kill_grace`` seconds to go, then SIGKILL (at once if not ``graceful``)."""
        process, self._process = self._process, None
        if process is None:
            return
        if graceful:
            process.terminate()
            try:
                process.wait(self.kill_grace)
                return
            except subprocess.TimeoutExpired:
                log.warning("job process %d ignored SIGTERM for %g s: SIGKILL", process.pid, self.kill_grace)
        process.kill()
        process.wait()

    def close(self) -> None:
        """End the child: its pipe closes (it exits between jobs), and it is killed if it does not."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.stdin.close()
            process.wait(1)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()


def _rss(process: psutil.Process) -> float:
    try:
        return float(process.memory_info().rss)
    except psutil.Error:  # it just ended: the read of its answer says how
        return 0.0


class ProcessSlots:
    """One :class:`ProcessSlot` per pool thread, made at its first isolated job."""

    def __init__(self, kill_grace: float):
        self.kill_grace = kill_grace
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[ProcessSlot] = []

    def for_this_thread(self) -> ProcessSlot:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = ProcessSlot(self.kill_grace)
            with self._lock:
                self._all.append(slot)
        return slot

    @property
    def children_started(self) -> int:
        with self._lock:
            return sum(slot.started for slot in self._all)

    def close(self) -> None:
        with self._lock:
            slots, self._all = self._all, []
        for slot in slots:
            slot.close()
