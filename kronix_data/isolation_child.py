"""The child process of one process-pool slot: runs jobs one after another, until its pipe closes.

Started by :mod:`kronix_data.isolation` as ``python -m kronix_data.isolation_child``.
It speaks JSON lines on its own copies of stdin and stdout (the job's ``print``
goes to stderr, so it cannot break the protocol):

- in: ``{"path": [...]}`` once (the worker's ``sys.path``), answered ``{"ready": pid}``;
- in: ``{"task", "module", "payload", "job"}`` per job, ``payload`` the stored JSON text;
- out: ``{"ok": true, "result": text}`` (the JSON text that will be stored), or
  ``{"ok": false, "type", "message", "traceback"}``.

The task is imported by its module's name, as a worker imports it; no data
crosses pickled: the payload and the result are the JSON text of the table.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import inspect
import json
import os
import signal
import sys
import traceback
from typing import Any, BinaryIO


def _protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """Keep stdin/stdout for the protocol; the job sees /dev/null and stderr instead."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return requests, replies


def _die_with_the_worker() -> None:
    """On Linux, be killed when the worker thread that started us ends (kill -9 of the worker)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the closed pipe ends us after the running job
        pass


def _no_core_dumps() -> None:
    """An aborted job should not leave a core file per crash in the worker's directory."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass


def run_job(request: dict[str, Any]) -> dict[str, Any]:
    """Run one job; its failure is data, as on a worker thread."""
    from .context import JobContext, running
    from .job import encode_result
    from .tasks import find_task

    try:
        importlib.import_module(request["module"])
        task = find_task(request["task"])
        if task is None:
            raise LookupError(f"no task {request['task']!r} is registered after importing {request['module']!r}")
        payload = json.loads(request["payload"]) if request["payload"] is not None else None
        if request.get("parquet") is not None:  # a DataFrame chunk's Parquet bytes, read by pyarrow in as_frame
            payload["parquet"] = base64.b64decode(request["parquet"])
        job = task.job(payload, **request["job"])
        with running(JobContext(job, None)):
            job.result = job.handle()
            if inspect.iscoroutine(job.result):
                job.result = asyncio.run(job.result)
        if type(job.result).__name__ == "DataFrame":  # as Parquet bytes; the worker checks their size
            from .columnar import encode_job_result

            result = encode_job_result(job, lambda size, what: None)
            return {"ok": True, "result": result, "data": base64.b64encode(job.result_data).decode("ascii")}
        return {"ok": True, "result": encode_result(job)}
    except Exception as error:  # noqa: BLE001 - sent to the worker, which records it
        return {"ok": False, "type": type(error).__name__, "message": str(error),
                "traceback": "".join(traceback.format_exception(error))}


def main() -> None:
    requests, replies = _protocol_streams()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the worker's terminal: the worker decides
    _die_with_the_worker()
    _no_core_dumps()

    def reply(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        replies.flush()

    hello = json.loads(requests.readline() or "{}")
    sys.path[:] = hello.get("path", sys.path)
    reply({"ready": os.getpid()})
    for line in requests:
        reply(run_job(json.loads(line)))


if __name__ == "__main__":
    main()
