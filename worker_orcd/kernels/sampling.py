"""The Gumbel-max draw of each row's token in one pass over its logits.

The torch reference (`layers/sampler.py`) materializes the noise: a hash per (row, vocabulary
id) in int64 tensors, about twenty full passes over a (rows, vocab) array; at 128 rows of a
152k vocabulary that is milliseconds a step. Here each program hashes, adds and keeps the
running argmax of one row in registers, reading the logits once; it derives the row's stream
key from its seed and token index itself (`sampler.stream_key`), so that a step issues one
launch, not the forty-odd elementwise ones of the key's hashing in torch. The random bits are
the reference's (the same 32-bit hash); the logarithms are Triton's, which may round a last bit
differently from torch's, so a near-tie may go the other way than on the torch path; the draw
is still a function of the row alone. Ties go to the lowest id, as `torch.argmax`'s do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _mix32(x):
    """`sampler.mix32` (lowbias32) on uint32: products wrap modulo 2^32."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _stream_key(seed, index):
    """`sampler.stream_key` of an int64 seed (a 64-bit seed's two's complement) and index."""
    bits = seed.to(tl.uint64, bitcast=True)
    low, high = (bits & 0xFFFFFFFF).to(tl.uint32), (bits >> 32).to(tl.uint32)
    return _mix32(_mix32(_mix32(low) ^ high) ^ index.to(tl.uint32))


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr, stride, seeds_ptr, seed_stride, indices_ptr, index_stride, out_ptr, V,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    seed = tl.load(seeds_ptr + row * seed_stride)
    key = _stream_key(seed, tl.load(indices_ptr + row * index_stride))
    best = tl.full((), -float("inf"), tl.float32)
    best_id = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK):
        ids = start + tl.arange(0, BLOCK)
        mask = ids < V
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + ids, mask=mask, other=-float("inf"))
        bits = _mix32(key ^ _mix32(ids.to(tl.uint32))) >> 8  # 24 random bits
        uniform = (bits.to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24: in (0, 1)
        noisy = x + -tl.log(-tl.log(uniform))
        noisy = tl.where(mask, noisy, -float("inf"))
        value, at = tl.max(noisy, axis=0, return_indices=True, return_indices_tie_break_left=True)
        later = value > best  # strictly: an equal value later in the row loses, as in torch
        best_id = tl.where(later, start + at, best_id)
        best = tl.where(later, value, best)
    tl.store(out_ptr + row, best_id.to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, seeds: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`(logits + gumbel_noise(stream_key(seeds, indices), vocab)).argmax(-1)` for float32
    logits (rows, vocab), int64 seeds (rows,) and token indices (rows,) below 2^32: token ids
    (rows,) int64."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows:
        _gumbel_argmax_kernel[(rows,)](
            logits, logits.stride(0), seeds, seeds.stride(0), indices, indices.stride(0), out,
            vocab, BLOCK=BLOCK,
        )  # fmt: skip
    return out
