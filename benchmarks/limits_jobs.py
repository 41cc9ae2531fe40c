"""The job benchmarks/limits_cost.py's worker processes run (a module of its own: run with -m, that script
is __main__, which spawned workers import again under another name)."""

from __future__ import annotations

import time

import kronix_data


@kronix_data.task(name="bench.limits_sleep", max_retries=0)
def sleep(payload):
    time.sleep(payload)
