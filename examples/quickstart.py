"""Quickstart: push chunks of an ETL job, work them, and look at the stats as DataFrames.

Runs on a SQLite file (nothing to install).  Pass a database URL as the first
argument to run it on PostgreSQL or MariaDB instead.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from kronix_data import DatabaseQueueDriver, Job


class CleanChunk(Job):
    """Sum the valid amounts of one chunk of rows; a chunk with bad data raises."""

    def handle(self):
        rows = pd.DataFrame(self.payload["rows"])
        if rows["amount"].lt(0).any():
            raise ValueError(f"negative amount in chunk {self.payload['chunk']}")
        return {"chunk": self.payload["chunk"], "total": float(rows["amount"].sum()), "rows": len(rows)}


def main(url: str) -> None:
    driver = DatabaseQueueDriver(url, table="kronix_quickstart")
    driver.drop_table()  # start each run from an empty queue, so the figures are this run's
    driver.create_table()
    driver.register_job_factory("etl.clean", lambda payload: CleanChunk("etl.clean", payload, max_retries=1))

    # A generated sales table cut into chunks of 1,000 rows; two chunks hold bad rows.
    rng = np.random.default_rng(7)
    sales = pd.DataFrame({"order": np.arange(50_000), "amount": rng.gamma(2.0, 30.0, 50_000).round(2)})
    sales.loc[[12_345, 40_001], "amount"] = -1.0
    chunks = [sales.iloc[start:start + 1_000] for start in range(0, len(sales), 1_000)]
    ids = driver.push_many(CleanChunk("etl.clean", {"chunk": n, "rows": chunk.to_dict("list")}, max_retries=1)
                           for n, chunk in enumerate(chunks))
    print(f"pushed {len(ids)} chunk jobs to {driver!r}")

    # Work the queue in this process: claim a batch, run it, finish each job.
    while jobs := driver.pop_many(10):
        for job in jobs:
            try:
                job.result = job.handle()
            except Exception as error:  # a job's failure is data, not a crash
                job.last_error = f"{type(error).__name__}: {error}"
                if job.attempts > job.max_retries:
                    driver.fail(job)
                else:
                    driver.release(job)
            else:
                driver.complete(job)

    pd.set_option("display.width", 160)
    print("\nfetch_stats():")
    print(driver.fetch_stats().to_string(index=False))
    print("\ndead_letter_jobs():")
    print(driver.dead_letter_jobs()[["id", "name", "attempts", "last_error"]].to_string(index=False))
    results = [driver.get_job(job_id).result for job_id in ids]
    totals = pd.DataFrame([result for result in results if result is not None])
    print(f"\nsum of amounts over {int(totals['rows'].sum()):,} good rows: {totals['total'].sum():,.2f}")
    driver.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{Path(tempfile.gettempdir()) / 'kronix_quickstart.db'}")
