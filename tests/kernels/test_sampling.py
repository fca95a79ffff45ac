"""The one-pass Gumbel-max draw against the sampler's torch reference."""

from __future__ import annotations

import torch

from worker_orcd.kernels.sampling import BLOCK, gumbel_argmax
from worker_orcd.layers.sampler import SamplingBatch, gumbel_noise, stream_key
from worker_orcd.sampling_params import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_the_draw_is_the_reference_s_on_noise_alone_and_on_filtered_logits():
    vocab = 2 * BLOCK + 77  # a partial last block
    generator = torch.Generator().manual_seed(0)
    pairs = [(0, 0), (7, 3), (2**64 - 1, 9), (5, 2**31)] * 2  # the kernel derives the keys
    seeds = torch.tensor([seed - 2**64 if seed >= 2**63 else seed for seed, _ in pairs])
    indices = torch.tensor([index for _, index in pairs])
    keys = torch.tensor([stream_key(seed, index) for seed, index in pairs])
    logits = torch.randn(8, vocab, generator=generator)
    logits[:4] = 0.0  # the noise alone decides: any bit of the hash that differs shows
    logits[5, torch.randperm(vocab, generator=generator)[: vocab - 3]] = -torch.inf  # top-k=3
    expected = (logits + gumbel_noise(keys, vocab)).argmax(-1)
    drawn = gumbel_argmax(logits.to(DEVICE), seeds.to(DEVICE), indices.to(DEVICE))
    assert drawn.dtype == torch.long
    assert drawn.cpu().tolist() == expected.tolist()
    assert logits[5, drawn[5]] > -torch.inf


def test_ties_go_to_the_lowest_id_as_torch_argmax_s_do():
    logits = torch.full((1, 3 * BLOCK), -torch.inf)
    logits[0, [5, BLOCK + 5]] = 1.0
    keys = torch.zeros(1, dtype=torch.long)  # seed 0, index 0
    noise = gumbel_noise(stream_key(keys, keys), 3 * BLOCK)
    logits[0, BLOCK + 5] += noise[0, 5] - noise[0, BLOCK + 5]  # the same noisy value at both
    expected = (logits + noise).argmax(-1)
    drawn = gumbel_argmax(logits.to(DEVICE), keys.to(DEVICE), keys.to(DEVICE))
    assert drawn.cpu().tolist() == expected.tolist()


def test_each_row_draws_with_its_own_seed_and_index_from_the_sampler_s_batch():
    # SamplingBatch uploads (top_k, seed, index) per row as one tensor and hands the kernel its
    # columns: strided views, which a kernel reading them as contiguous mixes up across rows
    # (each row then drew with another row's key: a seeded request's tokens changed with the
    # batch, on the GPU only, 2026-12-07)
    rows, vocab = 5, BLOCK + 3
    params = [SamplingParams(temperature=0.8, seed=s) for s in (7, 2**64 - 2, 0, 99, 7)]
    seeds = [p.seed for p in params]
    indices = [0, 4, 2**31, 1, 3]
    batch = SamplingBatch(params, seeds, indices, [[]] * rows, torch.device(DEVICE))
    assert batch.seeds.stride(0) != 1  # the layout that hid the bug
    logits = torch.zeros(rows, vocab)  # the noise alone decides
    keys = torch.tensor([stream_key(s, i) for s, i in zip(seeds, indices, strict=True)])
    expected = (logits + gumbel_noise(keys, vocab)).argmax(-1)
    drawn = gumbel_argmax(logits.to(DEVICE), batch.seeds, batch.indices)
    assert drawn.cpu().tolist() == expected.tolist()
