"""Task functions for the notebooks' worker processes.

Tasks in a module run on any worker, here or on other machines
(``kronix worker -m etl_tasks``); the notebooks' local workers import it
(``start_local_workers(driver, 2, modules=["etl_tasks"])``; the notebook's
working directory is on the workers' ``sys.path``).  A task defined in a cell
runs only on the local workers of that kernel (``05_tasks_in_cells.ipynb``).
"""

from __future__ import annotations

import time

import kronix_data
from kronix_data import RetryPolicy, as_frame

#: Euros per unit of each currency.
EUR_RATES = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17}


@kronix_data.task(name="etl.daily_revenue", max_retries=2, retry=RetryPolicy(delay=0.5))
def daily_revenue(payload):
    """Clean one chunk of raw orders and return revenue in euros per day and store, as records."""
    orders = as_frame(payload)
    orders = orders[orders["status"] == "paid"]  # refunds and cancellations are not revenue
    orders = orders.assign(day=orders["ordered_at"].dt.strftime("%Y-%m-%d"),
                           revenue_eur=orders["quantity"] * orders["unit_price"] * orders["currency"].map(EUR_RATES))
    per_day = orders.groupby(["day", "store"], as_index=False).agg(orders=("order_id", "size"),
                                                                   revenue_eur=("revenue_eur", "sum"))
    return per_day.round({"revenue_eur": 2}).to_dict("records")


#: Seconds each slice of revenue_in_slices waits, standing for a slow write to a warehouse.
SLICE_SECONDS = 0.2


@kronix_data.task(name="etl.revenue_in_slices", max_retries=2, retry=RetryPolicy(delay=0.2))
def revenue_in_slices(payload):
    """Revenue in euros per store, worked 10,000 rows at a time with a checkpoint after each slice.

    A worker killed in the middle of a chunk leaves it to a later attempt, which resumes after the
    last slice saved, with the running totals saved with it: the chunk's result is whole either way.
    """
    slices = kronix_data.frame_slices(payload, rows=10_000, state={})
    for part in slices:
        paid = part[part["status"] == "paid"]
        revenue = paid["quantity"] * paid["unit_price"] * paid["currency"].map(EUR_RATES)
        for store, value in revenue.groupby(paid["store"]).sum().items():
            slices.state[store] = slices.state.get(store, 0.0) + float(value)
        time.sleep(SLICE_SECONDS)
    attempt = kronix_data.current_job().job.attempts
    return [{"store": store, "revenue_eur": round(value, 2), "attempt": attempt, "resumed_from": slices.start_row}
            for store, value in sorted(slices.state.items())]
