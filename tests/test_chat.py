"""`worker-orcd chat` driven through a pseudo-terminal as a person would: two turns, the first
kept in context, Ctrl-C ending only the reply being written, /exit."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

PROMPT = ">>> "


def _own_terminal() -> None:
    """In the child: a session of its own whose controlling terminal is the pseudo-terminal
    (its stdin), so that Ctrl-C there sends it SIGINT, as a shell's terminal does."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A child process on a pseudo-terminal: `type` what a person types, `until` it shows."""

    def __init__(self, *args: str):
        self.controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker_orcd.cli", *args],
            stdin=terminal, stdout=terminal, stderr=terminal, preexec_fn=_own_terminal,
        )  # fmt: skip
        os.close(terminal)
        self.shown = ""

    def type(self, text: str) -> None:
        os.write(self.controller, text.encode())

    def until(self, pattern: str, timeout: float = 120) -> str:
        """What the terminal shows from now until `pattern` (a regex) appears in it."""
        start, deadline = len(self.shown), time.monotonic() + timeout
        while not re.search(pattern, self.shown[start:]):
            ready, _, _ = select.select([self.controller], [], [], 1)
            if ready:
                try:
                    self.shown += os.read(self.controller, 65536).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    break
            assert time.monotonic() < deadline and self.process.poll() is None, self.shown
        return self.shown[start:]


def context_tokens(shown: str) -> int:
    return int(re.search(r"\[(?:stopped; )?(\d+) tokens of context\]", shown).group(1))


def test_two_turns_keep_the_first_and_ctrl_c_stops_only_the_reply(smollm2_path: Path):
    chat = Terminal(
        "chat", "--model", str(smollm2_path), "--device", "cpu", "--temperature", "0",
        "--max-tokens", "48",
    )  # fmt: skip
    chat.until(PROMPT)
    chat.type("My name is Ada. Say hello to me.\r")
    first = chat.until(r"tokens of context\]\s*\r?\n" + PROMPT)
    chat.type("What is my name?\r")
    second = chat.until(r"tokens of context\]\s*\r?\n" + PROMPT)
    # the second prompt holds the first exchange: more context than the first turn had
    assert context_tokens(second) > context_tokens(first) + 10
    chat.type("Tell me a long story about a dragon who learns to fly.\r")
    chat.until(r"dragon who learns to fly\.\r?\n.")  # the reply has begun
    chat.type("\x03")  # Ctrl-C
    stopped = chat.until(r"tokens of context\]\s*\r?\n" + PROMPT)
    assert "[stopped; " in stopped
    chat.type("/reset\r")
    chat.until(r"forgotten\]\s*\r?\n" + PROMPT)
    chat.type("/exit\r")
    assert chat.process.wait(60) == 0
