"""``kronix demo``: a chunked ETL run from end to end, on one machine.

A new user's first command.  It generates a sales table with a few
deliberately bad rows, enqueues it in chunks with ``driver.map``, runs local
worker processes on it while a progress bar moves, and prints what a data
person would look at next: ``fetch_stats()``, the dead letters grouped by
error type, and a summary.  The task lives in this module so that the
worker processes import it (``modules=["kronix_data.demo"]``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .chunking import as_frame
from .context import current_job
from .driver import DatabaseQueueDriver
from .errors import InvalidInputError
from .job import RetryPolicy
from .local import start_local_workers
from .tasks import task

TASK_NAME = "demo.clean_sales"
#: The table is emptied before each run, so one fixed, readable batch id will do.
BATCH_ID = "demo-sales"
#: Euros per unit of each currency the shop sells in; any other code is a bad row.
EUR_RATES = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.04, "SEK": 0.088}
STORES = np.array(["berlin", "paris", "madrid", "rome", "vienna", "warsaw", "lisbon", "dublin"])
FIRST_DAY = np.datetime64("2026-01-01T00:00:00", "s")
DAYS = 90
#: Rows aggregated between two progress reports of a chunk.
PROGRESS_ROWS = 10_000


@task(name=TASK_NAME, max_retries=1, retry=RetryPolicy(delay=0.2, backoff=1.0))
def clean_sales(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Validate one chunk of raw sales and return its orders, units and revenue in euros per month and store.

    A negative quantity raises ValueError and an unknown currency KeyError, as
    a real cleaning step would: the chunk fails, is retried once, and ends in
    the dead letters for the user to analyse.  The result is a list of
    records, so ``batch.results()`` is the concatenation of every chunk's.
    """
    sales = as_frame(payload)
    negative = sales["quantity"] < 0
    if negative.any():
        order = int(sales.loc[negative, "order_id"].iloc[0])
        raise ValueError(f"{int(negative.sum())} row(s) with a negative quantity, first in order {order}")
    rates = sales["currency"].map(EUR_RATES)
    if rates.isna().any():
        unknown = sales.loc[rates.isna()].iloc[0]
        raise KeyError(f"unknown currency {unknown['currency']!r} in order {int(unknown['order_id'])}")
    sales["month"] = sales["ordered_at"].dt.strftime("%Y-%m")
    sales["revenue_eur"] = sales["quantity"] * sales["unit_price"] * rates
    # Aggregated slice by slice, reporting the rows done: the bar of batch.wait() moves by rows within chunks.
    context, parts = current_job(), []
    for start in range(0, len(sales), PROGRESS_ROWS):
        part = sales.iloc[start:start + PROGRESS_ROWS]
        parts.append(part.groupby(["month", "store"], as_index=False).agg(
            orders=("order_id", "size"), units=("quantity", "sum"), revenue_eur=("revenue_eur", "sum")))
        context.progress(start + len(part), len(sales))
    totals = pd.concat(parts).groupby(["month", "store"], as_index=False).sum()
    return totals.round({"revenue_eur": 2}).to_dict("records")


@dataclass
class BadRows:
    """Where the generator put its bad rows (row positions), by the error each one causes."""

    negative_quantity: list[int] = field(default_factory=list)
    unknown_currency: list[int] = field(default_factory=list)

    def failing_chunks(self, chunk_size: int) -> dict[int, str]:
        """Chunk number -> the error type the task raises on it (a negative quantity is checked first)."""
        chunks = {row // chunk_size: "KeyError" for row in self.unknown_currency}
        chunks.update({row // chunk_size: "ValueError" for row in self.negative_quantity})
        return chunks


def generate_sales(rows: int, seed: int = 2026) -> tuple[pd.DataFrame, BadRows]:
    """A raw sales table of ``rows`` orders, and where its bad rows are.

    About one row in 400,000 (at least one of each kind, at most three) is
    bad, so a few chunks of the default run fail.
    """
    if rows < 1:
        raise InvalidInputError(f"rows must be >= 1, got {rows}")
    rng = np.random.default_rng(seed)
    sales = pd.DataFrame({
        "order_id": np.arange(1, rows + 1, dtype=np.int64),
        "ordered_at": FIRST_DAY + rng.integers(0, DAYS * 86_400, rows).astype("timedelta64[s]"),
        "store": STORES[rng.integers(0, len(STORES), rows)],
        "quantity": rng.geometric(0.45, rows),
        "unit_price": rng.gamma(2.0, 12.0, rows).round(2),
        "currency": np.array(list(EUR_RATES))[rng.choice(len(EUR_RATES), rows, p=[0.6, 0.2, 0.1, 0.05, 0.05])],
    })
    per_kind = min(max(rows // 400_000, 1), 3) if rows >= 2 else 0
    positions = rng.choice(rows, size=2 * per_kind, replace=False) if per_kind else np.array([], dtype=int)
    bad = BadRows(sorted(int(row) for row in positions[:per_kind]), sorted(int(row) for row in positions[per_kind:]))
    sales.loc[bad.negative_quantity, "quantity"] = -sales.loc[bad.negative_quantity, "quantity"]
    sales.loc[bad.unknown_currency, "currency"] = "XXX"
    return sales, bad


class TableInUse(ValueError):
    """The demo's table holds somebody else's jobs; the demo would have emptied it."""


def reset_table(driver: DatabaseQueueDriver) -> None:
    """Start from an empty table, refusing one that holds jobs other than the demo's."""
    if driver.store.table_parts() is not None:
        foreign = driver.store.job_name_other_than(TASK_NAME)
        if foreign is not None:
            raise TableInUse(f"table {driver.table_name!r} holds jobs that are not the demo's (e.g. {foreign!r}); "
                             "the demo empties its table, so give it one of its own with --table")
        driver.drop_table()
    driver.create_table()


@dataclass
class DemoResult:
    """What a demo run did, for the report and for tests."""

    rows: int
    chunk_size: int
    chunks: int
    completed: int
    failed: int
    rows_processed: int
    failed_by_error_type: dict[str, int]
    #: Chunk number -> error type, from where the generator put the bad rows.
    planted_failures: dict[int, str]
    #: Seconds spent generating, enqueueing and working (from start to the batch's end).
    phases: dict[str, float]
    stats_window_s: int
    stats: pd.DataFrame
    failures: pd.DataFrame
    results: pd.DataFrame

    @property
    def wall_s(self) -> float:
        return sum(self.phases.values())

    @property
    def failed_chunks(self) -> dict[int, str]:
        return {int(payload["chunk"]): error_type
                for payload, error_type in zip(self.failures["payload"], self.failures["error_type"])}


def run_demo(driver: DatabaseQueueDriver, *, rows: int, chunk_size: int, processes: int = 2,
             progress: bool = True, timeout: float | None = 600.0,
             say: Callable[[str], None] = print) -> DemoResult:
    """Generate, enqueue, work and analyse one ETL batch on ``driver``'s table (emptied first)."""
    phases: dict[str, float] = {}
    started = time.perf_counter()
    reset_table(driver)
    sales, bad = generate_sales(rows)
    phases["generate"] = time.perf_counter() - started
    say(f"generated {rows:,} sales rows, {len(bad.negative_quantity) + len(bad.unknown_currency)} of them bad on "
        f"purpose ({len(bad.negative_quantity)} with a negative quantity, {len(bad.unknown_currency)} with an "
        f"unknown currency) in {phases['generate']:.1f} s")

    started = time.perf_counter()
    batch = driver.map(clean_sales, sales, chunk_size=chunk_size, batch=BATCH_ID)
    chunks = batch.progress()["total"]
    phases["enqueue"] = time.perf_counter() - started
    say(f"enqueued {chunks:,} chunks of up to {chunk_size:,} rows as batch {batch.id!r} in {phases['enqueue']:.1f} s")
    del sales

    started = time.perf_counter()
    # Burst workers leave by themselves once nothing is due, so no signal has to stop them.
    workers = start_local_workers(driver, processes, modules=["kronix_data.demo"], concurrency=1, burst=True)
    try:
        say(f"working them with {processes} local worker process{'es' * (processes != 1)} (the bar counts rows, "
            "as the chunks report them)")
        batch.wait(progress=progress, timeout=timeout)
        phases["work"] = time.perf_counter() - started
        workers.join(timeout=30)
    finally:
        workers.stop()

    # Throughput and timings over this run, not the default hour.
    stats_window_s = math.ceil(time.perf_counter() - started)
    counts = batch.progress()
    results = batch.results()
    failures = batch.failures()
    return DemoResult(
        rows=rows, chunk_size=chunk_size, chunks=chunks, completed=counts["completed"], failed=counts["failed"],
        rows_processed=int(results["orders"].sum()) if len(results) else 0,
        failed_by_error_type={str(key): int(value) for key, value in failures.groupby("error_type").size().items()},
        planted_failures=bad.failing_chunks(chunk_size), phases=phases,
        stats_window_s=stats_window_s, stats=driver.fetch_stats(window=stats_window_s), failures=failures,
        results=results)


def report(result: DemoResult) -> str:
    """The frames and the summary, as the terminal shows them."""
    failures = result.failures.assign(chunk=[payload["chunk"] for payload in result.failures["payload"]])
    by_type = ", ".join(f"{error_type} {count}" for error_type, count in sorted(result.failed_by_error_type.items()))
    planted = ", ".join(str(chunk) for chunk in sorted(result.planted_failures)) or "none"
    failed = ", ".join(str(chunk) for chunk in sorted(result.failed_chunks)) or "none"
    as_planted = ("exactly those failed" if result.failed_chunks == result.planted_failures
                  else f"but chunks {failed} failed")
    by_store = (result.results.groupby("store")[["orders", "units", "revenue_eur"]].sum()
                .sort_values("revenue_eur", ascending=False) if len(result.results) else pd.DataFrame())
    work = result.phases.get("work", float("nan"))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 70):
        stats = result.stats.to_string(index=False, float_format=lambda value: f"{value:.3f}")
        dead = (failures[["chunk", "name", "attempts", "error_type", "error_message"]].sort_values("chunk")
                .to_string(index=False) if len(failures) else "(none)")
        revenue = by_store.to_string(float_format=lambda value: f"{value:,.2f}") if len(by_store) else "(none)"
    return "\n".join([
        "", "revenue per store (batch.results(), concatenated per chunk):", revenue,
        "", f"fetch_stats(window=timedelta(seconds={result.stats_window_s})):", stats,
        "", "batch.failures(): the dead letters of the batch, one per failed chunk:", dead,
        "", "summary:",
        f"  rows processed      {result.rows_processed:,} of {result.rows:,}",
        f"  chunks              {result.chunks:,}: {result.completed:,} completed, {result.failed:,} failed",
        f"  failed by error     {by_type or 'none'} (failures.groupby('error_type').size())",
        f"  planted bad rows    in chunks {planted}: {as_planted}",
        f"  wall time           {result.wall_s:.1f} s (" + ", ".join(
            f"{phase} {seconds:.1f} s" for phase, seconds in result.phases.items()) + ")",
        f"  throughput          {result.chunks / work:.1f} jobs/s, {result.rows_processed / work:,.0f} rows/s "
        f"while working",
    ])


def summary(result: DemoResult) -> dict[str, Any]:
    """The summary as one JSON document (``kronix demo --json``)."""
    return {"rows": result.rows, "chunk_size": result.chunk_size, "rows_processed": result.rows_processed,
            "chunks": result.chunks, "completed": result.completed, "failed": result.failed,
            "failed_by_error_type": result.failed_by_error_type,
            "failed_chunks": {str(chunk): error for chunk, error in sorted(result.failed_chunks.items())},
            "planted_failures": {str(chunk): error for chunk, error in sorted(result.planted_failures.items())},
            "phases_s": {phase: round(seconds, 3) for phase, seconds in result.phases.items()},
            "wall_s": round(result.wall_s, 3)}
