"""The runner's CUDA-graph plumbing, on the CPU: steps padded to a graph's shape, copied into its
static buffers and computed again from them (a replay's stand-in), give every sequence the tokens
that eager steps give it: decode steps, prefill and mixed steps, and steps too long for a graph,
with tokens still being computed read from the device. The model is a stand-in too, reading only
what a graph can read: the batch's device fields and the KV pool."""

from __future__ import annotations

import random
from collections import Counter

import torch
from torch import nn

from worker_orcd.engine.config import EngineConfig
from worker_orcd.engine.cuda_graph import StepGraphs
from worker_orcd.engine.forward_batch import ForwardBatch
from worker_orcd.engine.llm_engine import LLMEngine
from worker_orcd.gguf.reader import GGUFFile
from worker_orcd.layers.attention import KVCache
from worker_orcd.sampling_params import SamplingParams
from worker_orcd.tokenizer import load_tokenizer

VOCAB = 4096  # tokens the stand-in model draws (the tokenizer has more)


class PagedSum(nn.Module):
    """Writes each token's id to its KV slot, then reads back through its sequence's block
    table every id up to its own position: the next token is their sum modulo VOCAB. A wrong
    slot, table row or placeholder shows in every later token of its sequence."""

    device = torch.device("cpu")

    def new_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        return KVCache(1, num_blocks, block_size, 1, 1, self.device)

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        pool = cache.keys[0, :, 0, 0]
        pool.index_copy_(0, batch.slot_mapping, batch.input_ids.float())
        tokens = torch.arange(batch.input_ids.numel())
        seqs = torch.searchsorted(batch.query_starts_device, tokens, right=True) - 1
        positions = torch.arange(batch.max_context)
        blocks = batch.block_tables[seqs].gather(
            1, (positions // batch.block_size).expand(len(seqs), -1)
        )
        ids = pool[blocks * batch.block_size + positions % batch.block_size]
        return (ids * (positions[None, :] <= batch.positions[:, None])).sum(1, keepdim=True)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(hidden[:, 0].long() % VOCAB, VOCAB).float()


class ReplayedSteps(StepGraphs):
    """A graph's replay stands in as its step computed again over the static buffers."""

    replays: Counter

    def _record(self, step):
        return step

    def replay(self, shape):
        self.replays["decode" if shape.decode else "mixed"] += 1
        return super().replay(shape)


def run(core: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    seqs = [core.add(p, q) for p, q in zip(prompts, params, strict=True)]
    while core.has_unfinished():
        core.step()
    return [seq.token_ids for seq in seqs]


def test_graph_steps_give_the_eager_steps_tokens(smollm2_path, monkeypatch):
    tokenizer = load_tokenizer(GGUFFile(smollm2_path).metadata)
    # graphs of 16, 32 and 64 tokens and 1 to 8 sequences; steps of 65 to 96 tokens run eagerly
    config = EngineConfig(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=96)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 120))] for _ in range(20)]
    max_tokens = [rng.randint(1, 24) for _ in prompts]
    expected = []
    for prompt, n in zip(prompts, max_tokens, strict=True):
        tokens = list(prompt)
        for _ in range(n):
            tokens.append(sum(tokens) % VOCAB)
        expected.append(tokens)

    eager = LLMEngine(PagedSum(), tokenizer, config, num_blocks=48)
    assert run(eager, prompts, max_tokens) == expected

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    graphed = LLMEngine(PagedSum(), tokenizer, config, num_blocks=48)
    runner = graphed.runner
    runner.cache = runner.model.new_kv_cache(48 + 1, config.block_size)  # the spare block
    runner.graphs = ReplayedSteps(
        runner.model,
        runner.cache,
        config.max_num_seqs,
        config.max_num_batched_tokens,
        config.blocks_for(config.max_model_len),
    )
    runner.graphs.replays = Counter()
    assert run(graphed, prompts, max_tokens) == expected
    assert runner.graphs.replays["decode"] > 0 and runner.graphs.replays["mixed"] > 0
