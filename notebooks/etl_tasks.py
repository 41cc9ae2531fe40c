"""Task functions for the notebooks' worker processes.

Worker processes are spawned fresh and cannot see functions defined in a
notebook, so the tasks they run live in this module, next to the notebooks
(``start_local_workers(driver, 2, modules=["etl_tasks"])``; the notebook's
working directory is on the workers' ``sys.path``).
"""

from __future__ import annotations

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
