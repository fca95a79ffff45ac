"""The batched sampler against its contract: seeded, row-independent, the softmax's distribution,
filters that limit the candidates, and the repetition penalty."""

import pytest
import torch

from worker_orcd.layers.sampler import SamplingBatch, mix32, sample, stream_key
from worker_orcd.sampling_params import SamplingParams

# Probabilities 0.5, 0.3, 0.15, 0.05 over four tokens.
LOGITS = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


def batch(params: list[SamplingParams], seeds=None, indices=None, histories=None):
    n = len(params)
    return SamplingBatch(
        params,
        seeds or [0] * n,
        indices or list(range(n)),
        histories or [[]] * n,
        torch.device("cpu"),
    )


def draws(params: SamplingParams, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """The first n tokens of one request: the same logits, token indices 0 to n-1."""
    return sample(LOGITS.expand(n, -1), batch([params] * n, [seed] * n, list(range(n))))


def test_the_hash_matches_its_integer_definition():
    def reference(x: int) -> int:  # lowbias32 in plain modular arithmetic
        x ^= x >> 16
        x = x * 0x7FEB352D % 2**32
        x ^= x >> 15
        x = x * 0x846CA68B % 2**32
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert [mix32(v) for v in values] == [reference(v) for v in values]
    assert mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]
    assert len({stream_key(seed, i) for seed in range(50) for i in range(50)}) == 2500


def test_a_batch_s_stream_keys_are_each_request_s_own_over_the_whole_seed_range():
    seeds = [0, 7, 2**53 - 1, 2**63 - 1, 2**63, 2**64 - 1]
    indices = [0, 3, 1000, 5, 2**31, 9]
    keys = batch([SamplingParams()] * len(seeds), seeds, indices).keys
    assert keys.tolist() == [stream_key(s, i) for s, i in zip(seeds, indices, strict=True)]


def test_the_token_stays_on_the_logits_device_for_the_next_step():
    tokens = sample(LOGITS.expand(3, -1), batch([SamplingParams(top_p=0.9)] * 3))
    assert tokens.shape == (3,) and tokens.dtype == torch.long and tokens.device == LOGITS.device


def test_temperature_zero_is_argmax_whatever_the_seed():
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0)] * 5
    assert torch.equal(sample(logits, batch(params, seeds=[1, 2, 3, 4, 5])), logits.argmax(-1))


def test_same_seed_same_tokens_and_other_seeds_differ():
    params = SamplingParams(temperature=1.0)
    assert torch.equal(draws(params, 200, seed=42), draws(params, 200, seed=42))
    assert not torch.equal(draws(params, 200, seed=42), draws(params, 200, seed=43))


def test_a_row_draws_the_same_token_alone_or_among_others():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 3000, generator=generator)
    params = [
        SamplingParams(temperature=0.8, seed=7),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=40),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.9, repetition_penalty=1.3),
        SamplingParams(temperature=2.0, top_k=5, top_p=0.5),
        SamplingParams(temperature=0.5),
    ]
    seeds, indices = list(range(100, 108)), list(range(20, 28))
    histories = [[1, 2, 3], [], [7], [], [9, 9], [4, 5, 6, 7], [], [8]]
    together = sample(logits, batch(params, seeds, indices, histories))
    for row in range(8):
        alone = sample(
            logits[row : row + 1],
            batch([params[row]], [seeds[row]], [indices[row]], [histories[row]]),
        )
        assert int(alone) == int(together[row]), row


def test_sampling_follows_the_softmax_distribution():
    counts = torch.bincount(draws(SamplingParams(), n=20_000), minlength=4).float() / 20_000
    assert torch.allclose(counts, LOGITS.softmax(-1), atol=0.015)


def test_low_temperature_sharpens_towards_the_top_token():
    assert (draws(SamplingParams(temperature=0.05)) == 0).all()
    hot = torch.bincount(draws(SamplingParams(temperature=2.0)), minlength=4).float() / 2000
    assert hot[3] > 0.08  # 0.05 at T=1, flatter at T=2


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(top_k=1), {0}),
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.7), {0, 1}),  # 0.5 < 0.7, so the second token is needed too
        (SamplingParams(top_p=0.5), {0}),
        (SamplingParams(top_p=0.9), {0, 1, 2}),
        (SamplingParams(min_p=0.5), {0, 1}),  # keeps p >= 0.25
        (SamplingParams(min_p=0.25), {0, 1, 2}),  # keeps p >= 0.125
    ],
)
def test_filters_limit_the_candidates(params: SamplingParams, allowed: set[int]):
    assert set(draws(params).tolist()) == allowed


def test_greedy_with_repetition_penalty_avoids_the_repeated_token():
    logits = torch.tensor([[3.0, 2.0, 0.0], [-1.0, -2.0, -3.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)] * 2
    # row 0: 3/2 < 2; row 1: -1*2 < -2 is false (-2 == -2): the first of equals wins
    assert sample(logits, batch(params, histories=[[0], [0, 0]])).tolist() == [1, 0]
    assert logits.tolist() == [[3.0, 2.0, 0.0], [-1.0, -2.0, -3.0]]  # the caller's, untouched


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": 2.5},
        {"temperature": -0.1},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"top_k": -1},
        {"max_tokens": 0},
        {"repetition_penalty": 0.0},
        {"seed": -1},
        {"seed": 1 << 64},
        {"stop": ("",)},
    ],
)
def test_out_of_range_parameters_are_refused(bad: dict):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)
