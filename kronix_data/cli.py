"""The ``kronix`` command line: set up, inspect and repair a queue, and run workers.

Operators need the queue's state and its dead letters from a shell or a cron
job, without opening a notebook; every command is a thin wrapper around one
:class:`~kronix_data.DatabaseQueueDriver` method, so the CLI holds no SQL.
A password in a database URL is never printed: URLs are shown with it hidden,
and every message and log line is scrubbed of it.

environment:
  KRONIX_DATABASE_URL  database URL when --db is not given (else sqlite:///kronix.db)
  KRONIX_TABLE         table name when --table is not given (else kronix_jobs)
  KRONIX_READ_DATABASE_URL  a hot standby the inspecting commands read from (--read-db)
  ('kronix demo' ignores both: it empties its table, so it only goes where --db/--table say,
  else to sqlite:///kronix_demo.db in the current directory, table kronix_demo)

exit codes:
  0  success
  1  the command failed (e.g. retry of an id that is not a dead letter)
  2  usage error (bad or missing arguments)
  3  invalid configuration (malformed or unsupported URL, invalid table name, the database's
     driver not installed: the message says what to pip install)
  4  database unreachable or failing, or the table does not exist (run 'kronix init')
  5  a module given to 'worker -m' cannot be imported
  141  the reader of the output went away (e.g. 'kronix dead-letters | head'), as for other tools
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from . import __version__
from .dialects import multi_host_url
from .driver import DatabaseQueueDriver
from .errors import InvalidInputError, MissingDriverError, NotFoundError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIGURATION, EXIT_DATABASE, EXIT_IMPORT = range(6)
EXIT_BROKEN_PIPE = 128 + 13  # killed by SIGPIPE, as a shell reports it
DEFAULT_URL = "sqlite:///kronix.db"
DEFAULT_TABLE = "kronix_jobs"
#: Where and how big 'kronix demo' runs by default (kronix_data/demo.py is imported only by that command,
#: so no other command registers its task).
DEMO_URL, DEMO_TABLE = "sqlite:///kronix_demo.db", "kronix_demo"
DEMO_ROWS, DEMO_CHUNK_SIZE = 2_000_000, 50_000
ERROR_WIDTH = 80
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^/\s]*@")  # greedy: an unescaped "@" in a password

#: --help ends with the environment and exit codes, from this module's docstring.
EPILOG = "global options may go before or after the command.\n\nenvironment:" + (__doc__ or "").partition(
    "environment:")[2]  # (no docstring under python -OO)


class CommandError(Exception):
    """An expected failure: a one-line message for stderr and the exit code to return."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def database_password(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        return sa.make_url(multi_host_url(url)).password
    except Exception:  # noqa: BLE001 - an unparsable URL is reported elsewhere
        return None


def redact(text: str, password: str | tuple[str | None, ...] | None = None) -> str:
    """``text`` without any ``user:password@`` secret, nor the known password(s) themselves.

    A password under four characters is only hidden in URLs: replacing it
    everywhere would garble messages without protecting much.
    """
    text = _URL_PASSWORD.sub(r"\1***@", text)
    for secret in password if isinstance(password, tuple) else (password,):
        text = text.replace(secret, "***") if secret and len(secret) >= 4 else text
    return text


def shown_url(url: str) -> str:
    """The URL as it may be printed: password hidden, even when it cannot be parsed."""
    try:
        return redact(sa.make_url(multi_host_url(url)).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - unparsable: shown only if no secret can be in it
        scrubbed = redact(url)
        return scrubbed if scrubbed != url or "@" not in url else "(an unparsable URL, not shown)"


class RedactingFilter(logging.Filter):
    """Scrubs the database password from every log record, whoever logs it."""

    def __init__(self, password: str | tuple[str | None, ...] | None):
        super().__init__()
        self.password = password

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage(), self.password), None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.password)
            record.exc_info = None
        return True


class RedactingArgumentParser(argparse.ArgumentParser):
    """argparse echoes unknown arguments; a misplaced URL must not leak its password."""

    def error(self, message: str):
        super().error(redact(message))


@contextmanager
def open_driver(args: argparse.Namespace, *, require_table: bool = True) -> Iterator[DatabaseQueueDriver]:
    """The driver for ``--db``/``--table``, closed afterwards; checks the table exists first."""
    try:
        for url in filter(None, (args.db, args.read_db)):  # else the host error would show part of the password
            if "@" in (sa.make_url(multi_host_url(url)).host or ""):
                raise ValueError("the host contains '@': write an '@' in the password as %40")
        driver = DatabaseQueueDriver(args.db, table=args.table, read_db=args.read_db)
    except MissingDriverError as error:  # its message is the fix; the table has nothing to do with it
        raise CommandError(f"{error} (database {shown_url(args.db)})", EXIT_CONFIGURATION) from error
    except (ValueError, ImportError, sa.exc.ArgumentError) as error:
        raise CommandError(f"invalid configuration: {error} (database {shown_url(args.db)}, "
                           f"table {args.table!r})", EXIT_CONFIGURATION) from error
    log.info("using table %r in %s%s", args.table, shown_url(args.db),
             f", reading views from {shown_url(args.read_db)}" if args.read_db else "")
    with driver:
        missing = driver.store.missing_database() if require_table else None
        if missing:
            raise CommandError(f"{missing} (nothing was created); 'kronix init' with the same --db creates it",
                               EXIT_DATABASE)
        if require_table and driver.store.table_parts() is None:
            raise CommandError(f"table {args.table!r} does not exist in {shown_url(args.db)}; "
                               "create it with 'kronix init'", EXIT_DATABASE)
        yield driver


def emit(args: argparse.Namespace, human: str, document: Any) -> None:
    """Print the human text, or with ``--json`` the document as one JSON value."""
    print(json.dumps(document, indent=2, ensure_ascii=False, default=str) if args.json else human)


def json_records(frame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-ready dicts: NaN/NaT as null, timestamps in ISO 8601."""
    return [{column: json_value(value) for column, value in record.items()}
            for record in frame.to_dict(orient="records")]


def json_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "isoformat"):  # datetime and pandas Timestamp; NaT has no valid one
        return None if value != value else value.isoformat()
    return value


def one_line(text: Any, width: int = ERROR_WIDTH) -> str:
    """Text flattened to one line and cut to ``width`` characters, for a table cell."""
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[:width - 3] + "..."


def text_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Left-aligned columns, for text that pandas would right-align."""
    widths = {column: max([len(column)] + [len(str(row[column])) for row in rows]) for column in columns}
    lines = [list(columns)] + [[str(row[column]) for column in columns] for row in rows]
    return "\n".join("  ".join(cell.ljust(widths[column]) for cell, column in zip(line, columns)).rstrip()
                     for line in lines)


def command_init(args: argparse.Namespace) -> int:
    """Create the table, or upgrade it, and say which of the two happened."""
    with open_driver(args, require_table=False) as driver:
        before = driver.store.table_parts()
        driver.create_table()
        added = sorted((driver.store.table_parts() or set()) - (before or set()))
    if before is None:
        action, message = "created", f"created table {args.table!r} in {shown_url(args.db)}"
    elif added:
        action, message = "upgraded", f"upgraded table {args.table!r}: added {', '.join(added)}"
    else:
        action, message = "unchanged", f"table {args.table!r} is already up to date"
    emit(args, message, {"table": args.table, "action": action, "added": [] if before is None else added})
    return EXIT_OK


def command_stats(args: argparse.Namespace) -> int:
    with open_driver(args) as driver:
        frame = driver.fetch_stats()
        reporting = running_progress(driver)
    human = (frame.to_string(index=False, na_rep="-", float_format=lambda value: f"{value:.1f}")
             if len(frame) else f"no jobs in table {args.table!r}")
    if reporting:
        human += "\n\nprogress of running jobs (current_job().progress()):\n" + text_table(
            [{**record, "progress": progress_text(record), "info": one_line(record["info"] or "", 40)}
             for record in reporting[:RUNNING_SHOWN]], ["queue", "id", "name", "reserved_by", "progress", "info"])
        if len(reporting) > RUNNING_SHOWN:
            human += f"\n... {len(reporting) - RUNNING_SHOWN} more"
    records = json_records(frame)
    for record in records:
        record["running_progress"] = [item for item in reporting if item["queue"] == record["queue"]]
    if args.plot:
        human += "\n\n" + write_timeline_plot(args)
    emit(args, human, records)
    return EXIT_OK


def write_timeline_plot(args: argparse.Namespace) -> str:
    """``stats --plot FILE.png``: the throughput chart of ``driver.timeline()`` as a PNG; says where it went."""
    import pandas as pd

    from .charts import timeline_png  # matplotlib only for this option

    try:
        since = pd.to_timedelta(args.since).to_pytimedelta()
    except ValueError as error:
        raise CommandError(f"--since must be a span such as 1h, 30min or 2d, got {args.since!r}", EXIT_USAGE) from error
    with open_driver(args) as driver:
        try:
            frame = driver.timeline(args.freq, since=since)
        except InvalidInputError as error:
            raise CommandError(str(error), EXIT_USAGE) from error
    title = f"{args.table}: jobs per interval, last {args.since}"
    try:
        with open(args.plot, "wb") as file:
            file.write(timeline_png(frame, title=title))
    except OSError as error:
        raise CommandError(f"cannot write the plot to {args.plot}: {error.strerror}", EXIT_FAILURE) from error
    return f"throughput chart ({len(frame):,} intervals x queues, every {args.freq}) written to {args.plot}"


# -- progress and the worker registry ---------------------------------------------

#: Running jobs listed by 'kronix stats' (the JSON has them all).
RUNNING_SHOWN = 20


def running_progress(driver: DatabaseQueueDriver) -> list[dict[str, Any]]:
    """The running jobs that reported progress, as JSON-ready records (newest first)."""
    running = driver.jobs(status="processing", limit=1000)
    running = running[running["progress_at"].notna()]
    return [{"queue": record["queue"], "id": record["id"], "name": record["name"],
             "reserved_by": record["reserved_by"], "done": json_value(record["progress_done"]),
             "total": json_value(record["progress_total"]), "info": record["progress_info"],
             "progress_at": json_value(record["progress_at"])} for record in running.to_dict(orient="records")]


def progress_text(record: dict[str, Any]) -> str:
    """``1,200/5,000 (24%)``, or ``1,200`` without a total."""
    done, total = record["done"] or 0, record["total"]
    if not total:
        return f"{done:,g}"
    return f"{done:,g}/{total:,g} ({100 * done / total:.0f}%)"


def command_workers(args: argparse.Namespace) -> int:
    """The worker registry: live workers, and those stopped or gone within the last hour."""
    from .resources import resources_text

    with open_driver(args) as driver:
        frame = driver.workers()
    rows = [{**record, "queues": ",".join(record["queues"]), "last_seen": f"{record['seen_s_ago']:.0f}s ago",
             "resources": resources_text(record["resources"]),
             "started_at": record["started_at"].strftime("%Y-%m-%d %H:%M:%S") if record["started_at"] == record[
                 "started_at"] else "-"} for record in frame.to_dict(orient="records")]
    human = text_table(rows, ["worker_id", "state", "host", "pid", "queues", "concurrency", "running", "resources",
                              "started_at", "last_seen"]) if rows else f"no worker seen in the last hour on table {args.table!r}"
    emit(args, human, json_records(frame))
    return EXIT_OK


def command_dead_letters(args: argparse.Namespace) -> int:
    with open_driver(args) as driver:
        frame = driver.dead_letter_jobs(queue=args.queue)
    total = len(frame)
    if args.limit is not None:
        frame = frame.head(args.limit)
    rows = [{**record, "last_error": one_line(record["last_error"])} for record in frame.to_dict(orient="records")]
    human = text_table(rows, ["id", "name", "queue", "attempts", "last_error"]) if rows else "no dead letters"
    if len(frame) < total:
        human += f"\n... {total - len(frame)} more (raise --limit to see them)"
    emit(args, human, json_records(frame))
    return EXIT_OK


def command_retry(args: argparse.Namespace) -> int:
    if args.job_id is not None and (args.queue is not None or args.name is not None):
        args.usage_error("--queue and --name go with --all, not with a job id")
    with open_driver(args) as driver:
        if args.job_id is None:
            count = driver.retry_dead_letters(queue=args.queue, name=args.name)
            emit(args, f"retried {count} dead letter{'s' * (count != 1)}", {"retried": count})
            return EXIT_OK
        if not driver.retry_dead_letter(args.job_id):
            raise CommandError(f"job {args.job_id!r} is not a dead letter in table {args.table!r} "
                               "(unknown id, or not failed)", EXIT_FAILURE)
    emit(args, f"retried dead letter {args.job_id}", {"retried": 1, "id": args.job_id})
    return EXIT_OK


def command_recover(args: argparse.Namespace) -> int:
    with open_driver(args) as driver:
        count = driver.recover_stale_jobs(args.timeout)
    emit(args, f"recovered {count} stale job{'s' * (count != 1)} (held over {args.timeout:g}s without a "
               "heartbeat: back to pending, or to the dead letters once out of attempts)", {"recovered": count})
    return EXIT_OK


def command_cancel(args: argparse.Namespace) -> int:
    """Cancel one job, or a whole batch; an unknown id or batch is a failure (exit 1)."""
    if (args.job_id is None) == (args.batch is None):
        args.usage_error("give a job id or --batch BATCH (not both)")
    with open_driver(args) as driver:
        if args.batch is not None:
            try:
                counts = driver.batch(args.batch).cancel()
            except NotFoundError as error:
                raise CommandError(str(error), EXIT_FAILURE) from error
            emit(args, f"batch {args.batch}: cancelled {counts['pending']} pending and {counts['waiting']} waiting "
                       f"jobs, asked {counts['running']} running ones to stop", {"batch": args.batch, **counts})
            return EXIT_OK
        try:
            acted = driver.cancel(args.job_id)
        except NotFoundError as error:
            raise CommandError(str(error), EXIT_FAILURE) from error
    if not acted:
        raise CommandError(f"job {args.job_id!r} has already finished; nothing to cancel", EXIT_FAILURE)
    emit(args, f"cancelled job {args.job_id} (a running job stops when its worker sees it)",
         {"cancelled": 1, "id": args.job_id})
    return EXIT_OK


def command_pause(args: argparse.Namespace) -> int:
    with open_driver(args) as driver:
        (driver.pause if args.command == "pause" else driver.resume)(args.queue)
    done = "paused" if args.command == "pause" else "resumed"
    emit(args, f"{done} queue {args.queue!r}" + (" (running jobs finish; no worker claims more)"
                                                 if done == "paused" else ""), {"queue": args.queue, "action": done})
    return EXIT_OK


def command_limits(args: argparse.Namespace) -> int:
    """Set, clear or show one queue's limits: options given replace its limits, --clear removes them."""
    from .errors import InvalidInputError

    if args.clear and (args.concurrency is not None or args.rate is not None):
        args.usage_error("--clear removes every limit: give it alone, or give the limits to set")
    if args.per is not None and args.rate is None:
        args.usage_error("--per goes with --rate")
    rate = args.rate
    if rate is not None and rate.isdigit():
        rate = int(rate)
    with open_driver(args) as driver:
        try:
            if args.clear or args.concurrency is not None or rate is not None:
                driver.set_limits(args.queue, concurrency=args.concurrency, rate=rate, per=args.per,
                                  create=args.create)
            elif not driver.store.queue_is_known(args.queue):
                raise NotFoundError(f"queue {args.queue!r} has no jobs and no settings in table {args.table!r}")
        except (InvalidInputError, NotFoundError) as error:
            raise CommandError(str(error), EXIT_FAILURE) from error
        frame = driver.queues()
    shown = frame[frame["queue"] == args.queue][["queue", "paused", "concurrency", "rate", "per_s",
                                                 "started_in_window", "processing", "pending"]]
    emit(args, shown.to_string(index=False), json_records(shown)[0] if len(shown) else {"queue": args.queue})
    return EXIT_OK


def command_queues(args: argparse.Namespace) -> int:
    with open_driver(args) as driver:
        frame = driver.queues()
    human = frame.to_string(index=False) if len(frame) else f"no queues in table {args.table!r}"
    emit(args, human, json_records(frame))
    return EXIT_OK


def command_top(args: argparse.Namespace) -> int:
    """A live terminal view (kronix_data/top.py); one set of tables when stdout is not a terminal."""
    from .top import run_top  # rich only for this command

    with open_driver(args) as driver:
        return run_top(driver, interval=args.interval)


def command_schedules(args: argparse.Namespace) -> int:
    """The schedules: cron, time zone, the next slot and the slot last fired."""
    with open_driver(args) as driver:
        frame = driver.schedules()
    stamp = (lambda value: value.strftime("%Y-%m-%d %H:%M:%S") if value == value and value is not None else "-")
    rows = [{**record, "next_run_at": f"{stamp(record['next_run_at'])} UTC" if record["next_run_at"] == record[
        "next_run_at"] else "-", "last_run_at": stamp(record["last_run_at"])}
        for record in frame.to_dict(orient="records")]
    human = text_table(rows, ["name", "task", "cron", "timezone", "queue", "next_run_at", "last_run_at"]) \
        if rows else f"no schedules on table {args.table!r}"
    emit(args, human, json_records(frame))
    return EXIT_OK


def command_unschedule(args: argparse.Namespace) -> int:
    with open_driver(args) as driver:
        removed = driver.unschedule(args.name)
    if not removed:
        raise CommandError(f"no schedule named {args.name!r} on table {args.table!r}", EXIT_FAILURE)
    emit(args, f"removed schedule {args.name!r} (the jobs it fired stay)", {"removed": args.name})
    return EXIT_OK


def command_worker(args: argparse.Namespace) -> int:
    """Import the job modules first, so a typo fails fast without touching the database."""
    import_job_modules(args.modules)
    from .worker import Worker  # imported here so the other commands work without it

    options = {name: value for name, value in (("concurrency", args.concurrency),
                                               ("lease_timeout", args.lease_timeout),
                                               ("pool", args.pool),
                                               ("resources", args.resources)) if value is not None}
    with open_driver(args) as driver:
        if args.local_channel is not None:  # started by start_local_workers: options and __main__ tasks from there
            from .local import local_worker

            local_worker(driver, args.local_channel).run()
            return EXIT_OK
        worker = Worker(driver, queues=tuple(args.queues or ["default"]), burst=args.burst,
                        scheduler=not args.no_scheduler, **options)
        with serving_metrics(worker, args.metrics_port, args.metrics_host):
            worker.run()
    return EXIT_OK


@contextmanager
def serving_metrics(worker, port: int | None, host: str) -> Iterator[None]:
    """``worker --metrics-port``: the worker's Prometheus metrics over HTTP while it runs (kronix_data/metrics.py)."""
    if port is None:
        yield
        return
    from .metrics import serve_metrics

    try:
        server, _thread = serve_metrics(worker, port, host)
    except (OSError, OverflowError) as error:  # taken, not ours to bind, or not a port (> 65535)
        reason = getattr(error, "strerror", None) or error
        raise CommandError(f"cannot serve metrics on {host}:{port}: {reason}", EXIT_FAILURE) from error
    print(f"kronix worker: metrics on http://{host}:{server.server_port}/metrics", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def command_demo(args: argparse.Namespace) -> int:
    """Generate, enqueue, work and analyse a chunked ETL batch (see kronix_data/demo.py)."""
    from . import demo  # imported here, so that no other command registers the demo's task

    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    with open_driver(args, require_table=False) as driver:
        say(f"kronix demo: {args.rows:,} rows in chunks of {args.chunk_size:,} on {shown_url(args.db)}, "
            f"table {args.table!r} (emptied first)")
        try:
            result = demo.run_demo(driver, rows=args.rows, chunk_size=args.chunk_size, processes=args.processes,
                                   progress=True, timeout=args.timeout, say=say)
        except demo.TableInUse as error:
            raise CommandError(str(error), EXIT_FAILURE) from error
        except TimeoutError as error:
            raise CommandError(f"the demo batch did not finish within {args.timeout:g}s ({error}); "
                               "see 'kronix stats' for where it stands", EXIT_FAILURE) from error
    emit(args, demo.report(result), demo.summary(result))
    return EXIT_OK


def import_job_modules(modules: list[str]) -> None:
    """Import each module (from the current directory too), where jobs register themselves."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except (ImportError, SyntaxError) as error:
            raise CommandError(f"cannot import module {module!r}: {type(error).__name__}: {error}",
                               EXIT_IMPORT) from error
        log.info("imported %s", module)


def bounded(kind: type, minimum: float, *, inclusive: bool = True):
    """An argparse type for a finite number of ``kind`` from (or above) ``minimum``."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid float value"
    return parse


def resources_option(text: str) -> dict[str, float]:
    """An argparse type for ``--resources gpu=1,mem=64G``."""
    from .resources import parse_resources

    try:
        return parse_resources(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def global_options() -> argparse.ArgumentParser:
    """Options every command takes; defaults are filled in later so they work on either side."""
    options = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    options.add_argument("--db", metavar="URL", help=f"database URL (default: $KRONIX_DATABASE_URL, else {DEFAULT_URL})")
    options.add_argument("--table", metavar="NAME", help=f"jobs table (default: $KRONIX_TABLE, else {DEFAULT_TABLE})")
    options.add_argument("--read-db", metavar="URL", help="a hot standby to read stats, dead letters and queues "
                                                          "from (default: $KRONIX_READ_DATABASE_URL, else none)")
    options.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    options.add_argument("-v", "--verbose", action="store_true", help="log at INFO level on stderr")
    return options


def build_parser() -> argparse.ArgumentParser:
    common = global_options()
    parser = RedactingArgumentParser(prog="kronix", parents=[common], epilog=EPILOG,
                                     description="Manage a kronix-data job queue and run its workers.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kronix-data {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, parents=[common], help=help_text, description=help_text,
                                      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        command.set_defaults(handler=handler, usage_error=command.error)
        return command

    add("init", command_init, "create the jobs table, or upgrade an older one in place")
    stats = add("stats", command_stats, "per-queue counts and timings")
    stats.add_argument("--plot", metavar="FILE.png", help="also write the throughput chart (driver.timeline) as a PNG")
    stats.add_argument("--freq", default="1min", help="with --plot: the interval, e.g. 10s, 1min, 1h (default: 1min)")
    stats.add_argument("--since", default="1h", help="with --plot: how far back, e.g. 30min, 1h, 7d (default: 1h)")
    dead = add("dead-letters", command_dead_letters, "list failed jobs, newest first")
    dead.add_argument("--queue", help="only this queue")
    dead.add_argument("--limit", type=bounded(int, 1), help="show at most this many")
    retry = add("retry", command_retry, "run dead letters again (attempts reset to 0)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("job_id", nargs="?", metavar="ID", help="the dead letter to retry")
    which.add_argument("--all", action="store_true", help="retry every dead letter (filtered by --queue/--name)")
    retry.add_argument("--queue", help="with --all: only this queue")
    retry.add_argument("--name", help="with --all: only jobs of this name")
    cancel = add("cancel", command_cancel, "cancel a job or a batch (pending and waiting ones at once, running "
                                            "ones when their worker sees it), with every job waiting for them")
    cancel.add_argument("job_id", nargs="?", metavar="ID", help="the job to cancel")
    cancel.add_argument("--batch", metavar="BATCH", help="cancel every unfinished job of this batch")
    pause = add("pause", command_pause, "stop every worker from claiming jobs of a queue (running ones finish)")
    pause.add_argument("queue", metavar="QUEUE")
    resume = add("resume", command_pause, "let workers claim jobs of a paused queue again")
    resume.add_argument("queue", metavar="QUEUE")
    add("queues", command_queues, "each queue: paused or not, its limits and their use, and its jobs by status")
    limits = add("limits", command_limits, "limit a queue for every worker: jobs processing at once, jobs started "
                                           "per period (given limits replace the queue's; none: show them)")
    limits.add_argument("queue", metavar="QUEUE")
    limits.add_argument("--concurrency", type=bounded(int, 1), metavar="N", help="at most N jobs processing at once")
    limits.add_argument("--rate", metavar="N|N/PERIOD", help="at most N jobs started per --per seconds (default 1), "
                                                              "or e.g. 100/min")
    limits.add_argument("--per", type=bounded(float, 0, inclusive=False), metavar="SECONDS",
                        help="the period of a numeric --rate (default: 1)")
    limits.add_argument("--clear", action="store_true", help="remove every limit of the queue")
    limits.add_argument("--create", action="store_true", help="allow a queue with no jobs or settings yet")
    add("workers", command_workers, "workers of this table: live ones, and those stopped or gone in the last hour")
    top = add("top", command_top, "a live view of the queues, newest batches, throughput, live workers and the "
                                   "latest failures (q quits); printed once when stdout is not a terminal")
    top.add_argument("--interval", type=bounded(float, 0.1), default=1.0, metavar="SECONDS",
                     help="seconds between redraws (default: 1)")
    add("schedules", command_schedules, "the cron schedules: next slot and the slot last fired")
    unschedule = add("unschedule", command_unschedule, "remove a schedule (the jobs it fired stay)")
    unschedule.add_argument("name", metavar="NAME")
    recover = add("recover", command_recover, "return jobs of dead workers to pending")
    recover.add_argument("--timeout", type=bounded(float, 0), default=300.0, metavar="SECONDS",
                         help="lease age after which a job counts as stale (default: 300)")
    worker = add("worker", command_worker, "run jobs until stopped (SIGTERM/SIGINT finish gracefully)")
    worker.add_argument("-q", "--queue", dest="queues", action="append", metavar="QUEUE",
                        help="queue to work, repeatable (default: default)")
    worker.add_argument("-c", "--concurrency", type=bounded(int, 1), help="jobs run at once (default: the Worker's)")
    worker.add_argument("-m", "--import", dest="modules", action="append", default=[], metavar="MODULE",
                        help="module defining the jobs, repeatable; the current directory is searched")
    worker.add_argument("--burst", action="store_true", help="stop once the queues are empty")
    worker.add_argument("--no-scheduler", action="store_true",
                        help="do not fire the table's schedules (another worker does)")
    worker.add_argument("--lease-timeout", type=bounded(float, 0, inclusive=False), metavar="SECONDS",
                        help="how long a held job may go without a heartbeat (default: the Worker's)")
    worker.add_argument("--metrics-port", type=bounded(int, 0), metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: a free port, printed on stderr)")
    worker.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                        help="the address the metrics listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    worker.add_argument("--local-channel", type=int, metavar="FD", help=argparse.SUPPRESS)  # start_local_workers'
    worker.add_argument("--pool", choices=("thread", "process"),
                        help="run jobs on threads (default) or each slot in a child process that is killed "
                             "at a job's timeout or memory limit and replaced when it crashes")
    worker.add_argument("--resources", metavar="NAME=AMOUNT,...", type=resources_option,
                        help="what this worker has, like gpu=1,mem=64G: it claims only jobs whose requirements "
                             "these cover, and runs no more of them at once than they allow")
    demo = add("demo", command_demo, "run a generated ETL batch in chunks on local worker processes and show "
                                     "its stats and failures (on sqlite:///kronix_demo.db unless --db is given)")
    demo.add_argument("--rows", type=bounded(int, 1), default=DEMO_ROWS, metavar="N",
                      help=f"rows of generated sales (default: {DEMO_ROWS:,})")
    demo.add_argument("--chunk-size", type=bounded(int, 1), default=DEMO_CHUNK_SIZE, metavar="N",
                      help=f"rows per chunk job (default: {DEMO_CHUNK_SIZE:,})")
    demo.add_argument("--processes", type=bounded(int, 1), default=2, metavar="N",
                      help="local worker processes (default: 2)")
    demo.add_argument("--timeout", type=bounded(float, 0, inclusive=False), default=600.0, metavar="SECONDS",
                      help="give up if the batch has not finished by then (default: 600)")
    return parser


def settle_global_options(args: argparse.Namespace) -> None:
    """Command line first, then the environment, then the built-in defaults."""
    if args.command == "demo":  # it empties its table: never one chosen by the environment
        args.db = getattr(args, "db", None) or DEMO_URL
        args.table = getattr(args, "table", None) or DEMO_TABLE
    args.db = getattr(args, "db", None) or os.environ.get("KRONIX_DATABASE_URL") or DEFAULT_URL
    args.table = getattr(args, "table", None) or os.environ.get("KRONIX_TABLE") or DEFAULT_TABLE
    args.read_db = getattr(args, "read_db", None) or (None if args.command == "demo"
                                                      else os.environ.get("KRONIX_READ_DATABASE_URL"))
    args.json = getattr(args, "json", False)
    args.verbose = getattr(args, "verbose", False)


def configure_logging(verbose: bool, password: str | tuple[str | None, ...] | None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(password))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)  # SQL echo is not what -v is for


def database_error_message(error: sa.exc.SQLAlchemyError) -> str:
    """The driver's own words on one line (SQLAlchemy's wrapper adds the statement and a link)."""
    text = str(getattr(error, "orig", None) or error)
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    settle_global_options(args)
    password = (database_password(args.db), database_password(args.read_db))
    configure_logging(args.verbose, password)
    try:
        exit_code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's shutdown
        return exit_code
    except BrokenPipeError:
        # The reader went away ('| head'): stop quietly with the shell's SIGPIPE status, and point
        # stdout at /dev/null so the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except CommandError as error:
        message = str(error)
        exit_code = error.exit_code
    except sa.exc.SQLAlchemyError as error:
        message = f"database error ({shown_url(args.db)}): {database_error_message(error)}"
        exit_code = EXIT_DATABASE
    except KeyboardInterrupt:
        return 130
    print(f"kronix: {redact(message, password)}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
