"""kronix-data: a job queue in your SQL database, with stats and failures as DataFrames."""

from importlib import metadata as _metadata

try:  # the installed distribution's version: pyproject.toml's, the one place it is written
    __version__ = _metadata.version("kronix-data")
except _metadata.PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

from .batches import Batch, enqueue_chunks
from .chunking import as_frame
from .context import JobContext, current_job
from .driver import DatabaseQueueDriver
from .errors import (DatabaseUnavailableError, InvalidInputError, KronixError, MissingDriverError, NotFoundError,
                     NotHeldError)
from .job import Job, JobStatus, RetryPolicy
from .local import LocalWorkers, start_local_workers
from .slices import FrameSlices, frame_slices
from .snooze import Snooze
from .store import JobStore
from .tasks import Task, task
from .worker import Worker, WorkerStats
from .worker_options import WorkerOptions

__all__ = ["Batch", "DatabaseQueueDriver", "DatabaseUnavailableError", "InvalidInputError", "Job", "JobContext",
           "JobStatus", "JobStore", "KronixError", "LocalWorkers", "MissingDriverError", "NotFoundError",
           "NotHeldError", "RetryPolicy", "Task", "Worker", "WorkerOptions", "WorkerStats", "as_frame", "current_job",
           "enqueue_chunks", "start_local_workers", "task"]
# Progress and checkpoints: slicing a DataFrame chunk with a checkpoint after each slice.
__all__ += ["FrameSlices", "frame_slices"]
# Schedules and snooze: a task that asks to run again later without failing.
__all__ += ["Snooze"]

# Async tasks, process isolation and resources (issue 16).
from .errors import WorkerCrash  # noqa: E402
__all__ += ["WorkerCrash"]
