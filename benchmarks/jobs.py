"""What a latency job does in every system: record when it was pushed and when it started.

Each system registers its no-op and latency jobs under its own API (see
``systems/``); they do the same everywhere, so the figures compare the queues
and not the jobs.  Nothing here imports a queue library, so worker processes
of one system never load another's.
"""

from __future__ import annotations

import os
import time

#: Where latency jobs append "sent started" lines (set in the worker processes' environment).
LATENCY_FILE_ENV = "KRONIX_BENCH_LATENCY_FILE"


def record_start(sent: float) -> None:
    """Append when the job was pushed and when it started (wall clock, shared by processes)."""
    started = time.time()
    with open(os.environ[LATENCY_FILE_ENV], "a", encoding="ascii") as file:
        file.write(f"{sent!r} {started!r}\n")
