"""``kronix worker --metrics-port``: a real worker process on each database, scraped over HTTP, its
text parsed with prometheus_client's own parser, and every number checked against the jobs it ran
and the table's counts; each worker's registry is its own; a port that is taken is a clear error."""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import metrics_jobs
from helpers import TESTS, cli_environment, finish, free_port, kronix, start_kronix, wait_until
from kronix_data import DatabaseQueueDriver, Worker
from kronix_data.metrics import serve_metrics


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The Content-Type and every sample: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        content_type, text = response.headers["Content-Type"], response.read().decode()
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    return content_type, samples


def scraped_when(port: int, condition) -> dict:
    def attempt():
        try:
            samples = scrape(port)[1]
        except (urllib.error.URLError, ConnectionError):
            return None  # not listening yet
        return samples if condition(samples) else None
    return wait_until(attempt, 120, "the scraped metrics", interval=0.2)


def test_a_worker_process_serves_counters_a_run_time_histogram_and_queue_gauges(driver, db_url, table_name):
    driver.push_many([metrics_jobs.ok.job({"n": n}, queue="metrics") for n in range(5)]
                     + [metrics_jobs.ok.job({"n": 5, "sleep": 0.3}, queue="metrics")]
                     + [metrics_jobs.bad.job({"n": n}, queue="metrics") for n in range(3)]  # max_retries=0
                     + [metrics_jobs.flaky.job({"n": n}, queue="metrics") for n in range(2)]
                     + [metrics_jobs.ok.job({"n": n}, queue="later") for n in range(4)])
    driver.pause("later")
    port = free_port()
    process = start_kronix(["--db", db_url, "--table", table_name, "worker", "-m", "metrics_jobs", "-q", "metrics",
                            "-c", "2", "--metrics-port", str(port)], cwd=TESTS)
    try:
        samples = scraped_when(port, lambda got: got.get(("kronix_worker_jobs_completed_total", ())) == 8
                               and got.get(("kronix_worker_jobs_failed_total", ())) == 3
                               and got.get(("kronix_queue_jobs", (("queue", "metrics"), ("status", "completed")))) == 8)
        content_type, _ = scrape(port)
        assert content_type.startswith("text/plain; version=0.0.4")
        counter = lambda name: samples[(f"kronix_worker_{name}_total", ())]  # noqa: E731
        assert (counter("jobs_claimed"), counter("jobs_completed"), counter("jobs_failed"), counter("jobs_retried"),
                counter("jobs_timed_out"), counter("jobs_cancelled")) == (13, 8, 3, 2, 0, 0)  # 6 + 3 + 2 x 2 attempts
        bucket = lambda bound: samples[("kronix_worker_job_run_seconds_bucket", (("le", bound),))]  # noqa: E731
        assert samples[("kronix_worker_job_run_seconds_count", ())] == bucket("+Inf") == 13
        assert samples[("kronix_worker_job_run_seconds_sum", ())] >= 0.3
        assert bucket("0.1") <= 12 and bucket("0.5") == 13  # the 0.3 s job is between the two bounds
        info = [labels for name, labels in samples if name == "kronix_worker_info"]
        assert len(info) == 1 and dict(info[0])["queues"] == "metrics" and dict(info[0])["concurrency"] == "2"
        gauge = lambda queue, status: samples[("kronix_queue_jobs", (("queue", queue), ("status", status)))]  # noqa: E731
        table = driver.queues().set_index("queue")
        for queue in ("metrics", "later"):
            for status in ("pending", "processing", "completed", "failed", "waiting", "cancelled"):
                assert gauge(queue, status) == table.loc[queue, status], (queue, status)
        assert (gauge("metrics", "completed"), gauge("metrics", "failed"), gauge("later", "pending")) == (8, 3, 4)
        assert samples[("kronix_queue_paused", (("queue", "later"),))] == 1
        assert samples[("kronix_queue_paused", (("queue", "metrics"),))] == 0
        assert samples[("kronix_queue_up", ())] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        result = finish(process, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"metrics on http://127.0.0.1:{port}/metrics" in result.stderr
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(port)  # the server went with the worker


def test_each_worker_has_a_registry_of_its_own(tmp_path):
    with DatabaseQueueDriver(f"sqlite:///{tmp_path / 'jobs.db'}") as driver:
        driver.create_table()
        first, second = Worker(driver, queues=["a"]), Worker(driver, queues=["b"], concurrency=3)
        first.stats.completed, second.stats.completed = 5, 7
        servers = [serve_metrics(worker, 0) for worker in (first, second)]
        try:
            scraped = [scrape(server.server_port)[1] for server, _ in servers]
        finally:
            for server, _ in servers:
                server.shutdown()
                server.server_close()
    assert [samples[("kronix_worker_jobs_completed_total", ())] for samples in scraped] == [5, 7]
    assert [[dict(labels)["queues"] for name, labels in samples if name == "kronix_worker_info"]
            for samples in scraped] == [["a"], ["b"]]
    assert not any(name.startswith("kronix_") for name in prometheus_client.REGISTRY._names_to_collectors)


def test_a_metrics_port_that_is_taken_is_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with DatabaseQueueDriver(url) as driver:
        driver.create_table()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = kronix("--db", url, "worker", "--burst", "--metrics-port", str(port), cwd=tmp_path,
                        environment=cli_environment())
    assert result.returncode == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
