"""The test session's safety net: a run whose tests leave a process running fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scaling.providers import processes
from tests.process_tree import live_processes_mentioning

ROOT = Path(__file__).resolve().parents[1]
LEAKY_TEST = """
import subprocess
import sys

def test_leaves_a_process_behind(tmp_path):
    # Detached through a shell that exits at once, as the local fleet's workers are.
    subprocess.run(["/bin/sh", "-c", '"$0" -c "import time; time.sleep(300)" "$1" &',
                    sys.executable, str(tmp_path)], check=True)
"""


@pytest.mark.slow
def test_a_session_that_leaves_a_process_behind_fails_and_ends_it(tmp_path):
    test_file = tmp_path / "test_leaky.py"
    test_file.write_text(LEAKY_TEST)
    # The real fixture, loaded as a conftest is (after Django is set up).
    (tmp_path / "conftest.py").write_text(
        "import tests.conftest\n"
        "from tests.conftest import no_process_left_behind  # noqa: F401\n"
        "tests.conftest.LEFTOVER_GRACE_S = 1.0\n")
    inner_base = tmp_path / "inner"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"--basetemp={inner_base}", "--rootdir", str(ROOT), "-c",
         str(ROOT / "pyproject.toml"), "--confcutdir", str(tmp_path), str(test_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0, run.stdout
    assert "tests left 1 processes running (now killed)" in run.stdout, run.stdout
    assert "time.sleep(300)" in run.stdout
    leftovers = live_processes_mentioning(str(inner_base))
    assert not [pid for pid in leftovers if processes.is_alive(pid)]
