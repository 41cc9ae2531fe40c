"""Run the whole comparison: every system x scenario x 1 and 4 worker processes, repeated.

    python -m benchmarks.matrix --repeat 3 --json-out results.jsonl --markdown-out results.md

Each figure is one ``benchmarks.run`` subprocess (a fresh table, its own
interpreter).  Repeats are interleaved (the whole matrix once, then again), so
a noisy minute on a shared machine hits every system alike, and the tables
show medians.  Ratios compare kronix-data with each peer on the same database
measured in this same invocation.  ``--quick`` runs tiny sizes to check the
set-up; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .systems import SYSTEMS

KRONIX = ("kronix-postgresql", "kronix-sqlite", "kronix-mariadb")
SCENARIOS = ("enqueue-batch", "enqueue-single", "drain", "drain-history", "latency", "stats")


@dataclass(frozen=True)
class Variant:
    """One row of the table: a system with fixed tuning, on the scenarios it is compared in."""

    label: str
    system: str
    args: tuple[str, ...] = ()
    scenarios: tuple[str, ...] | None = None  # None: every scenario of the matrix the system has

    @property
    def database(self) -> str:
        return SYSTEMS[self.system].database


VARIANTS = [
    Variant("kronix-postgresql", "kronix-postgresql"),
    Variant("kronix-sqlite", "kronix-sqlite"),
    Variant("kronix-mariadb", "kronix-mariadb"),
    Variant("pgqueuer asyncpg, batch 10", "pgqueuer", ("--batch-size", "10")),
    Variant("pgqueuer asyncpg, batch 100", "pgqueuer", ("--batch-size", "100"), ("drain", "drain-history")),
    Variant("pgqueuer psycopg, batch 10", "pgqueuer", ("--driver", "psycopg", "--batch-size", "10"),
            ("enqueue-batch", "enqueue-single", "drain")),
    Variant("procrastinate, concurrency 10", "procrastinate", ("--concurrency", "10")),
    Variant("raw psycopg, COPY", "raw-postgresql", ("--method", "copy")),
    Variant("raw psycopg, executemany", "raw-postgresql", ("--method", "executemany"), ("enqueue-batch",)),
    Variant("raw sqlite3", "raw-sqlite"),
    Variant("raw PyMySQL", "raw-mariadb"),
]

def columns(processes: list[int]) -> list[tuple[str, int]]:
    """The (scenario, worker processes) columns, in table order."""
    return ([("enqueue-batch", 1), ("enqueue-single", 1)] + [("drain", count) for count in processes]
            + [("drain-history", count) for count in processes] + [("latency", 1), ("stats", 1)])


@dataclass
class Sizes:
    jobs: int = 20_000
    single_jobs: int = 2_000
    history: int = 1_000_000
    latency_jobs: int = 40
    interval: float = 0.25

    def args(self, scenario: str) -> list[str]:
        if scenario == "enqueue-single":
            return ["--jobs", str(self.single_jobs)]
        if scenario == "latency":
            return ["--jobs", str(self.latency_jobs), "--interval", str(self.interval)]
        if scenario == "stats":
            return ["--history", str(self.history)]
        if scenario == "drain-history":
            return ["--jobs", str(self.jobs), "--history", str(self.history)]
        return ["--jobs", str(self.jobs)]


QUICK = Sizes(jobs=500, single_jobs=100, history=2_000, latency_jobs=5, interval=0.05)


@dataclass
class Cell:
    variant: Variant
    scenario: str
    processes: int
    lines: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [line[key] for line in self.lines if line.get(key) is not None]
        return statistics.median(values) if values else None


def plan(variants: list[Variant], scenarios: list[str], processes: list[int]) -> list[Cell]:
    """One cell per row and column that the row's system supports and the command asked for."""
    return [Cell(variant, scenario, count) for variant in variants for scenario, count in columns(processes)
            if scenario in scenarios and scenario in (variant.scenarios or SYSTEMS[variant.system].scenarios)
            and scenario in SYSTEMS[variant.system].scenarios]


def run_cell(cell: Cell, sizes: Sizes, urls: dict[str, str], timeout: float) -> dict[str, Any] | str:
    """One benchmarks.run subprocess; its JSON line, or the error text."""
    command = [sys.executable, "-m", "benchmarks.run", "--system", cell.variant.system, "--scenario", cell.scenario,
               *sizes.args(cell.scenario), *cell.variant.args]
    if cell.scenario in ("drain", "drain-history", "latency"):
        command += ["--processes", str(cell.processes)]
    if cell.variant.database in urls:
        command += ["--db", urls[cell.variant.database]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:g}s: {' '.join(command)}"
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("(Background on")]
        return f"exit {done.returncode}: {lines[-1] if lines else '(no message)'}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, help="runs per figure, median reported (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the set-up (figures meaningless)")
    parser.add_argument("--jobs", type=int, help="jobs per enqueue-batch/drain run (default 20,000)")
    parser.add_argument("--single-jobs", type=int, help="jobs per enqueue-single run (default 2,000)")
    parser.add_argument("--history", type=int, help="finished jobs for drain-history and stats (default 1,000,000)")
    parser.add_argument("--latency-jobs", type=int, help="jobs per latency run (default 40)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4], help="worker processes for drains")
    parser.add_argument("--systems", nargs="+", metavar="LABEL_OR_SYSTEM",
                        help="only these rows (a label or a system name; default: all)")
    parser.add_argument("--scenarios", nargs="+", default=sorted(SCENARIOS), choices=sorted(SCENARIOS))
    parser.add_argument("--postgres", metavar="URL", help="PostgreSQL URL for every PostgreSQL system")
    parser.add_argument("--mariadb", metavar="URL", help="MariaDB URL for every MariaDB system")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take (default 3600)")
    parser.add_argument("--json-out", metavar="FILE", help="also append every run's JSON line to FILE")
    parser.add_argument("--markdown-out", metavar="FILE", help="also write the tables to FILE")
    args = parser.parse_args(argv)

    sizes = Sizes(**vars(QUICK)) if args.quick else Sizes()
    for name in ("jobs", "single_jobs", "history", "latency_jobs"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    repeat = args.repeat or (1 if args.quick else 3)
    variants = [variant for variant in VARIANTS
                if not args.systems or variant.label in args.systems or variant.system in args.systems]
    if not variants:
        parser.error(f"no row matches --systems {args.systems}; rows: {[variant.label for variant in VARIANTS]}")
    urls = {database: url for database, url in (("postgresql", args.postgres), ("mariadb", args.mariadb)) if url}
    cells = plan(variants, args.scenarios, args.processes)

    started = time.monotonic()
    output = open(args.json_out, "a", encoding="utf-8") if args.json_out else None
    try:
        for round_number in range(1, repeat + 1):
            for index, cell in enumerate(cells, 1):
                label = f"[{round_number}/{repeat} {index}/{len(cells)}] {cell.variant.label} {cell.scenario} P={cell.processes}"
                result = run_cell(cell, sizes, urls, args.timeout)
                if isinstance(result, str):
                    cell.errors.append(result)
                    print(f"{label}: FAILED {result}", file=sys.stderr, flush=True)
                    continue
                result["label"] = cell.variant.label
                cell.lines.append(result)
                if output:
                    output.write(json.dumps(result) + "\n")
                    output.flush()
                print(f"{label}: {summary(result)}", file=sys.stderr, flush=True)
    finally:
        if output:
            output.close()

    command = shlex.join(["python", "-m", "benchmarks.matrix", *(sys.argv[1:] if argv is None else argv)])
    markdown = render(cells, sizes, repeat, args.processes, command, time.monotonic() - started)
    print(markdown)
    if args.markdown_out:
        with open(args.markdown_out, "w", encoding="utf-8") as file:
            file.write(markdown + "\n")
    return 1 if any(cell.errors for cell in cells) else 0


def summary(line: dict[str, Any]) -> str:
    if line["scenario"] == "latency":
        return f"p50 {line['p50_ms']} ms, p95 {line['p95_ms']} ms"
    if line["scenario"] == "stats":
        return f"fetch_stats {line['fetch_stats_ms']} ms, dead_letter_jobs {line['dead_letter_jobs_ms']} ms"
    return f"{line['jobs_per_s']:,.0f} jobs/s"


# -- the tables ---------------------------------------------------------------------


def column_title(scenario: str, processes: int) -> str:
    titles = {"enqueue-batch": "enqueue, one batch", "enqueue-single": "enqueue, one by one",
              "drain": f"drain, {processes} proc", "drain-history": f"drain with history, {processes} proc"}
    return titles[scenario]


def number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}"


def render(cells: list[Cell], sizes: Sizes, repeat: int, processes: list[int], command: str, elapsed: float) -> str:
    by_key = {(cell.variant.label, cell.scenario, cell.processes): cell for cell in cells}
    labels = list(dict.fromkeys(cell.variant.label for cell in cells))
    variants = {cell.variant.label: cell.variant for cell in cells}
    throughput_columns = [column for column in columns(processes)
                          if column[0] not in ("latency", "stats") and any(key[1:] == column for key in by_key)]

    def value(label: str, column: tuple[str, int], key: str = "jobs_per_s") -> float | None:
        cell = by_key.get((label, *column))
        return cell.median(key) if cell else None

    def shown(label: str, column: tuple[str, int], key: str = "jobs_per_s", digits: int = 0) -> str:
        cell = by_key.get((label, *column))
        if cell is None:
            return ""
        if not cell.lines and cell.errors:
            return "failed"
        text = number(cell.median(key), digits)
        return text + (f" ({len(cell.errors)} failed)" if cell.errors else "")

    out = [f"### Jobs per second, medians of {repeat} ({number(sizes.jobs)} no-op jobs per enqueue/drain run, "
           f"{number(sizes.single_jobs)} one by one, {number(sizes.history)} finished jobs for history)", ""]
    out.append("| system | database | " + " | ".join(column_title(*column) for column in throughput_columns) + " |")
    out.append("|---|---|" + "---|" * len(throughput_columns))
    for label in labels:
        out.append(f"| {label} | {variants[label].database} | "
                   + " | ".join(shown(label, column) for column in throughput_columns) + " |")

    timing_rows = [label for label in labels if any(by_key.get((label, scenario, 1)) for scenario in ("latency", "stats"))
                   or value(label, ("drain", 1), "claim_p50_ms") is not None]
    if timing_rows:
        out += ["", f"### Milliseconds, medians of {repeat}", "",
                "| system | push-to-start p50 | p95 | claim p50, empty table | claim p50, with history "
                "| fetch_stats() | dead_letter_jobs() |", "|---|---|---|---|---|---|---|"]
        for label in timing_rows:
            out.append(f"| {label} | {shown(label, ('latency', 1), 'p50_ms', 1)} | {shown(label, ('latency', 1), 'p95_ms', 1)} "
                       f"| {shown(label, ('drain', 1), 'claim_p50_ms', 2)} | {shown(label, ('drain-history', 1), 'claim_p50_ms', 2)} "
                       f"| {shown(label, ('stats', 1), 'fetch_stats_ms', 1)} | {shown(label, ('stats', 1), 'dead_letter_jobs_ms', 1)} |")

    history_rows = [label for label in labels if value(label, ("drain", 1)) and value(label, ("drain-history", 1))]
    if history_rows:
        counts = [count for count in processes if any(value(label, ("drain-history", count)) for label in history_rows)]
        out += ["", "### History effect: drain with history ÷ drain on an empty table (1.00 = flat)", "",
                "| system | " + " | ".join(f"{count} proc" for count in counts) + " |",
                "|---|" + "---|" * len(counts)]
        for label in history_rows:
            ratios = []
            for count in counts:
                empty, full = value(label, ("drain", count)), value(label, ("drain-history", count))
                ratios.append(f"{full / empty:.2f}" if empty and full else "")
            out.append(f"| {label} | " + " | ".join(ratios) + " |")

    ratio_rows = []
    with_latency = any(key[1] == "latency" for key in by_key)
    for kronix in [label for label in labels if variants[label].system in KRONIX]:
        for peer in [label for label in labels if variants[label].system not in KRONIX
                     and variants[label].database == variants[kronix].database]:
            cells_text = []
            for column in throughput_columns:
                mine, theirs = value(kronix, column), value(peer, column)
                cells_text.append(f"{mine / theirs:.2f}x" if mine and theirs else "")
            if with_latency:
                mine, theirs = value(kronix, ("latency", 1), "p50_ms"), value(peer, ("latency", 1), "p50_ms")
                cells_text.append(f"{theirs / mine:.2f}x" if mine and theirs else "")
            ratio_rows.append(f"| {kronix} vs {peer} | " + " | ".join(cells_text) + " |")
    if ratio_rows:
        titles = [column_title(*column) for column in throughput_columns] + ["push-to-start p50"] * with_latency
        out += ["", "### How many times faster kronix-data is than each peer in this run (>1: kronix faster)", "",
                "| kronix vs peer | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
        out += ratio_rows

    failures = [(cell, error) for cell in cells for error in cell.errors]
    if failures:
        out += ["", "### Failed runs", ""]
        out += [f"- {cell.variant.label} {cell.scenario} P={cell.processes}: {error}" for cell, error in failures]
    servers = sorted({f"{line['database']} {line['server']}" for cell in cells for line in cell.lines})
    out += ["", f"Measured in {elapsed / 60:.1f} min on {', '.join(servers)} with `{command}`."]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
