"""The README stays true: its usage lines, narration events, model table and test command are
checked against the code they describe."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from worker_orcd import model_store
from worker_orcd.cli import build_parser

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def usage_block(command: str) -> str:
    """The README's usage lines of `worker-orcd COMMAND`, up to the end of their code block."""
    start = README.index(f"worker-orcd {command} [")
    return README[start : README.index("```", start)]


def parser_options(command: str) -> set[str]:
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    sub = commands.choices[command]
    return {o for a in sub._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_the_usage_lines_name_every_option_of_the_command(command: str):
    assert set(re.findall(r"\[(--[a-z-]+)", usage_block(command))) == parser_options(command)


def test_every_narration_event_the_code_emits_is_listed():
    source = "\n".join(p.read_text() for p in (ROOT / "worker_orcd").rglob("*.py"))
    emitted = set(re.findall(r"narrate\(\s*\"([a-z_]+)\"", source))
    assert {"startup", "model_pull", "execute_end", "shutdown_complete"} <= emitted
    listed = README[README.index("Events: ") : README.index("## HTTP API")]
    assert {event for event in emitted if f"`{event}`" not in listed} == set()


def test_the_model_table_is_the_catalog():
    rows = re.findall(r"^\| `([^`]+)`[^|]*\|[^|]*\| (\w+) \| (yes|no)", README, re.MULTILINE)
    table = {name: (architecture, runs == "yes") for name, architecture, runs in rows}
    catalog = {s.name: (s.architecture, s.runnable) for s in model_store.CATALOG.values()}
    assert table == catalog


def test_ci_runs_the_readme_s_test_command():
    command = re.search(r"^python3 -m venv .*pytest$", README, re.MULTILINE).group(0)
    assert command.replace("pip install -e", "pip install -q -e") in (ROOT / ".ci/run").read_text()


def test_the_quickstart_s_example_answers_sensibly(smollm2_path: Path):
    quickstart = re.search(r"worker-orcd (generate .*)$", README, re.MULTILINE).group(1)
    *options, prompt = shlex.split(quickstart)
    options += ["--seed", "1", "--max-tokens", "40", "--device", "cpu"]
    run = subprocess.run(
        [sys.executable, "-m", "worker_orcd.cli", *options, prompt],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "sleep" in run.stdout.lower(), run.stdout  # on topic, not a degenerate loop
