"""The README's code blocks, and a shell that runs them one after another as a reader would.

A block is a fenced ```sh or ```python block. The line right before a fence may say
`<!-- readme-test: skip: REASON -->`: the block is not run (the reason is required, and
tests/test_readme.py lists the skipped ones). Shell blocks run in one long-lived bash, so a
variable one block sets is there for the next, as in a reader's terminal; a command that
fails anywhere in a block (not only the last one) fails the block. Python blocks run in a
fresh interpreter with the environment that bash has exported so far.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip:\s*(.+?)\s*-->\s*$")
RUNNABLE = ("sh", "python")


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, code, first line number and skip reason."""

    language: str
    code: str
    line: int
    skip_reason: str | None = None

    @property
    def runnable(self) -> bool:
        return self.language in RUNNABLE and self.skip_reason is None


def read_blocks(text: str) -> list[Block]:
    """Return every fenced block of a Markdown text, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if opened is None:
            index += 1
            continue
        skip = SKIP.match(lines[index - 1]) if index > 0 else None
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        blocks.append(Block(opened.group(1), "\n".join(lines[index + 1:end]) + "\n",
                            index + 1, skip.group(1) if skip else None))
        index = end + 1
    return blocks


class Shell:
    """One bash process that runs blocks in turn; stdout and stderr come back together."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self._count = 0
        self.env_file = cwd / ".readme-env"
        self._proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=cwd, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)

    def run(self, code: str, timeout_s: float) -> tuple[bool, str]:
        """Run one block; return whether every command in it succeeded, and its output."""
        self._count += 1
        script = self.cwd / f".readme-block-{self._count}.sh"
        script.write_text(code)
        marker = f"readme-test-done-{self._count}"
        assert self._proc.stdin is not None
        # An ERR trap instead of `set -e`: a failure anywhere is noted, and the shell (with
        # the variables of earlier blocks) lives on to report it.
        self._proc.stdin.write(
            "set -o pipefail; readme_failed=0\n"
            "trap 'readme_failed=1; echo \"readme-test: failed: line $LINENO\"' ERR\n"
            f"source {script}\n"
            # A newline first: the block's last output may not end with one (curl's JSON).
            f"trap - ERR; env -0 > {self.env_file}; printf '\\n{marker} %s\\n' "
            "$readme_failed\n")
        self._proc.stdin.flush()
        output: list[str] = []
        deadline_s = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline_s - time.monotonic()))
            except queue.Empty:
                return False, "".join(output) + f"\n(timed out after {timeout_s} s)"
            if line.startswith(marker):
                return line.split()[1] == "0", "".join(output)
            output.append(line)

    def exported(self) -> dict[str, str]:
        """Return the environment bash had exported after the last block."""
        if not self.env_file.exists():
            return {}
        pairs = self.env_file.read_bytes().decode().split("\0")
        return dict(pair.split("=", 1) for pair in pairs if "=" in pair)

    def close(self) -> None:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, 9)
        self._proc.wait(timeout=10)


def run_python(code: str, cwd: Path, env: dict[str, str], timeout_s: float) -> tuple[bool, str]:
    """Run a Python block in a fresh interpreter; return success and its output."""
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as expired:
        return False, f"{expired.output or ''}\n(timed out after {timeout_s} s)"
    return done.returncode == 0, done.stdout
