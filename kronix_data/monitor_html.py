"""Static HTML for the monitor and the batch: tables and bars that read the same in every notebook frontend.

JupyterLab, VS Code notebooks and nbconvert's HTML each bring their own CSS
(or none), and a notebook that is not trusted loses its ``<style>`` blocks. So
every rule is inline on its element: the tables are padded and aligned, and a
bar is two ``div``s, wherever the HTML is shown.  Pure: text in, text out.
"""

from __future__ import annotations

import html
from typing import Any, Callable

import pandas as pd

_FONT = "font-family: var(--jp-ui-font-family, system-ui, sans-serif); font-size: 13px"
_TABLE = "border-collapse: collapse; margin: 4px 0 8px 0; " + _FONT
_CELL = "padding: 3px 8px; border-bottom: 1px solid rgba(128, 128, 128, 0.25); white-space: nowrap"
#: Headings may wrap ("oldest pending (s)" on two lines), so a wide table still fits a notebook's output.
_HEAD = ("padding: 3px 8px; border-bottom: 1px solid rgba(128, 128, 128, 0.6); font-weight: 600; "
         "vertical-align: bottom; white-space: normal")
#: Bar colours by style, as ipywidgets names them (info: running, success: done, danger: failures).
COLOURS = {"info": "#2196f3", "success": "#4caf50", "danger": "#e53935", "": "#2196f3"}


def table(frame: pd.DataFrame, float_format: Callable[[float], str] | None = None) -> str:
    """An HTML table of ``frame`` (no index): numbers right-aligned, text left-aligned, every cell padded."""
    numeric = [pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
               for dtype in frame.dtypes]
    align = ["right" if flag else "left" for flag in numeric]
    heads = "".join(f'<th style="{_HEAD}; text-align: {side}">{html.escape(str(name))}</th>'
                    for name, side in zip(frame.columns, align))
    rows = []
    for record in frame.itertuples(index=False, name=None):
        cells = "".join(f'<td style="{_CELL}; text-align: {side}">{html.escape(_text(value, float_format))}</td>'
                        for value, side in zip(record, align))
        rows.append(f"<tr>{cells}</tr>")
    return f'<table class="kronix-table" style="{_TABLE}"><thead><tr>{heads}</tr></thead>' \
           f'<tbody>{"".join(rows)}</tbody></table>'


def _text(value: Any, float_format: Callable[[float], str] | None) -> str:
    if value is None or (isinstance(value, float) and value != value) or value is pd.NaT:
        return "–"
    if isinstance(value, float):
        return float_format(value) if float_format else f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def bar(done: float, total: float, style: str = "info", width: str = "100%") -> str:
    """A progress bar as two divs: ``done`` of ``total`` filled in the colour of ``style``."""
    fraction = 0.0 if not total else max(0.0, min(float(done) / float(total), 1.0))
    return (f'<div class="kronix-bar" style="width: {width}; height: 14px; background: rgba(128, 128, 128, 0.2); '
            f'border-radius: 3px; overflow: hidden; margin: 2px 0">'
            f'<div style="width: {fraction * 100:.1f}%; height: 100%; background: {COLOURS.get(style, COLOURS["info"])}">'
            f'</div></div>')


def bar_style(counts: dict[str, int]) -> str:
    """The bar's style for a batch's counts: danger with a failed chunk, success when all are done, else info."""
    finished = counts["completed"] + counts["failed"] + counts["cancelled"]
    return "danger" if counts["failed"] else "success" if counts["total"] and finished == counts["total"] else "info"


def batch_heading(name: str | None, batch_id: str) -> str:
    """A batch's full name in bold and its id in full beside it (the id on hover over the name too)."""
    escaped = html.escape(batch_id)
    shown = html.escape(name) if name else "batch"
    return (f'<span style="{_FONT}"><b title="{escaped}">{shown}</b> '
            f'<code style="opacity: 0.7; font-size: 12px">{escaped}</code></span>')


def batch_summary(counts: dict[str, int], running: int | None = None) -> str:
    """``12/20 done · 11 completed · 1 failed · 2 running · 4 claimed`` (waiting and cancelled when there are)."""
    finished = counts["completed"] + counts["failed"] + counts["cancelled"]
    claimed = counts["processing"]
    running = claimed if running is None else running
    parts = [f"{finished:,}/{counts['total']:,} done", f"{counts['completed']:,} completed",
             f"{counts['failed']:,} failed", f"{running:,} running"]
    if claimed != running:
        parts.append(f"{claimed:,} claimed")
    if counts.get("waiting"):
        parts.append(f"{counts['waiting']:,} waiting")
    if counts.get("cancelled"):
        parts.append(f"{counts['cancelled']:,} cancelled")
    return " · ".join(parts)


def batch_block(name: str | None, batch_id: str, counts: dict[str, int], detail: str = "") -> str:
    """One batch as static HTML: its heading, a bar of the finished chunks, and its counts."""
    finished = counts["completed"] + counts["failed"] + counts["cancelled"]
    return (f'<div style="margin: 4px 0 8px 0; max-width: 720px">{batch_heading(name, batch_id)}'
            f'{bar(finished, counts["total"], bar_style(counts))}'
            f'<div style="{_FONT}">{html.escape(detail)}</div></div>')


def section(title: str, body: str) -> str:
    return f'<div style="{_FONT}; margin-top: 6px"><b>{html.escape(title)}</b></div>{body}'
