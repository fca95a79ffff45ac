"""`worker-orcd`: serve | generate | chat | bench | synth | models | inspect.

Errors a user can cause (a bad file, an unknown model, bad parameters) end with one line on
stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from worker_orcd import model_store
from worker_orcd.engine.llm import DEFAULT_MAX_CONTEXT
from worker_orcd.engine.memory import InsufficientVram
from worker_orcd.gguf.reader import GGUFError, GGUFFile
from worker_orcd.gguf.synth import PRESETS as PRESET_NAMES
from worker_orcd.models import UnsupportedArchitectureError
from worker_orcd.sampling_params import BOUNDS, Bounds, SamplingParams
from worker_orcd.tokenizer import TokenizerError

API_KEY_ENV = "WORKER_ORCD_API_KEY"
CTX_HELP = "KV cache positions: the model's context, capped at this (default %(default)s)"
USER_ERRORS = (
    InsufficientVram,
    GGUFError,
    UnsupportedArchitectureError,
    model_store.ModelStoreError,
    TokenizerError,
    ValueError,
    OSError,
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quiet(message: str) -> None:
    """Where stdout carries JSON for a program: nothing chatty on stderr either."""


def resolve_model(model: str, json_output: bool = False, to_run: bool = True) -> Path:
    """`--model` to a file; a pull shows its progress bars to a person at a terminal."""
    progress = sys.stderr.isatty() and not json_output
    return model_store.resolve(model, quiet if json_output else log, to_run, progress)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def cmd_chat(args: argparse.Namespace) -> None:
    import readline  # noqa: F401  (line editing and history for input())

    from worker_orcd.chat import Chat
    from worker_orcd.engine.llm import LLM

    params = sampling_params(args)
    path = resolve_model(args.model)
    llm = LLM.load(path, args.device, max_context=args.ctx_size)
    log(f"loaded {path.name} ({llm.gguf.architecture}) on {llm.device}")
    Chat(llm, params).run(status=log)


def cmd_generate(args: argparse.Namespace) -> None:
    from worker_orcd.engine.llm import LLM

    params = sampling_params(args)
    path = resolve_model(args.model, args.json)
    llm = LLM.load(path, args.device, max_context=args.ctx_size)
    if not args.json:
        log(f"loaded {path.name} ({llm.gguf.architecture}) on {llm.device}")
    tokenizer = llm.tokenizer
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt_ids = tokenizer.encode(text, add_special=False)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    generation = llm.stream(prompt_ids, params)
    for chunk in generation:
        if not args.json:
            print(chunk.text, end="", flush=True)
    result = generation.result
    assert result is not None
    if args.json:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "prompt_token_ids": result.prompt_token_ids,
                    "seed": result.seed,
                    "stop_reason": result.stop_reason,
                    "tokens_per_second": round(result.tokens_per_second, 2),
                },
                ensure_ascii=False,
            )
        )
        return
    print()
    log(
        f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tok/s, "
        f"first token {result.prefill_seconds * 1000:.0f} ms, stop: {result.stop_reason}, "
        f"seed {result.seed}]"
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from worker_orcd.server.connections import HttpLimits
    from worker_orcd.server.main import ServeOptions, serve

    options = ServeOptions(
        worker_id=args.worker_id,
        model=args.model,
        gpu_device=args.gpu_device,
        port=args.port,
        host=args.host,
        device=args.device,
        callback_url=args.callback_url,
        ctx_size=args.ctx_size,
        max_num_seqs=args.max_num_seqs,
        max_queued=args.max_queued,
        gpu_memory_utilization=args.gpu_memory_utilization,
        shutdown_timeout=args.shutdown_timeout,
        limits=HttpLimits(read_timeout=args.http_timeout, max_connections=args.max_connections),
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
    )
    raise SystemExit(serve(options))


def worker_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a UUID, found {value!r}") from None


def bounded(kind: type[int] | type[float], bounds: Bounds) -> Callable[[str], float]:
    """An argparse type: the value in `bounds`, else an error that states the valid range and
    what was given (argparse names the parameter: `argument --temperature: must be ...`)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not bounds.holds(value):
            raise argparse.ArgumentTypeError(f"must be {bounds.describe()}, got {value!r}")
        return value

    return parse


POSITIVE = bounded(int, Bounds(ge=1))
PORT = bounded(int, Bounds(ge=1024, le=65535))
SECONDS = bounded(float, Bounds(gt=0.0))
CONTEXT = bounded(int, Bounds(ge=2))  # a prompt token and a generated one


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, found {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, found {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> None:
    from worker_orcd.bench import run_bench

    path = resolve_model(args.model, args.json)
    report = run_bench(
        path,
        args.device,
        args.prompt_tokens,
        args.gen_tokens,
        args.repeats,
        args.ctx_size,
        args.depths,
        args.batch_sizes,
        say=quiet if args.json else log,
    )
    print(json.dumps(report.as_dict()) if args.json else report.table())


def cmd_synth(args: argparse.Namespace) -> None:
    from worker_orcd.gguf.synth import synthesize

    path = synthesize(
        args.preset,
        args.output,
        layers=args.layers,
        tokenizer_from=args.tokenizer_from,
        seed=args.seed,
    )
    log(f"wrote {path} ({path.stat().st_size:,} bytes)")


def cmd_models_pull(args: argparse.Namespace) -> None:
    names = list(model_store.CATALOG) if args.all else [args.name]
    for name in names:
        spec = model_store.lookup(name)
        if not spec.runnable:
            log(f"{name}: its architecture, {spec.architecture}, is not one this worker runs")
        model_store.pull(name, log, progress=sys.stderr.isatty())


def cmd_models_list(args: argparse.Namespace) -> None:
    rows = [("NAME", "SIZE", "RUNS", "STATUS", "DESCRIPTION")]
    for spec in model_store.CATALOG.values():
        pulled = model_store.is_pulled(spec)
        status = str(model_store.model_path(spec)) if pulled else "not pulled"
        default = " (default)" if spec.name == model_store.DEFAULT_MODEL else ""
        runs = "yes" if spec.runnable else f"no ({spec.architecture})"
        size = f"{spec.size / 1e6:.0f} MB"
        rows.append((spec.name + default, size, runs, status, spec.description))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[4]
        )


def cmd_inspect(args: argparse.Namespace) -> None:
    from worker_orcd.gguf.inspect import describe

    path = resolve_model(args.file, to_run=False)
    print(describe(GGUFFile(path), max_tensors=None if args.all_tensors else 40))


def add_generation_arguments(
    parser: argparse.ArgumentParser, model_help: str, max_tokens: int
) -> None:
    """The model and sampling options of `generate` and `chat`."""
    parser.add_argument("--model", default=model_store.DEFAULT_MODEL, help=model_help)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--max-tokens", type=POSITIVE, default=max_tokens)
    parser.add_argument(
        "--temperature", type=bounded(float, BOUNDS["temperature"]), default=1.0, help="0 is greedy"
    )
    parser.add_argument(
        "--seed", type=bounded(int, BOUNDS["seed"]), help="generated and reported when absent"
    )
    parser.add_argument("--top-k", type=bounded(int, BOUNDS["top_k"]), default=0, help="0 disables")
    parser.add_argument(
        "--top-p", type=bounded(float, BOUNDS["top_p"]), default=1.0, help="1 disables"
    )
    parser.add_argument(
        "--min-p", type=bounded(float, BOUNDS["min_p"]), default=0.0, help="0 disables"
    )
    parser.add_argument(
        "--repetition-penalty",
        type=bounded(float, BOUNDS["repetition_penalty"]),
        default=1.0,
        help="1 disables",
    )
    parser.add_argument("--stop", action="append", default=[], help="stop text (repeatable)")
    parser.add_argument("--ctx-size", type=CONTEXT, default=DEFAULT_MAX_CONTEXT, help=CTX_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker-orcd", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = f"a GGUF path or a known model name (default {model_store.DEFAULT_MODEL})"

    generate = commands.add_parser("generate", help="generate text from a prompt")
    generate.add_argument("prompt")
    add_generation_arguments(generate, model_help, max_tokens=256)
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template")
    generate.add_argument("--json", action="store_true", help="print one JSON object at the end")
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="talk with the model at the terminal")
    add_generation_arguments(chat, model_help, max_tokens=512)
    chat.set_defaults(run=cmd_chat)

    serve = commands.add_parser("serve", help="run the HTTP worker (SSE, health, cancel, /v1)")
    serve.add_argument("--model", default=model_store.DEFAULT_MODEL, help=model_help)
    serve.add_argument(
        "--worker-id",
        type=worker_id,
        default=str(uuid.uuid4()),
        help="this worker's UUID (default: a new one)",
    )
    serve.add_argument(
        "--gpu-device", type=bounded(int, Bounds(ge=0)), default=0, help="CUDA device index"
    )
    serve.add_argument("--port", type=PORT, default=8080)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    serve.add_argument(
        "--callback-url", help="POSTed {worker_id, model_ref, vram_bytes, uri} when ready"
    )
    serve.add_argument("--ctx-size", type=CONTEXT, default=DEFAULT_MAX_CONTEXT, help=CTX_HELP)
    serve.add_argument(
        "--max-num-seqs",
        type=POSITIVE,
        default=256,
        help="sequences decoded together in one batch (default %(default)s)",
    )
    serve.add_argument(
        "--max-queued",
        type=POSITIVE,
        default=1024,
        help="jobs waiting to start; the next one gets 503 QUEUE_FULL (default %(default)s)",
    )
    serve.add_argument(
        "--gpu-memory-utilization",
        type=bounded(float, Bounds(gt=0.0, le=1.0)),
        default=0.90,
        help="share of the GPU's memory for weights, activations and the KV cache "
        "(default %(default)s)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=bounded(float, Bounds(ge=0.0)),
        default=4.0,
        help="seconds running jobs get to finish after SIGTERM or /shutdown (default %(default)s)",
    )
    serve.add_argument(
        "--http-timeout",
        type=SECONDS,
        default=10.0,
        help="seconds a client gets for a request's headers and each part of its body "
        "(default %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=POSITIVE,
        default=512,
        help="open HTTP connections; the next one gets 503 (default %(default)s)",
    )
    serve.add_argument(
        "--api-key",
        help=f"require `Authorization: Bearer KEY` on every endpoint but /health (default: "
        f"${API_KEY_ENV}, else none)",
    )
    serve.set_defaults(run=cmd_serve)

    bench = commands.add_parser("bench", help="prefill and decode speed, like llama-bench")
    bench.add_argument("--model", default=model_store.DEFAULT_MODEL, help=model_help)
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bench.add_argument("--prompt-tokens", type=POSITIVE, default=512, help="pp: prefill length")
    bench.add_argument("--gen-tokens", type=POSITIVE, default=128, help="tg: tokens generated")
    bench.add_argument("--repeats", type=POSITIVE, default=5, help="runs per figure (median)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--ctx-size", type=CONTEXT, default=DEFAULT_MAX_CONTEXT, help=CTX_HELP)
    bench.add_argument(
        "--depths", type=int_list, default=(), help="e.g. 512,2048: pp and tg at these depths"
    )
    bench.add_argument(
        "--batch-sizes",
        type=int_list,
        default=(),
        help="e.g. 8,32,128: streams of 128-token prompts decoding at once",
    )
    bench.set_defaults(run=cmd_bench)

    synth = commands.add_parser("synth", help="write a random-weight GGUF of a real model's shape")
    synth.add_argument("--preset", required=True, choices=sorted(PRESET_NAMES))
    synth.add_argument("--output", required=True, type=Path)
    synth.add_argument(
        "--layers", type=POSITIVE, help="fewer layers than the preset, for quick tests"
    )
    synth.add_argument("--tokenizer-from", type=Path, help="copy the tokenizer of this GGUF")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=cmd_synth)

    models = commands.add_parser("models", help="the offline model store")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    pull = models_commands.add_parser("pull", help="download, assemble and verify a model")
    pull.add_argument(
        "name", nargs="?", default=model_store.DEFAULT_MODEL, choices=list(model_store.CATALOG)
    )
    pull.add_argument("--all", action="store_true", help="pull every known model")
    pull.set_defaults(run=cmd_models_pull)
    listing = models_commands.add_parser("list", help="known models and where they are")
    listing.set_defaults(run=cmd_models_list)

    inspect = commands.add_parser("inspect", help="print a GGUF file's metadata and tensors")
    inspect.add_argument("file", help="a GGUF path or a known model name")
    inspect.add_argument("--all-tensors", action="store_true", help="list every tensor")
    inspect.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except USER_ERRORS as error:
        log(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
