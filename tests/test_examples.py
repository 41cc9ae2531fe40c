"""The README's demo, run the way a new user runs it: as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BACKENDS, database_url

ROOT = Path(__file__).resolve().parent.parent


def readme_command(marker: str) -> str:
    """The first line of the bash block after ``marker``, read as .ci/run reads the test command."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(f"<!-- {marker} -->")
    fence = next(n for n in range(start + 1, len(lines)) if lines[n].startswith("```bash"))
    return lines[fence + 1]


def test_readme_names_the_demo_and_test_commands():
    assert readme_command("demo-command") == (
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[all]' && .venv/bin/kronix demo")
    assert readme_command("test-command").endswith(".venv/bin/pytest")
    assert "examples/quickstart.py" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_quickstart_works_the_queue_and_prints_the_frames(backend, tmp_path):
    url = database_url(backend, tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), url],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "pushed 50 chunk jobs" in out and "fetch_stats():" in out and "dead_letter_jobs():" in out
    stats_line = out.split("fetch_stats():\n")[1].splitlines()[1].split()
    assert stats_line[:5] == ["default", "0", "0", "48", "2"]
    assert out.count("ValueError: negative amount") == 2
    assert "48,000 good rows" in out
