"""``kronix top``: the queues, the newest batches, throughput, live workers and the latest failures,
redrawn in the terminal every second with ``rich``.

What is read (``read_view``) is kept apart from how it is drawn (``render``),
as tqdm and dask keep progress logic apart from their renderers: the same
view is printed once as plain tables when stdout is not a terminal (a pipe,
a cron mail), and drawn live on the terminal's alternate screen otherwise.
The live loop waits on stdin and on a pipe the SIGWINCH handler writes to,
so ``q`` quits and a resize redraws at once, not at the next tick.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pandas as pd

from .analytics import split_error
from .batches import QUEUE_COLUMNS

#: Throughput: completions per SPARK_FREQ over the last SPARK_SPAN, drawn as a sparkline.
SPARK_FREQ, SPARK_SPAN = "10s", timedelta(minutes=2)
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
BATCHES_SHOWN, FAILURES_SHOWN = 8, 5
QUIT_KEYS = {"q", "Q"}


@dataclass
class TopView:
    """One reading of the queue for ``kronix top`` (plain DataFrames, as the driver returns them)."""

    title: str
    read_at: datetime
    queues: pd.DataFrame
    timeline: pd.DataFrame
    batches: pd.DataFrame
    workers: pd.DataFrame
    failures: pd.DataFrame


def read_view(driver) -> TopView:
    """Everything the view shows, read through the driver (on ``read_db`` where one is given)."""
    workers = driver.workers()
    return TopView(
        title=f"kronix top · table {driver.table_name} on {driver.store.url_shown}",
        read_at=datetime.now(timezone.utc),
        queues=driver.queues(),
        timeline=driver.timeline(SPARK_FREQ, since=SPARK_SPAN),
        batches=driver.batches(since=timedelta(days=1)).head(BATCHES_SHOWN),
        workers=workers[workers["state"] == "live"],
        failures=driver.jobs(status="failed", limit=FAILURES_SHOWN),
    )


def queue_limits(row: dict[str, Any]) -> str:
    """The queue's limits, as ``driver.queues()`` reports them.

    The hook for queue limits (issue 12): every column ``driver.queues()`` has
    beyond ``QUEUE_COLUMNS`` is a limit of the queue, shown as ``name=value``;
    today there are none, so this column shows ``-``.
    """
    limits = [f"{name}={value}" for name, value in row.items()
              if name not in QUEUE_COLUMNS and value is not None and value == value]
    return ", ".join(limits) or "-"


def sparkline(values: list[int]) -> str:
    """``▁▃█▅``: each value as a block of its height relative to the largest (all ``▁`` when idle)."""
    top = max(values, default=0)
    if top <= 0:
        return SPARK_BLOCKS[0] * len(values)
    return "".join(SPARK_BLOCKS[min(len(SPARK_BLOCKS) - 1, round(value / top * (len(SPARK_BLOCKS) - 1)))]
                   for value in values)


def render(view: TopView, *, live: bool = False) -> Any:
    """The view as one rich renderable: a title rule, then a table per section."""
    from rich.console import Group
    from rich.rule import Rule
    from rich.text import Text

    footer = (f"jobs/s: the last minute · trend: completed per {SPARK_FREQ}, last {SPARK_SPAN.seconds // 60} min · "
              + ("q quits; redrawn every second and on resize" if live else "one-shot view: stdout is not a terminal"))
    return Group(
        Rule(f"[bold]{view.title}[/] · {view.read_at:%H:%M:%S} UTC", align="left"),
        _queues_table(view), _batches_table(view), _workers_table(view), _failures_table(view),
        Text(footer, style="dim"),
    )


def _table(title: str, *columns: str, flexible: tuple[str, ...] = ()):
    """A table as wide as the terminal; only the ``flexible`` columns shrink (or are cut) when it is narrow."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", title_style="bold", expand=True, box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
    for column in columns:
        right = column not in ("queue", "state", "batch", "name", "worker", "error", "limits", "queues", "progress",
                               "host", "trend")
        table.add_column(column, justify="right" if right else "left", no_wrap=True, overflow="ellipsis",
                         min_width=None if column in flexible else max(len(column), 6),
                         ratio=1 if column in flexible else None)
    return table


def _queues_table(view: TopView):
    """Counts per queue; ``waiting``, ``cancelled`` and ``limits`` only when some queue has them (80 columns)."""
    rows = view.queues.to_dict(orient="records")
    for row in rows:
        row["limits"] = queue_limits(row)
    optional = [column for column in ("waiting", "cancelled") if any(row[column] for row in rows)]
    optional += ["limits"] if any(row["limits"] != "-" for row in rows) else []
    table = _table("Queues", "queue", "state", "pending", "running", *optional, "done", "failed", "jobs/s", "trend",
                   flexible=("limits", "trend"))
    timeline = view.timeline
    for row in rows:
        mine = timeline[timeline["queue"] == row["queue"]]
        last_minute = mine[mine["interval"] >= mine["interval"].max() - pd.Timedelta(seconds=50)] if len(mine) else mine
        counts = {column: row["limits"] if column == "limits" else f"{row[column]:,}" for column in optional}
        table.add_row(row["queue"], "[yellow]paused[/]" if row["paused"] else "[green]active[/]",
                      f"{row['pending']:,}", f"{row['processing']:,}", *counts.values(), f"{row['completed']:,}",
                      f"[red]{row['failed']:,}[/]" if row["failed"] else "0",
                      f"{last_minute['completed'].sum() / 60.0:.2f}", sparkline(mine["completed"].tolist()))
    if not rows:
        table.add_row("(no jobs yet)", *[""] * (len(table.columns) - 1))
    return table


def _batches_table(view: TopView):
    from rich.progress_bar import ProgressBar

    table = _table("Newest batches", "batch", "name", "progress", "done", "failed", "running", "pending",
                   flexible=("batch", "name"))
    for row in view.batches.to_dict(orient="records"):
        done = row["completed"] + row["failed"] + row["cancelled"]
        table.add_row(row["batch_id"], row["name"] or "-", ProgressBar(total=max(row["total"], 1), completed=done,
                                                                       width=24, style="grey23", complete_style="green",
                                                                       finished_style="green" if not row["failed"]
                                                                       else "red"),
                      f"{done:,}/{row['total']:,}", f"{row['failed']:,}", f"{row['processing']:,}",
                      f"{row['pending'] + row['waiting']:,}")
    if not len(view.batches):
        table.add_row("(no batch in the last day)", *[""] * 6)
    return table


def _workers_table(view: TopView):
    table = _table("Live workers", "worker", "host", "pid", "queues", "running", "seen", flexible=("worker", "queues"))
    for row in view.workers.to_dict(orient="records"):
        table.add_row(row["worker_id"], row["host"] or "-", str(row["pid"]), ",".join(row["queues"]),
                      f"{row['running']}/{row['concurrency']}", f"{row['seen_s_ago']:.0f}s ago")
    if not len(view.workers):
        table.add_row("(no live worker)", *[""] * 5)
    return table


def _failures_table(view: TopView):
    table = _table("Latest failures", "finished", "queue", "name", "error", flexible=("error",))
    for row in view.failures.to_dict(orient="records"):
        error_type, message = split_error(row["last_error"])
        finished = row["finished_at"].strftime("%H:%M:%S") if row["finished_at"] == row["finished_at"] else "-"
        table.add_row(finished, row["queue"], row["name"], f"{error_type}: {message}")
    if not len(view.failures):
        table.add_row("-", "", "", "no dead letters")
    return table


# -- running it ------------------------------------------------------------------------------


def run_top(driver, *, interval: float = 1.0, console=None) -> int:
    """Draw the view live until ``q`` (or Ctrl-C); print it once when stdout is not a terminal."""
    from rich.console import Console

    console = console or Console()
    if not console.is_terminal:
        console.print(render(read_view(driver)))
        return 0
    from rich.live import Live

    from rich.console import Group
    from rich.text import Text

    shown = None
    with _keys_and_resizes() as wait, Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            try:
                shown = render(read_view(driver), live=True)
                live.update(shown, refresh=True)
            except driver.store.database_errors as error:  # a live view rides out a database gone away
                reason = " ".join(str(getattr(error, "orig", None) or error).split())[:200]
                live.update(Group(*filter(None, [shown, Text(f"database error, retrying every {interval:g}s: "
                                                             f"{reason}", style="bold red")])), refresh=True)
            if wait(interval) == "quit":
                return 0


@contextmanager
def _keys_and_resizes() -> Iterator[Any]:
    """``wait(seconds)``: returns ``"quit"`` after a quit key, ``"resize"`` on SIGWINCH, else None at the
    timeout.  stdin is put in cbreak mode (keys arrive unbuffered, unechoed) and restored afterwards."""
    import termios
    import tty

    stdin = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    saved = termios.tcgetattr(stdin) if stdin is not None else None
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    previous = signal.signal(signal.SIGWINCH, lambda *_: _poke(wake_write))

    def wait(seconds: float) -> str | None:
        ready, _, _ = select.select([fd for fd in (stdin, wake_read) if fd is not None], [], [], seconds)
        if wake_read in ready:
            os.read(wake_read, 512)
            return "resize"
        if stdin in ready and set(os.read(stdin, 64).decode(errors="ignore")) & QUIT_KEYS:
            return "quit"
        return None

    try:
        if stdin is not None:
            tty.setcbreak(stdin)
        yield wait
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)
        os.close(wake_read)
        os.close(wake_write)


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"!")
    except BlockingIOError:  # a redraw is already asked for
        pass
