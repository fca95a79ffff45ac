"""One GPU session: kernels at real shapes, the model against the CPU reference, then speed.

Run on the device machine from the repository root (see bench/README.md):
    python3 bench/gpu_check.py --out $OUT
Writes gpu_check.json under --out and prints a summary table last.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import triton.testing
from gguf import GGMLQuantizationType as T

from worker_orcd.bench import run_bench
from worker_orcd.cli import int_list
from worker_orcd.engine.llm import LLM
from worker_orcd.gguf.dequant import dequantize
from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.gguf.synth import random_blocks, synthesize
from worker_orcd.kernels.integer_dot import INTEGER_DOT, quantize_activation
from worker_orcd.kernels.quant_gemv import MAX_ROWS, gemv
from worker_orcd.kernels.quant_matmul import quant_matmul
from worker_orcd.kernels.quant_mmq import mmq
from worker_orcd.sampling_params import SamplingParams

# The Qwen2.5-0.5B Q4_K_M matrices: (type, rows, cols).
SHAPES = [
    (T.Q5_0, 896, 896),
    (T.Q5_0, 4864, 896),
    (T.Q8_0, 128, 896),
    (T.Q4_K, 896, 4864),
    (T.Q6_K, 896, 4864),
    (T.Q8_0, 151936, 896),
]


def poison_allocator() -> None:
    """Fill freed cache blocks with NaN so that an output element the kernel never writes shows."""
    junk = torch.full((1 << 28,), float("nan"), device="cuda")
    del junk


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    return ((y.double() - expected).norm() / expected.norm()).item()


def check_kernels(rng: np.random.Generator) -> list[dict]:
    rows = []
    for qtype, n, k in SHAPES:
        blocks = torch.from_numpy(random_blocks(qtype, n, k, rng).reshape(-1)).cuda()
        dense = dequantize(blocks, qtype, (n, k)).double()
        matrix = SimpleNamespace(blocks=blocks, qtype=qtype, shape=(n, k))
        for m in (1, 8, 32, 128, 512, 2048):
            x = torch.randn(m, k, device="cuda")
            integer = qtype in INTEGER_DOT
            seen = quantize_activation(x) if integer else x  # integer formats round x
            if m == 1 or (integer and m <= MAX_ROWS):
                call = functools.partial(gemv, x, matrix)
            elif integer:
                call = functools.partial(lambda x, matrix: mmq(x, [matrix], [None])[0], x, matrix)
            else:
                call = functools.partial(quant_matmul, x, blocks, qtype, (n, k))
            poison_allocator()
            y = call()
            finite = bool(torch.isfinite(y).all())
            error = relative_error(y, seen.double() @ dense.T)
            # batch invariance at the kernel: a row's bits as the one-row GEMV computes them
            same_bits = bool(torch.equal(y[m // 2 :][:1], gemv(x[m // 2 :][:1], matrix)))
            ms = triton.testing.do_bench_cudagraph(call, return_mode="median")
            gbps = blocks.numel() / ms / 1e6
            rows.append(
                dict(
                    kernel=f"{qtype.name} {n}x{k}",
                    m=m,
                    rel_error=error,
                    finite=finite,
                    same_bits_as_gemv=same_bits,
                    ms=ms,
                    weight_gb_per_s=gbps,
                    tops=2 * m * n * k / ms / 1e9,
                )
            )
    return rows


def last_logits(llm: LLM, prompt: list[int]) -> torch.Tensor:
    """The logits after `prompt`, through the engine's own scheduler and runner, chunk by
    chunk; its full blocks stay in the prefix cache for the next, longer prompt."""
    core = llm.engine
    seq = core.add(prompt, SamplingParams(max_tokens=1))
    logits = None
    while logits is None:
        output = core.scheduler.schedule()
        _, logits = core.runner.logits(list(output.chunks))
        core.scheduler.update(output)
    core.abort(seq)
    return logits[0].float().cpu()


def check_model(path: Path) -> dict:
    """GPU logits against the CPU float32 reference on the same file, and GPU determinism."""
    cpu, gpu = LLM.load(path, "cpu"), LLM.load(path, "cuda")
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, 151_000, (n,), generator=generator).tolist() for n in (1, 16, 200, 600)
    ]
    worst, compared, agreed, margins = 0.0, 0, 0, []
    for prompt in prompts:
        difference = last_logits(gpu, prompt) - last_logits(cpu, prompt)
        worst = max(worst, difference.abs().max().item())
    bound = 10 * worst + 1e-3
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for prompt in prompts:
        tokens_gpu = gpu.generate([prompt], greedy)[0].token_ids
        tokens_again = gpu.generate([prompt], greedy)[0].token_ids
        assert tokens_gpu == tokens_again, "the same request twice on the GPU differed"
        # Walk the CPU reference along the GPU's tokens; compare where its top-2 margin is safe.
        for step, token in enumerate(tokens_gpu):
            logits = last_logits(cpu, prompt + tokens_gpu[:step])
            top2 = logits.topk(2).values
            margin = (top2[0] - top2[1]).item()
            margins.append(margin)
            if margin > bound:
                compared += 1
                agreed += int(int(logits.argmax()) == token)
    return dict(
        max_abs_logit_diff=worst,
        margin_bound=bound,
        greedy_steps_compared=compared,
        greedy_steps_agreed=agreed,
        median_top2_margin=float(np.median(margins)),
        gpu_repeat_identical=True,
    )


def check_invariance(path: Path, others: int = 127) -> dict:
    """A request's tokens alone and among `others` random requests, greedy and seeded."""
    llm = LLM.load(path, "cuda")
    generator = torch.Generator().manual_seed(2)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 151_000, (n,), generator=generator).tolist()

    prompt = ids(100)
    report = {}
    for name, params in {
        "greedy": SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
        "seeded": SamplingParams(temperature=0.8, seed=7, max_tokens=64, ignore_eos=True),
    }.items():
        alone = llm.generate([prompt], params)[0].token_ids
        crowd = [ids(int(n)) for n in torch.randint(1, 300, (others,), generator=generator)]
        background = SamplingParams(temperature=0.8, max_tokens=96, ignore_eos=True)
        results = llm.generate(
            [*crowd[:64], prompt, *crowd[64:]],
            [background] * 64 + [params] + [background] * (others - 64),
        )
        among = results[64].token_ids
        report[name] = dict(
            identical=alone == among,
            first_difference=next(
                (i for i, (a, b) in enumerate(zip(alone, among, strict=True)) if a != b), None
            ),
        )
    return report


def profile(path: Path) -> str:
    """Where the time goes: GPU time per kernel of one 512-token prefill and of 16 decode steps,
    through the engine."""
    llm = LLM.load(path, "cuda")
    prompt = list(range(1000, 1512))
    params = SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True)
    llm.generate([prompt], params)  # compile
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        llm.generate([prompt], params)
        torch.cuda.synchronize()
    return profiler.key_averages().table(sort_by="cuda_time_total", row_limit=20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("/tmp/qwen2.5-0.5b-synth.gguf"))
    parser.add_argument(
        "--skip-model-check",
        action="store_true",
        help="skip the CPU reference (slow), not the GPU checks",
    )
    parser.add_argument("--depths", type=int_list, default=())
    parser.add_argument("--batch-sizes", type=int_list, default=())
    parser.add_argument("--ctx-size", type=int, default=8192)
    args = parser.parse_args()
    started = time.time()
    if not args.model.exists():
        synthesize("qwen2.5-0.5b", args.model)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)

    def stage(name: str, value: object, text: str | None = None) -> None:
        """Record and print each result as it comes: a run cut short keeps what it has."""
        report[name] = value
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(text if text is not None else json.dumps(value, indent=1), flush=True)

    kernels = check_kernels(np.random.default_rng(0))
    stage(
        "kernels",
        kernels,
        "\n".join(
            f"{row['kernel']:32s} m={row['m']:<4d} err={row['rel_error']:.1e} "
            f"finite={row['finite']} bits={row['same_bits_as_gemv']} {row['ms']:.4f} ms "
            f"{row['weight_gb_per_s']:.0f} GB/s {row['tops']:.1f} TOPS"
            for row in kernels
        ),
    )
    if not args.skip_model_check:
        stage("model", check_model(args.model))
    stage("invariance", check_invariance(args.model))
    gc.collect()  # the checks' engines: their KV pools go back before the bench sizes its own
    torch.cuda.empty_cache()
    bench = run_bench(
        args.model,
        "cuda",
        max_context=args.ctx_size,
        depths=args.depths,
        batch_sizes=args.batch_sizes,
    )
    tensor_bytes = sum(t.nbytes for t in GGUFFile(args.model).tensors.values())
    stage("bench", bench.as_dict() | {"file_tensor_bytes": tensor_bytes}, bench.table())
    stage("profile", profile(args.model), "")
    print(report["profile"])
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
