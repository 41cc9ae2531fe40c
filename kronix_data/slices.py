"""Work a DataFrame chunk in slices that survive a crash: resume after the last slice done.

The common case of :meth:`JobContext.checkpoint`: a long chunk is worked slice by
slice, each slice's side effect written somewhere, and after each slice the job
saves how far it got (and any running totals).  A later attempt, after a kill -9
or a lost lease, starts after the last saved slice: no row before it is worked
twice, and at most the slice that was cut short is worked again.

    @kronix_data.task(name="etl.load")
    def load(payload):
        slices = kronix_data.frame_slices(payload, rows=1_000, state={"loaded": 0})
        for part in slices:                         # a DataFrame of up to 1,000 rows
            write_to_warehouse(part)                # idempotent per slice, ideally
            slices.state["loaded"] += len(part)     # saved with the slice's checkpoint
        return slices.state
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import pandas as pd

from .chunking import as_frame
from .context import current_job
from .errors import InvalidInputError


class FrameSlices:
    """The rows of a DataFrame chunk in slices of ``rows``, from where the last attempt got to.

    Attributes
    ----------
    frame
        The whole chunk (``as_frame(payload)``).
    rows
        Rows per slice.
    state
        Whatever the job carries from slice to slice (JSON: counts, sums, a
        cursor); saved with each slice's checkpoint and restored on resuming.
    start_row
        The first row (0-based, within the chunk) this attempt works: 0, or
        where the last checkpoint said to resume.
    resumed
        Whether this attempt resumed from a checkpoint of an earlier one.
    position
        The first row not worked yet.

    Progress is reported after each slice (rows done of the chunk's rows), and
    each slice ends with ``current_job().checkpoint({"row": ..., "state": ...})``:
    the job's checkpoint is this helper's, so do not save others in the same job.
    """

    def __init__(self, payload: Mapping[str, Any], rows: int = 1_000, state: Any = None):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise InvalidInputError(f"rows must be an int >= 1, got {rows!r}")
        self._context = current_job()
        self.frame: pd.DataFrame = as_frame(payload)
        self.rows = rows
        saved = self._context.checkpoint_state
        if isinstance(saved, Mapping) and isinstance(saved.get("row"), int) and 0 <= saved["row"] <= len(self.frame):
            self.start_row, self.state, self.resumed = saved["row"], saved.get("state"), True
        else:
            self.start_row, self.state, self.resumed = 0, copy.deepcopy(state), False
        self.position = self.start_row

    def __repr__(self) -> str:
        return (f"FrameSlices(rows={self.rows}, {len(self.frame)} rows in the chunk, at row {self.position}"
                f"{', resumed' if self.resumed else ''})")

    def __len__(self) -> int:
        """How many slices this attempt works."""
        return -(-(len(self.frame) - self.start_row) // self.rows)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        total = len(self.frame)
        self._context.progress(self.position, total)
        while self.position < total:
            stop = min(self.position + self.rows, total)
            yield self.frame.iloc[self.position:stop]
            # The slice is done (the loop asked for the next one): save where to resume, then move on.
            self._context.checkpoint({"row": stop, "state": self.state})
            self.position = stop
            self._context.progress(stop, total)


def frame_slices(payload: Mapping[str, Any], rows: int = 1_000, state: Any = None) -> FrameSlices:
    """Iterate a DataFrame chunk's rows in slices, checkpointing after each, resuming after a crash.

    Call it inside a task, on the payload ``driver.map`` made of a DataFrame
    chunk; see :class:`FrameSlices`.  ``state`` is the initial value of
    ``slices.state`` on a first attempt (a later one gets the saved one).
    """
    return FrameSlices(payload, rows, state)
