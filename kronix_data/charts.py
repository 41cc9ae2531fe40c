"""The throughput chart: a ``driver.timeline()`` frame drawn with matplotlib, as a Figure or PNG bytes.

One drawing serves the notebook (``timeline_figure``), the ``QueueMonitor``
and ``kronix stats --plot`` (``timeline_png``).  It uses matplotlib's
object API with the Agg canvas, never ``pyplot``: no global figure state, so
the monitor's background thread can draw while the kernel runs other cells,
and no display is needed.  matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd

#: Lines drawn for the totals over every queue (completed is drawn per queue).
_TOTALS = {"started": {"color": "0.55", "linestyle": "--"}, "failed": {"color": "#c62828", "linestyle": "-"}}


def timeline_figure(frame: pd.DataFrame, *, title: str | None = None, width: float = 7.0, height: float = 2.6,
                    dpi: int = 100) -> Any:
    """A matplotlib Figure of a timeline frame: jobs completed per interval for each queue, with
    jobs started and failed over all queues; an empty frame draws empty axes that say so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title or "throughput", fontsize=10, loc="left")
    if frame.empty:
        axes.text(0.5, 0.5, "no jobs in this span", ha="center", va="center", transform=axes.transAxes, color="0.4")
        axes.set_yticks([])
        return figure
    intervals = frame["interval"].dt.tz_convert("UTC").dt.tz_localize(None)
    completed = frame.assign(interval=intervals).pivot_table(index="interval", columns="queue", values="completed",
                                                              aggfunc="sum", fill_value=0)
    totals = _with_last_step(frame.assign(interval=intervals).groupby("interval")[list(_TOTALS)].sum())
    label = _interval_label(completed.index)
    completed = _with_last_step(completed)
    for queue in completed.columns:
        axes.plot(completed.index, completed[queue], drawstyle="steps-post", linewidth=1.6,
                  label=f"completed ({queue})")
    for measure, style in _TOTALS.items():
        if totals[measure].any():
            axes.plot(totals.index, totals[measure], drawstyle="steps-post", linewidth=1.4, label=f"{measure} (all)",
                      **style)
    axes.set_ylabel(f"jobs per {label}", fontsize=8)
    axes.set_xlabel("UTC", fontsize=8)
    axes.set_ylim(bottom=0)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", frameon=False)
    return figure


def timeline_png(frame: pd.DataFrame, **options: Any) -> bytes:
    """The same chart as PNG bytes (for an ipywidgets Image, a file, a web page)."""
    buffer = io.BytesIO()
    timeline_figure(frame, **options).savefig(buffer, format="png")
    return buffer.getvalue()


def _with_last_step(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its last row repeated one interval later: a step plot draws a value from its
    interval's start to the next one's, so without it the newest interval (the one filling now) has no width."""
    step = table.index[1] - table.index[0] if len(table) > 1 else pd.Timedelta(minutes=1)
    return pd.concat([table, table.iloc[[-1]].set_axis([table.index[-1] + step])])


def _interval_label(index: pd.Index) -> str:
    """``1min``, ``30s``, ``1h``: the spacing of the intervals, as the y axis says it."""
    if len(index) < 2:
        return "interval"
    seconds = int((index[1] - index[0]).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
