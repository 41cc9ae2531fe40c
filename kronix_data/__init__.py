"""kronix-data: a job queue in your SQL database, with stats and failures as DataFrames."""

from .batches import Batch, enqueue_chunks
from .chunking import as_frame
from .context import JobContext, current_job
from .driver import DatabaseQueueDriver
from .errors import DatabaseUnavailableError, InvalidInputError, KronixError, NotFoundError, NotHeldError
from .job import Job, JobStatus, RetryPolicy
from .local import LocalWorkers, start_local_workers
from .store import JobStore
from .tasks import Task, task
from .worker import Worker, WorkerStats
from .worker_options import WorkerOptions

__all__ = ["Batch", "DatabaseQueueDriver", "DatabaseUnavailableError", "InvalidInputError", "Job", "JobContext",
           "JobStatus",
           "JobStore", "KronixError", "LocalWorkers", "NotFoundError", "NotHeldError", "RetryPolicy", "Task",
           "Worker", "WorkerOptions", "WorkerStats", "as_frame", "current_job", "enqueue_chunks", "start_local_workers", "task"]
__version__ = "0.1.0"
