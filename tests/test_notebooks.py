"""The notebooks in notebooks/, executed top to bottom in a real Jupyter kernel (nbclient).

Each notebook checks its own results with ``assert`` cells; here we also look
for the outputs a reader is meant to see.  The committed files must carry no
outputs, so that git diffs stay readable and no stale results are shown.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_etl_in_chunks.ipynb", "03_failure_analysis.ipynb", "04_pipelines.ipynb",
         "05_tasks_in_cells.ipynb"]


def test_the_notebooks_are_there_and_nothing_else():
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code"
    assert [cell.outputs for cell in code] == [[] for _ in code], f"{name} has outputs: strip them"
    assert [cell.execution_count for cell in code] == [None] * len(code), f"{name} has execution counts"
    assert "widgets" not in notebook.metadata, f"{name} has saved widget state"


def run(name: str, tmp_path: Path, monkeypatch) -> list[str]:
    """Execute a notebook from its own directory; returns each code cell's output text.

    The kernel's temporary directory is ``tmp_path``, so what the notebook leaves
    behind there is its own.
    """
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel inherits the environment
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    texts = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for output in cell.outputs:
            assert output.output_type != "error", f"{name}: {output.ename}: {output.evalue}"
            parts.append(output.get("text", ""))
            parts.extend(str(value) for value in output.get("data", {}).values())
        texts.append("\n".join(parts))
    assert f"sqlite:///{tmp_path}/kronix-" in texts[0]  # its database was in the temporary directory...
    assert list(tmp_path.iterdir()) == [], f"{name} left files behind"  # ...which it cleaned up
    return texts


def flat(text: str) -> str:
    """An output with its whitespace runs made single spaces (IPython wraps a long dict over lines)."""
    return " ".join(text.split())


def test_quickstart(tmp_path, monkeypatch):
    outputs = run("01_quickstart.ipynb", tmp_path, monkeypatch)
    assert "pushed 20 jobs; 20 pending" in outputs[1]
    assert "completed=19, retried=1, dead_lettered=1" in outputs[2]  # the WorkerStats
    assert "ValueError  13 is unlucky  {'n': 13}" in outputs[5]
    assert "{'n': 3, 'square': 9}" in outputs[6]
    assert "{'total': 10, 'pending': 10," in flat(outputs[7])
    assert "chunk  rows    amount" in outputs[8]  # the chunks' records, concatenated
    assert "True {'total': 10, 'pending': 0, 'processing': 0, 'completed': 10, 'failed': 0, 'waiting': 0, 'cancelled': 0, 'units_done':" in flat(outputs[9])


def test_etl_in_chunks_across_worker_processes_with_the_monitor(tmp_path, monkeypatch):
    outputs = run("02_etl_in_chunks.ipynb", tmp_path, monkeypatch)
    # The monitor's output: the live widget until the last cell's monitor.close(), then its snapshot in place.
    assert "QueueMonitor('kronix_jobs', closed, every 0.5s" in outputs[3] and "'model_id'" not in outputs[3]
    assert "closed: the figures of its last refresh" in outputs[3] and "20/20 done · 20 completed" in outputs[3]
    assert "etl.daily_revenue" in outputs[3] and "kronix-table" in outputs[3]
    assert "LocalWorkers(0/2 alive" in outputs[4]  # burst workers left once the batch was done
    assert "{'total': 20, 'pending': 0, 'processing': 0, 'completed': 20, 'failed': 0, 'waiting': 0, 'cancelled': 0}" in flat(outputs[5])
    assert "jobs/s over the last minute" in outputs[5]
    assert "{'total': 20, 'pending': 0, 'processing': 0, 'completed': 20, 'failed': 0, 'waiting': 0, 'cancelled': 0, 'units_done':" in flat(outputs[6])
    assert "store        berlin" in outputs[7]
    assert "'units_total': 600000" in outputs[8] and "eta: 0:00:" in outputs[8]  # rows within running chunks
    assert "live" in outputs[8] and "stopped" in outputs[8]  # these workers, and the burst workers that left
    assert "gone" in outputs[9] and "live" in outputs[9]  # the killed worker, and the one that took over
    assert "attempt  resumed_from" in outputs[10]  # the chunk cut short resumed from its checkpoint
    # driver.timeline(): the 20 + 12 chunks, each started and completed once (the killed attempt's
    # chunk counts its last claim), and its chart as a PNG
    assert "default       32         32       0" in outputs[13]
    assert "iVBORw0KGgo" in outputs[13]  # base64 of the PNG signature: image/png


def test_failure_analysis_fixes_and_retries_until_complete(tmp_path, monkeypatch):
    outputs = run("03_failure_analysis.ipynb", tmp_path, monkeypatch)
    assert "{'total': 20, 'pending': 0, 'processing': 0, 'completed': 16, 'failed': 4, 'waiting': 0, 'cancelled': 0, 'units_done':" in flat(outputs[2])
    assert "KeyError      3" in outputs[3] and "ValueError    1" in outputs[3]  # the groupby
    assert "'SEK'" in outputs[4] and "21/03/2026 09:57 is not ISO8601" in outputs[4]
    assert outputs[5].startswith("ValueError: Time data 21/03/2026 09:57") and "Traceback" in outputs[5]
    assert "ordered_at = pd.to_datetime(orders" in outputs[5]  # the traceback points at the line to fix
    assert "retried 4 chunks" in outputs[7]
    assert "{'total': 20, 'pending': 0, 'processing': 0, 'completed': 20, 'failed': 0, 'waiting': 0, 'cancelled': 0, 'units_done':" in flat(outputs[7])


def test_pipelines_wait_for_their_parents_cancel_a_batch_and_pause_a_queue(tmp_path, monkeypatch):
    outputs = run("04_pipelines.ipynb", tmp_path, monkeypatch)
    assert "'waiting': 3" in flat(outputs[1]) and "JobStatus.WAITING" in outputs[1]  # step 2 waits for step 1
    assert "readings" in outputs[2] and "mean_f" in outputs[2]  # the report read its parents' results
    assert "cancelled at once: {'pending':" in outputs[3] and "cancelled" in outputs[3]
    assert "load True 6 0" in flat(outputs[4])  # the paused queue's jobs stay pending
    assert "started in this order: ['urgent', 0, 1, 2, 3, 4]" in outputs[5]


def test_a_task_defined_in_a_cell_runs_on_two_local_workers_and_its_fix_on_the_same_ones(tmp_path, monkeypatch):
    """No module file: the task is defined in a cell, and defined again after three chunks failed."""
    outputs = run("05_tasks_in_cells.ipynb", tmp_path, monkeypatch)
    assert "LocalWorkers(2/2 alive" in outputs[3]
    assert "'completed': 7, 'failed': 3" in flat(outputs[3])
    assert "cells.revenue KeyError" in flat(outputs[3]) and "no rate for ['GBP']" in outputs[3]
    pids = outputs[3].split("pids=")[1].split(")")[0]
    assert "retried 3 chunks: {'total': 10, 'pending': 0, 'processing': 0, 'completed': 10, 'failed': 0" in flat(outputs[4])
    assert f"same workers: LocalWorkers(2/2 alive, pids={pids})" in outputs[4]
    assert "chunks run by worker pid:" in outputs[5] and "berlin" in outputs[5]
    assert "name status attempts cells.revenue completed 1 10" in flat(outputs[6])  # a name, no function
