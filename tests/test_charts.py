"""The throughput chart: a timeline frame drawn as a real PNG, with each queue's line in its colour,
the failures in red, and an empty span drawn as empty axes that say so."""

from __future__ import annotations

import pandas as pd

from helpers import color_fraction, png_pixels
from kronix_data.charts import timeline_figure, timeline_png
from kronix_data.timeline import TIMELINE_COLUMNS

#: matplotlib's first two cycle colours (the queues' lines) and the failures' red.
BLUE, ORANGE, RED = "#1f77b4", "#ff7f0e", "#c62828"


def frame(queues=("default", "reports"), minutes: int = 30, failed_every: int | None = 5) -> pd.DataFrame:
    start = pd.Timestamp("2026-12-01 12:00", tz="UTC")
    rows = [{"interval": start + pd.Timedelta(minutes=minute), "queue": queue, "started": 20 + minute,
             "completed": 10 + minute + 5 * rank, "failed": 8 * int(bool(failed_every) and minute % failed_every == 0)}
            for minute in range(minutes) for rank, queue in enumerate(queues)]
    return pd.DataFrame(rows).astype(TIMELINE_COLUMNS)


def test_the_png_is_valid_and_draws_a_line_per_queue_and_the_failures():
    pixels = png_pixels(timeline_png(frame(), width=6, height=2.5, dpi=100))
    assert pixels.shape == (250, 600, 3)
    assert (pixels < 0.9).any(axis=-1).mean() > 0.02  # far from blank
    assert color_fraction(pixels, BLUE) > 0.002 and color_fraction(pixels, ORANGE) > 0.002
    assert color_fraction(pixels, RED, tolerance=0.04) > 0.002


def test_one_queue_draws_one_queue_line_and_no_failures_no_red():
    pixels = png_pixels(timeline_png(frame(queues=("default",), failed_every=None)))
    assert color_fraction(pixels, BLUE) > 0.002
    assert color_fraction(pixels, ORANGE, tolerance=0.04) == 0 and color_fraction(pixels, RED, tolerance=0.04) == 0


def test_an_empty_span_draws_axes_that_say_so():
    figure = timeline_figure(frame().iloc[:0], title="nothing")
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert texts == ["no jobs in this span"]
    pixels = png_pixels(timeline_png(frame().iloc[:0]))
    assert color_fraction(pixels, BLUE) == 0 and (pixels < 0.5).any()  # the frame and the words


def test_the_axis_says_the_interval():
    figure = timeline_figure(frame())
    assert figure.axes[0].get_ylabel() == "jobs per 1min"
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["completed (default)", "completed (reports)", "started (all)", "failed (all)"]
