"""The command line as a user runs it: a real process on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker_orcd.gguf.reader import GGUFFile


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "worker_orcd.cli", *args]
    environment = {**os.environ, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def test_generate_json_is_reproducible(smollm2_path: Path):
    args = ("generate", "--json", "--temperature", "0.8", "--seed", "7", "--max-tokens", "12")
    first = cli(*args, "The three primary colors are")
    second = cli(*args, "The three primary colors are")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert set(result) == {
        "text",
        "token_ids",
        "prompt_token_ids",
        "seed",
        "stop_reason",
        "tokens_per_second",
    }
    assert result["seed"] == 7
    assert result["stop_reason"] in {"eos", "max_tokens"}
    assert 0 < len(result["token_ids"]) <= 12
    assert result["prompt_token_ids"] and result["tokens_per_second"] > 0
    assert json.loads(second.stdout)["token_ids"] == result["token_ids"]


def test_generate_streams_text_and_reports_speed(smollm2_path: Path):
    run = cli("generate", "--chat", "--temperature", "0", "--max-tokens", "16", "What is 2+2?")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert "tok/s" in run.stderr and "seed" in run.stderr


def clean_failure(run: subprocess.CompletedProcess[str], expected: str) -> None:
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert expected in run.stderr.strip().splitlines()[-1]


def test_a_malformed_model_fails_with_one_clear_line(tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x02\x00\x00\x00" + bytes(64))
    clean_failure(cli("generate", "--model", str(bad), "hi"), f"invalid GGUF file {bad}")
    clean_failure(cli("inspect", str(bad)), "expected version 3, found 2")


def test_an_unregistered_architecture_is_refused(gemma_path: Path):
    clean_failure(
        cli("generate", "--model", str(gemma_path), "hi"), "Unsupported architecture: gemma3"
    )


def test_a_known_model_that_cannot_run_is_refused_before_downloading(tmp_path: Path):
    home = tmp_path / "home"
    refused = cli("generate", "--model", "gemma3-270m", "hi", env={"WORKER_ORCD_HOME": str(home)})
    clean_failure(refused, "Unsupported architecture: gemma3 (supported: llama, qwen2)")
    assert not home.exists()  # not a byte downloaded


def test_an_unknown_model_name_fails_cleanly():
    clean_failure(
        cli("generate", "--model", "no-such-model", "hi"),
        "neither an existing file nor a known name",
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("generate", "--temperature", "5", "hi"), "--temperature: must be within 0-2, got 5.0"),
        (("generate", "--top-p", "1.5", "hi"), "--top-p: must be within 0-1, got 1.5"),
        (("generate", "--max-tokens", "0", "hi"), "--max-tokens: must be at least 1, got 0"),
        (("generate", "--top-k", "-1", "hi"), "--top-k: must be at least 0, got -1"),
        (
            ("generate", "--repetition-penalty", "0", "hi"),
            "--repetition-penalty: must be above 0 and at most 2, got 0.0",
        ),
        (
            ("generate", "--seed", "-3", "hi"),
            "--seed: must be at least 0 and below 18446744073709551616, got -3",
        ),
        (("generate", "--temperature", "hot", "hi"), "--temperature: expected a number, got"),
        (("serve", "--port", "80"), "--port: must be within 1024-65535, got 80"),
        (
            ("serve", "--gpu-memory-utilization", "1.5"),
            "--gpu-memory-utilization: must be above 0 and at most 1, got 1.5",
        ),
        (("serve", "--max-num-seqs", "0"), "--max-num-seqs: must be at least 1, got 0"),
        (("serve", "--http-timeout", "0"), "--http-timeout: must be above 0, got 0.0"),
        (("bench", "--repeats", "0"), "--repeats: must be at least 1, got 0"),
        (("bench", "--ctx-size", "1"), "--ctx-size: must be at least 2, got 1"),
    ],
)
def test_an_out_of_range_parameter_names_its_range_and_value(args: tuple[str, ...], expected: str):
    run = cli(*args)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert expected in run.stderr.strip().splitlines()[-1]


def test_models_list_and_inspect(smollm2_path: Path):
    listing = cli("models", "list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "SIZE", "RUNS", "STATUS"]
    for name, runs in [("smollm2-135m (default)", "yes"), ("gemma3-270m", "no (gemma3)")]:
        (line,) = [line for line in lines if line.startswith(name)]
        assert runs in line
    assert "qwen2.5-coder-0.5b" in listing.stdout
    assert str(smollm2_path) in listing.stdout
    report = cli("inspect", "smollm2-135m")
    assert report.returncode == 0, report.stderr
    assert "general.architecture" in report.stdout and "Q4_1" in report.stdout


def test_bench_runs_on_the_cpu(smollm2_path: Path):
    args = ("--prompt-tokens", "16", "--gen-tokens", "4", "--repeats", "1", "--json")
    args += ("--depths", "40", "--batch-sizes", "3")
    run = cli("bench", "--model", str(smollm2_path), "--device", "cpu", *args)
    assert run.returncode == 0, run.stderr
    assert "warming up" not in run.stderr  # --json: nothing chatty on stderr
    report = json.loads(run.stdout)
    assert report["prompt_tokens"] == 16 and report["generated_tokens"] == 4
    assert report["prefill_tokens_per_second"] > 0 and report["decode_tokens_per_second"] > 0
    (depth,) = report["depths"]
    assert depth["depth"] == 40 and depth["decode_tokens_per_second"] > 0
    (batch,) = report["batches"]
    assert batch["batch_size"] == 3 and batch["decode_tokens_per_second"] > 0
    assert batch["prompt_tokens"] == 128  # llama-batched-bench's -npp, whatever pp's length
    assert report["weights_bytes"] == sum(
        info.nbytes for info in GGUFFile(smollm2_path).tensors.values()
    )


def test_synth_writes_a_loadable_file(tmp_path: Path):
    out = tmp_path / "tiny.gguf"
    run = cli("synth", "--preset", "smollm2-135m", "--output", str(out), "--layers", "1")
    assert run.returncode == 0, run.stderr
    assert GGUFFile(out).metadata["llama.block_count"] == 1
