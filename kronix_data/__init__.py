"""kronix-data: a job queue in your SQL database, with stats and failures as DataFrames."""

from .driver import DatabaseQueueDriver
from .job import Job, JobStatus

__all__ = ["DatabaseQueueDriver", "Job", "JobStatus"]
__version__ = "0.1.0"
