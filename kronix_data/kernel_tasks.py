"""Tasks defined in a notebook cell (or a script's ``__main__``), sent to the local workers its kernel started.

A worker process cannot import ``__main__`` of a kernel, so such a task travels
by value (cloudpickle) from the kernel to the workers ``start_local_workers``
started, and only there:

- **Over a private channel.**  Each worker gets one end of a
  ``socket.socketpair()``: an unnamed Unix socket the child inherits as a file
  descriptor (``pass_fds``).  It has no path and no port, so no other process on
  the machine can connect to it; there is nothing to guard with a secret.
- **Never through the database.**  The row holds only the task's name, as for any
  job.  A worker unpickles nothing but what its own kernel sent on that channel,
  so a row still cannot make a worker run code (``tests/test_security.py``).
- **The current version.**  After a claim, for the names it has no module task
  for, the worker asks its kernel once, telling it the hash of what it holds; the
  kernel cloudpickles its current definition and answers "same" or sends the
  new bytes.  Asking *after* the claim is what makes a redefined cell win: the
  cell re-registers the task before ``retry_failures()`` makes the rows
  claimable, so any question asked after the claim gets the new function.  The
  kernel pickles afresh at each question (about 0.1 ms for a small function), so a
  changed global the function reads counts as a new version too.

Tasks from modules never travel: a worker runs them only if it imports the
module (``modules=``, ``-m``), as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from .tasks import Task, find_task

log = logging.getLogger(__name__)


def kernel_name() -> str:
    """How a worker names the kernel that started it: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def defined_in_main(task: Task) -> bool:
    """A task whose function lives in ``__main__``: a notebook cell or the script being run."""
    return getattr(task.function, "__module__", None) == "__main__"


def _send_json(connection: Connection, document: Any) -> None:
    connection.send_bytes(json.dumps(document).encode())


def _receive_json(connection: Connection) -> Any:
    return json.loads(connection.recv_bytes())


class KernelTaskServer:
    """The kernel's side of one worker's channel: answers its questions on a daemon thread.

    The first message tells the worker who its kernel is and the worker options
    (JSON); then each question is ``{"tasks": {name: hash or null}}`` and each
    answer ``{name: null | {"hash": h} | {"hash": h, "blob": n} | {"error": text}}``
    followed by the ``n`` new cloudpickled tasks.
    """

    def __init__(self, channel: socket.socket, hello: dict[str, Any]):
        self._socket = channel  # kept, to shut it down: that wakes the thread blocked reading it
        self.connection = Connection(os.dup(channel.fileno()))
        self.hello = hello
        self.thread = threading.Thread(target=self._serve, name="kronix-kernel-tasks", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            _send_json(self.connection, self.hello)
            while True:
                self._answer(_receive_json(self.connection)["tasks"])
        except (EOFError, OSError):  # the worker ended (or close() was called)
            pass
        finally:
            self.close()

    def _answer(self, known: dict[str, str | None]) -> None:
        answers: dict[str, Any] = {}
        blobs: list[bytes] = []
        for name, held in known.items():
            task = find_task(name)
            if task is None or not defined_in_main(task):
                answers[name] = None
                continue
            try:
                blob = cloudpickle.dumps(task)
            except Exception as error:  # noqa: BLE001 - e.g. a global the function reads cannot be pickled
                answers[name] = {"error": f"task {name!r} cannot be sent to the local workers: "
                                          f"{type(error).__name__}: {error}"}
                continue
            digest = hashlib.sha256(blob).hexdigest()
            answers[name] = {"hash": digest}
            if digest != held:
                answers[name]["blob"] = len(blobs)
                blobs.append(blob)
        _send_json(self.connection, answers)
        for blob in blobs:
            self.connection.send_bytes(blob)

    def close(self) -> None:
        """End the channel (the worker then sees its kernel gone); idempotent."""
        for end in (lambda: self._socket.shutdown(socket.SHUT_RDWR), self._socket.close, self.connection.close):
            try:
                end()
            except OSError:
                pass


class KernelTasks:
    """A local worker's side of its channel: the ``__main__`` tasks of the kernel that started it."""

    def __init__(self, fd: int):
        self.connection = Connection(fd)
        hello = _receive_json(self.connection)
        #: The kernel that started this worker (host:pid) and the options it chose.
        self.kernel: str = hello["kernel"]
        self.options: dict[str, Any] = hello["options"]
        self.gone = False
        self._held: dict[str, tuple[str, Task]] = {}
        self._lock = threading.Lock()

    def factories(self, names: Iterable[str]) -> dict[str, Callable[[Any], Any]]:
        """A job factory per name the kernel has a ``__main__`` task for (one round trip for them all);
        a name it cannot send gets a factory that raises why, so its row is dead-lettered with the reason."""
        names = sorted(names)
        with self._lock:
            try:
                answers = self._ask(names)
            except (EOFError, OSError):
                self.gone = True
                answers = {name: {"error": f"the kernel that started this worker ({self.kernel}) is gone, "
                                           f"so its notebook tasks are too"} for name in names}
        found: dict[str, Callable[[Any], Any]] = {}
        for name, answer in answers.items():
            if answer is None:
                continue
            if "error" in answer:
                found[name] = _refusing(LookupError(answer["error"]))
            else:
                found[name] = self._held[name][1].job
        return found

    def watch(self, on_gone: Callable[[], None], interval: float = 0.5) -> threading.Thread:
        """Call ``on_gone`` once the kernel is gone (it exited, was restarted or killed), from a daemon thread.

        The kernel never speaks unasked, so its end readable between two questions means it closed.
        """
        def run() -> None:
            while True:
                with self._lock:
                    if self.gone or self.connection.poll(0):
                        self.gone = True
                        break
                threading.Event().wait(interval)
            on_gone()

        thread = threading.Thread(target=run, name="kronix-kernel-watch", daemon=True)
        thread.start()
        return thread

    def _ask(self, names: list[str]) -> dict[str, Any]:
        if self.gone:
            raise EOFError
        _send_json(self.connection, {"tasks": {name: self._held.get(name, (None,))[0] for name in names}})
        answers = _receive_json(self.connection)
        blobs = [self.connection.recv_bytes() for answer in answers.values() if answer and "blob" in answer]
        for name, answer in answers.items():
            if answer and "blob" in answer:
                try:
                    task = cloudpickle.loads(blobs[answer["blob"]])  # bytes from our own kernel, never a row
                except Exception as error:  # noqa: BLE001 - e.g. it needs a module this process lacks
                    answers[name] = {"error": f"task {name!r} from kernel {self.kernel} cannot be loaded here: "
                                              f"{type(error).__name__}: {error}"}
                    continue
                log.info("task %r from kernel %s (version %s)", name, self.kernel, answer["hash"][:12])
                self._held[name] = (answer["hash"], task)
        return answers


def _refusing(error: Exception) -> Callable[[Any], Any]:
    def factory(_payload: Any) -> Any:
        raise error
    return factory
