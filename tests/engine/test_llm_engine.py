"""The step loop on the real default model (SmolLM2-135M, CPU): a request's tokens are the same
alone or among 31 others, under two chunk sizes, with a prefix-cache hit or a miss, and after
preemption by a tiny KV pool; blocks all come back."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.engine.config import EngineConfig
from worker_orcd.engine.llm import LLM
from worker_orcd.engine.llm_engine import LLMEngine
from worker_orcd.engine.output import GenerationResult
from worker_orcd.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=1234)
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hum",
]


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM.load(smollm2_path, "cpu", max_context=1024)


def engine(llm: LLM, num_blocks: int = 256, **options) -> LLMEngine:
    """Another engine over the same model, with its own pool and settings."""
    config = EngineConfig(max_model_len=llm.context_length, **options)
    return LLMEngine(llm.model, llm.tokenizer, config, num_blocks)


def run(core: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]):
    """Each request's tokens, and the logits of each of its draws (bit for bit)."""
    seqs = [core.add(p, q) for p, q in zip(prompts, params, strict=True)]
    logits: dict[int, list[torch.Tensor]] = {s.seq_id: [] for s in seqs}
    forward = core.runner.logits

    def recorded(chunks):
        drawing, rows = forward(chunks)
        for seq, row in zip(drawing, rows if rows is not None else [], strict=True):
            logits[seq.seq_id].append(row.clone())
        return drawing, rows

    core.runner.logits = recorded
    try:
        while core.has_unfinished():
            core.step()
    finally:
        del core.runner.logits
    results = [GenerationResult.of(s) for s in seqs]
    # the draws read: a sequence that ends computes one step more, whose draw nobody reads
    return [
        (r.token_ids, torch.stack(logits[s.seq_id][: len(r.token_ids) + (r.stop_reason == "eos")]))
        for s, r in zip(seqs, results, strict=True)
    ]


def same(a: list, b: list) -> bool:
    """Tokens equal and every logit equal, bit for bit."""
    return len(a) == len(b) and all(
        ta == tb and torch.equal(la, lb) for (ta, la), (tb, lb) in zip(a, b, strict=True)
    )


def prompt(llm: LLM, n_words: int, offset: int = 0) -> list[int]:
    text = " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))
    return llm.tokenizer.encode(text)


def test_32_streams_give_each_request_its_tokens_alone(llm: LLM):
    prompts = [prompt(llm, 2 + (7 * i) % 30, offset=i) for i in range(32)]
    params = [GREEDY if i % 2 else SAMPLED for i in range(32)]
    together = run(engine(llm), prompts, params)
    alone = engine(llm)
    for i in range(32):
        assert same(run(alone, [prompts[i]], [params[i]]), [together[i]]), i
        assert len(together[i][0]) == 8


def test_the_chunk_size_changes_no_token(llm: LLM):
    prompts = [prompt(llm, 70), prompt(llm, 45, offset=3)]
    params = [GREEDY, SAMPLED]
    small = run(engine(llm, max_num_batched_tokens=16), prompts, params)
    large = run(engine(llm, max_num_batched_tokens=61), prompts, params)
    assert same(small, large)


def test_a_prefix_cache_hit_changes_no_token(llm: LLM):
    shared = prompt(llm, 60)
    core = engine(llm)
    miss = run(core, [shared], [SAMPLED])
    hit_seq = core.add(shared, SAMPLED)
    while core.has_unfinished():
        core.step()
    assert hit_seq.num_cached_tokens >= 32  # the prompt's leading full blocks came from the cache
    assert GenerationResult.of(hit_seq).token_ids == miss[0][0]
    assert same(run(engine(llm, enable_prefix_caching=False), [shared], [SAMPLED]), miss)
    longer = [*shared, *prompt(llm, 5, offset=9)]
    assert same(run(core, [longer], [GREEDY]), run(engine(llm), [longer], [GREEDY]))


def test_preemption_in_a_tiny_pool_loses_nothing_and_changes_no_token(llm: LLM):
    prompts = [prompt(llm, 20 + 3 * i, offset=i) for i in range(6)]
    params = [
        SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True, seed=i) for i in range(6)
    ]
    core = engine(llm, num_blocks=12)  # 192 tokens for six sequences of about 50
    squeezed = run(core, prompts, params)
    assert core.scheduler.num_preemptions > 0
    assert core.scheduler.block_manager.num_free_blocks == 12
    assert same(squeezed, run(engine(llm), prompts, params))


def test_out_of_memory_with_many_running_preempts_and_changes_no_token(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
):
    """A step of more than two sequences runs out of device memory: the engine preempts the
    newest and retries with fewer, each request ends as it would alone, and the pool is free."""
    prompts = [prompt(llm, 6 + 4 * i, offset=i) for i in range(5)]
    params = [GREEDY if i % 2 else SAMPLED for i in range(5)]
    expected = run(engine(llm), prompts, params)
    forward = llm.model.forward

    def small_steps_only(batch, cache):
        if batch.num_seqs > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(batch, cache)

    monkeypatch.setattr(llm.model, "forward", small_steps_only)
    core = engine(llm)
    assert same(run(core, prompts, params), expected)
    assert core.scheduler.num_preemptions >= 3
    assert core.scheduler.block_manager.num_free_blocks == core.num_blocks
