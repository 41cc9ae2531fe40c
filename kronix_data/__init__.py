"""kronix-data: a job queue in your SQL database, with stats and failures as DataFrames."""

from .batches import Batch
from .chunking import as_frame, enqueue_chunks
from .driver import DatabaseQueueDriver
from .local import LocalWorkers, start_local_workers
from .job import Job, JobStatus, RetryPolicy
from .tasks import Task, task
from .worker import Worker, WorkerStats

__all__ = ["Batch", "DatabaseQueueDriver", "Job", "LocalWorkers", "JobStatus", "RetryPolicy", "Task", "Worker",
           "WorkerStats", "as_frame", "enqueue_chunks", "start_local_workers", "task"]
__version__ = "0.1.0"
