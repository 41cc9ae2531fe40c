"""Run one scenario against one system and print one JSON line.

    python -m benchmarks.run --system kronix-postgresql --scenario drain --jobs 20000 --processes 4

Each run creates its own table (or schema, or name prefix) with a unique name,
checks in the database that every job ended where it should, drops what it
created, and prints ``{"system", "scenario", "database", "jobs", "processes",
"seconds", "jobs_per_s", ...}``.  Errors go to stderr with exit code 1 (the run
failed) or 2 (bad arguments, unsupported combination, missing package).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
import uuid
from typing import Any

import sqlalchemy as sa

from . import scenarios
from .systems import SYSTEMS, load
from .systems.base import BenchmarkError, Options, check_namespace

EXIT_FAILED, EXIT_USAGE = 1, 2

#: Server URLs when --db is not given: the environment, else this machine's servers.
DEFAULT_URLS = {
    "postgresql": os.environ.get("KRONIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mariadb": os.environ.get("KRONIX_BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", required=True, choices=list(SYSTEMS))
    parser.add_argument("--scenario", choices=list(scenarios.DEFAULT_JOBS), help="required unless --drop")
    parser.add_argument("--jobs", type=positive(int, allow_zero=False),
                        help="jobs to enqueue, drain or time (default per scenario: "
                             + ", ".join(f"{name} {count:,}" for name, count in scenarios.DEFAULT_JOBS.items()
                                         if count) + ")")
    parser.add_argument("--processes", type=positive(int, allow_zero=False), default=1,
                        help="worker processes (drain, drain-history, latency; default 1)")
    parser.add_argument("--db", metavar="URL", help="database URL (default: a new SQLite file, or "
                        "$KRONIX_BENCH_POSTGRES_URL / $KRONIX_BENCH_MYSQL_URL, else the local servers)")
    parser.add_argument("--history", type=positive(int), help="finished jobs already in the table "
                        f"(drain-history and stats; default {scenarios.DEFAULT_HISTORY:,}); 0.1%% are dead letters")
    tuning = parser.add_argument_group("tuning (default: each system's own, printed in the JSON line)")
    tuning.add_argument("--concurrency", type=positive(int, allow_zero=False),
                        help="jobs in flight per worker process (kronix 100, procrastinate 10)")
    tuning.add_argument("--batch-size", type=positive(int, allow_zero=False),
                        help="jobs per claim (pgqueuer 10, raw loops 100)")
    tuning.add_argument("--limit-concurrency", type=positive(int, allow_zero=False), metavar="N",
                        help="kronix: limit the queue to N jobs processing at once across all workers (none)")
    tuning.add_argument("--method", choices=["copy", "executemany"], help="raw-postgresql batch enqueue (copy)")
    tuning.add_argument("--driver", choices=["asyncpg", "psycopg"], help="pgqueuer's driver (asyncpg)")
    tuning.add_argument("--history-via", choices=["sql", "api"], default="sql",
                        help="kronix: finish history jobs by one UPDATE (sql, fast) or pop/complete (api)")
    tuning.add_argument("--claim-probes", type=positive(int), default=50,
                        help="kronix drain: claims of one job timed before the drain (claim_p50_ms; 0: none)")
    tuning.add_argument("--interval", type=positive(float, allow_zero=False), default=0.25,
                        help="latency: mean seconds between pushes (default 0.25)")
    tuning.add_argument("--timeout", type=positive(float, allow_zero=False), default=600.0,
                        help="seconds a drain or latency run may take before it fails (default 600)")
    parser.add_argument("--name", help="the run's table/schema name (default: bench_ and a random part)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the table/schema (and SQLite file) in place, for inspection")
    parser.add_argument("--drop", action="store_true",
                        help="only drop what a run named --name left (with --keep, or when its server went away)")
    return parser


def positive(kind: type, allow_zero: bool = True):
    def parse(text: str):
        value = kind(text)
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else '> 0'}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s: %(message)s")
    if args.name is not None:
        try:
            check_namespace(args.name)
        except BenchmarkError as error:
            return fail(error, EXIT_USAGE)
    if args.drop:
        return drop_only(args)
    if args.scenario is None:
        parser.error("the following arguments are required: --scenario (unless --drop)")
    supported = SYSTEMS[args.system].scenarios
    if args.scenario not in supported:
        return fail(f"system {args.system!r} does not support scenario {args.scenario!r} "
                    f"(it supports: {', '.join(sorted(supported))})", EXIT_USAGE)
    try:
        system_class = load(args.system)
    except BenchmarkError as error:
        return fail(error, EXIT_USAGE)
    if args.processes != 1 and args.scenario not in scenarios.WITH_WORKERS:
        return fail(f"--processes applies to {', '.join(sorted(scenarios.WITH_WORKERS))}; "
                    f"{args.scenario} times the producer alone", EXIT_USAGE)
    settings = scenarios.Settings(
        jobs=args.jobs if args.jobs is not None else scenarios.DEFAULT_JOBS[args.scenario],
        processes=args.processes, interval=args.interval, timeout=args.timeout,
        history=(args.history if args.history is not None else scenarios.DEFAULT_HISTORY)
        if args.scenario in ("drain-history", "stats") else 0)
    if args.scenario == "stats":
        settings.jobs = settings.history
    options = Options(concurrency=args.concurrency, batch_size=args.batch_size, method=args.method,
                      driver=args.driver, history_via=args.history_via, claim_probes=args.claim_probes,
                      limit_concurrency=args.limit_concurrency)
    try:
        line = run_once(system_class, args, settings, options)
    except BenchmarkError as error:
        return fail(error, EXIT_FAILED)
    except Exception as error:  # noqa: BLE001 - a database or library error: the trace, then one clear line
        traceback.print_exc()
        return fail(f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
                    EXIT_FAILED)
    print(json.dumps(line), flush=True)
    return 0


def run_once(system_class, args, settings: scenarios.Settings, options: Options) -> dict[str, Any]:
    """Create the system's namespace, run the scenario, always clean up; returns the JSON line."""
    database = SYSTEMS[args.system].database
    scratch = None
    url = args.db
    if url is None and database == "sqlite":
        scratch = tempfile.mkdtemp(prefix="kronix-bench-")
        url = f"sqlite:///{os.path.join(scratch, 'jobs.db')}"
    url = url or DEFAULT_URLS[database]
    namespace = args.name or f"bench_{uuid.uuid4().hex[:12]}"
    system = system_class(url, namespace, options)
    try:
        version = system.server_version()
        system.create()
        try:
            figures = scenarios.run(system, args.scenario, settings)
        finally:
            if not args.keep:
                drop(system, url)
    finally:
        try:
            system.close()
        except Exception:  # noqa: BLE001 - a connection already gone; nothing left to close
            pass
        if scratch and not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = figures.pop("seconds")
    jobs_per_s = figures.pop("jobs_per_s", round(settings.jobs / seconds, 1) if seconds > 0 else None)
    line = {"system": args.system, "scenario": args.scenario, "database": database, "server": version,
            "jobs": settings.jobs, "processes": settings.processes, "seconds": round(seconds, 6),
            "jobs_per_s": jobs_per_s}
    if settings.history:
        line["history"] = settings.history
        if args.system.startswith("kronix"):
            line["history_via"] = options.history_via
    line.update(system.settings())
    if options.limit_concurrency is not None:
        line["limit_concurrency"] = options.limit_concurrency
    line.update(figures)
    if args.keep:
        line["kept"] = {"db": shown(url), "name": namespace}
    return line


def drop_only(args) -> int:
    if not args.name or args.db is None:
        return fail("--drop needs the --name and --db of the run to clean up", EXIT_USAGE)
    try:
        system = load(args.system)(args.db, args.name, Options())
        try:
            system.drop()
        finally:
            system.close()
    except BenchmarkError as error:
        return fail(error, EXIT_USAGE)
    return 0


def drop(system, url: str) -> None:
    """Drop the run's namespace, on fresh connections if the run's are gone; else say what is left."""
    try:
        system.drop()
        return
    except Exception:  # noqa: BLE001 - e.g. the session was terminated: try once more anew
        pass
    try:
        fresh = type(system)(url, system.namespace, system.options)
        try:
            fresh.drop()
        finally:
            fresh.close()
    except Exception as error:  # noqa: BLE001 - must not hide the run's own error
        print(f"benchmarks.run: warning: could not drop {system.namespace!r} in {shown(url)} "
              f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
              f"drop it with --system {system.name} --name {system.namespace} --db URL --drop", file=sys.stderr)


def shown(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def fail(error: Any, code: int) -> int:
    print(f"benchmarks.run: error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
