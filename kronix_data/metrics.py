"""Prometheus metrics of one worker, served over HTTP by ``kronix worker --metrics-port PORT``.

The worker's counters are read from its ``WorkerStats`` at scrape time (the
worker itself knows nothing of Prometheus), and the queue gauges from
``driver.queues()`` then too, so a scrape costs one small grouped count and
nothing is polled between scrapes.  Each worker has its own
``CollectorRegistry``: never prometheus_client's global one, so two workers in
one process (tests, notebooks) never see each other's numbers.

Metric names (see the README):

``kronix_worker_jobs_claimed_total``, ``..._completed_total``, ``..._failed_total``
(dead-lettered), ``..._retried_total``, ``..._timed_out_total``, ``..._cancelled_total``,
``kronix_worker_database_errors_total``, ``kronix_worker_job_run_seconds`` (histogram),
``kronix_worker_info`` (labels ``worker_id``, ``queues``, ``concurrency``), and the gauges
``kronix_queue_jobs`` (labels ``queue``, ``status``), ``kronix_queue_paused`` (label ``queue``)
and ``kronix_queue_up`` (1 when the last scrape could read the queue, else 0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from .job import JobStatus

log = logging.getLogger(__name__)

#: WorkerStats field -> (counter name without ``_total``, help text).
COUNTERS = {
    "claimed": ("kronix_worker_jobs_claimed", "Jobs this worker claimed (each attempt counts)."),
    "completed": ("kronix_worker_jobs_completed", "Jobs this worker completed."),
    "dead_lettered": ("kronix_worker_jobs_failed", "Jobs this worker moved to the dead letters (attempts used up)."),
    "retried": ("kronix_worker_jobs_retried", "Failed attempts this worker gave back for a retry."),
    "timed_out": ("kronix_worker_jobs_timed_out", "Attempts that ran past their job's timeout."),
    "cancelled": ("kronix_worker_jobs_cancelled", "Running jobs this worker recorded as cancelled."),
    "database_errors": ("kronix_worker_database_errors", "Database errors this worker rode out (it backs off and retries)."),
}


class WorkerCollector:
    """A prometheus_client collector over one worker and its queue table."""

    def __init__(self, worker: Any):
        self.worker = worker

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from .worker import RUN_TIME_BOUNDS

        stats, options = self.worker.stats, self.worker.options
        for field, (name, text) in COUNTERS.items():
            yield CounterMetricFamily(name, text, value=getattr(stats, field))
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, RUN_TIME_BOUNDS), "+Inf"], list(stats.run_time_counts)):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("kronix_worker_job_run_seconds", "Run time of each attempt this worker ran.",
                                    buckets=buckets, sum_value=stats.run_time_sum)
        info = GaugeMetricFamily("kronix_worker_info", "This worker: its id, queues and concurrency (always 1).",
                                 labels=["worker_id", "queues", "concurrency"])
        info.add_metric([self.worker.driver.worker_id, ",".join(options.queues), str(options.concurrency)], 1)
        yield info
        yield from self._queue_gauges()

    def _queue_gauges(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("kronix_queue_up", "1 if this scrape could read the queue table, else 0.")
        try:
            queues = self.worker.driver.queues()
        except Exception as error:  # noqa: BLE001 - a scrape must answer even when the database does not
            log.warning("metrics: cannot read the queues: %s", str(error).splitlines()[0] if str(error) else error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("kronix_queue_jobs", "Jobs of each queue by status (the table's, the same from "
                                 "every worker of it).", labels=["queue", "status"])
        paused = GaugeMetricFamily("kronix_queue_paused", "1 if the queue is paused for every worker.",
                                   labels=["queue"])
        statuses = [status.value for status in JobStatus]
        for row in queues.to_dict(orient="records"):
            for status in statuses:
                jobs.add_metric([row["queue"], status], float(row[status]))
            paused.add_metric([row["queue"]], 1.0 if row["paused"] else 0.0)
        yield jobs
        yield paused


def serve_metrics(worker: Any, port: int, host: str = "127.0.0.1") -> tuple[Any, Any]:
    """Serve ``worker``'s metrics at ``http://host:port/metrics`` from a daemon thread, on a registry of
    its own; returns ``(server, thread)`` (``server.shutdown()`` stops it).  Port 0 picks a free one:
    ``server.server_port`` says which."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker))
    return start_http_server(port, addr=host, registry=registry)
