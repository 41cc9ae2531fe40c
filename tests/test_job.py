"""The plain-data job model: ids, JSON encoding, validation."""

from __future__ import annotations

import pytest

from kronix_data import Job, JobStatus, RetryPolicy
from kronix_data.job import decode_json, encode_payload, new_job_id


def test_ids_are_unique_and_sort_in_creation_order():
    ids = [new_job_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(job_id) == 32 for job_id in ids)


def test_payloads_encode_as_strict_json_and_round_trip():
    job = Job("n", {"a": [1, 2.5, None, True], "ü": "✓"})
    assert decode_json(encode_payload(job)) == job.payload


def test_deeply_nested_payloads_are_refused_with_the_jobs_name():
    payload: list = []
    for _ in range(100_000):
        payload = [payload]
    with pytest.raises(ValueError, match="'deep'"):
        encode_payload(Job("deep", payload))


def test_status_values_are_the_seeds_text():
    assert [status.value for status in JobStatus] == ["pending", "processing", "completed", "failed",
                                                         "waiting", "cancelled"]
    assert str(JobStatus.FAILED) == "failed"


def test_plain_jobs_have_nothing_to_handle():
    with pytest.raises(NotImplementedError, match="'etl.x'"):
        Job("etl.x").handle()


def test_retry_delays_grow_exponentially_up_to_the_cap_even_after_thousands_of_attempts():
    policy = RetryPolicy(delay=1.0, backoff=2.0, max_delay=60.0, jitter=0.0)
    assert [policy.delay_after(attempt) for attempt in (1, 2, 3, 7, 8, 5000)] == [1, 2, 4, 60, 60, 60]
    jittered = RetryPolicy(delay=10.0, jitter=0.25)
    assert all(7.5 <= jittered.delay_after(1) <= 12.5 for _ in range(200))
