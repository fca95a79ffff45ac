import pytest
import torch

from worker_orcd.layers.sampler import apply_repetition_penalty, sample
from worker_orcd.sampling_params import SamplingParams

# Probabilities 0.5, 0.3, 0.15, 0.05 over four tokens.
LOGITS = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
NO_HISTORY = torch.tensor([], dtype=torch.long)


def draws(params: SamplingParams, n: int = 2000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([sample(LOGITS, NO_HISTORY, params, generator) for _ in range(n)])


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(top_p=0.9)])
def test_the_token_stays_on_the_logits_device_for_the_next_step(params: SamplingParams):
    token = sample(LOGITS, NO_HISTORY, params, torch.Generator().manual_seed(0))
    assert token.shape == (1,) and token.dtype == torch.long and token.device == LOGITS.device


def test_temperature_zero_is_argmax_and_ignores_the_generator():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.0)
    picks = {
        int(sample(logits, NO_HISTORY, params, torch.Generator().manual_seed(s))) for s in range(5)
    }
    assert picks == {int(logits.argmax())}


def test_same_seed_same_tokens_and_other_seeds_differ():
    params = SamplingParams(temperature=1.0)
    assert torch.equal(draws(params, 200, seed=42), draws(params, 200, seed=42))
    assert not torch.equal(draws(params, 200, seed=42), draws(params, 200, seed=43))


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


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0])
    apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert logits.tolist() == [1.0, -4.0, 1.0]


def test_greedy_with_repetition_penalty_avoids_the_repeated_token():
    logits = torch.tensor([3.0, 2.0, 0.0])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, torch.tensor([0]), params, torch.Generator()).tolist() == [1]
    assert logits.tolist() == [3.0, 2.0, 0.0]  # the caller's logits are not modified


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
