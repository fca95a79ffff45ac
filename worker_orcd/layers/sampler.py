"""Next-token choice for a batch of rows, in the order of spec M0-W-1421.

temperature -> repetition penalty -> top-k -> top-p -> min-p -> sample. Temperature 0 is greedy
(argmax after the penalty). A row is sampled by the Gumbel-max trick: the argmax of its filtered
logits over the temperature plus Gumbel noise, which draws from their softmax. The noise is a
counter-based stream: a hash of (seed, token index, vocabulary id), so a row's token depends on
its own logits, parameters, seed and index, never on the other rows, the batch size or the order
of requests (SGLang's deterministic sampling works the same way). Every operation is row-wise.
On CUDA the noise and the argmax are one kernel (`kernels/sampling.py`); this is its reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker_orcd.engine.forward_batch import upload
from worker_orcd.kernels.sampling import gumbel_argmax
from worker_orcd.sampling_params import SamplingParams

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """x * c mod 2**32 for x below 2**32, in 16-bit halves so that int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash (Wellons' lowbias32); the same on ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed: torch.Tensor | int, index: torch.Tensor | int) -> torch.Tensor | int:
    """The random stream of a request's `index`-th generated token: a function of both alone.
    On ints, or on int64 tensors (a seed of 2**63 or more as its two's complement)."""
    return mix32(mix32(mix32(seed & M32) ^ (seed >> 32 & M32)) ^ (index & M32))


def gumbel_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(rows, vocab) float32 Gumbel noise, each element a hash of its row's key and its id."""
    ids = mix32(torch.arange(vocab_size, device=keys.device, dtype=torch.long))
    bits = mix32(keys[:, None] ^ ids[None, :]) >> 8  # 24 random bits
    uniform = (bits.float() + 0.5) * 2.0**-24  # in (0, 1)
    return -torch.log(-torch.log(uniform))


class SamplingBatch:
    """Per-row parameters as tensors, built once per step from each row's request. A step of
    greedy rows without a repetition penalty is an argmax: it uploads nothing (its parameter
    tensors stay None)."""

    temperatures = penalties = top_p = min_p = top_k = seeds = indices = seen = None

    def __init__(
        self,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        indices: Sequence[int],
        histories: Sequence[Sequence[int]],
        device: torch.device,
    ):
        # what the filters need to know on the host, known here without a device sync
        self.greedy = all(p.temperature == 0.0 for p in params)
        self.max_top_k = max(p.top_k for p in params)
        self.any_top_p = any(p.top_p < 1.0 for p in params)
        self.any_min_p = any(p.min_p > 0.0 for p in params)
        penalized = any(p.repetition_penalty != 1.0 for p in params)
        if self.greedy and not penalized:
            return
        # two host-to-device copies: the float columns, then the integer ones
        floats = [[p.temperature, p.repetition_penalty, p.top_p, p.min_p] for p in params]
        self.temperatures, self.penalties, self.top_p, self.min_p = upload(
            torch.tensor(floats, dtype=torch.float32), device
        ).T[:, :, None]
        # a seed's 64 bits as an int64 (two's complement): `stream_key` reads its halves
        ints = [
            [p.top_k, s - (1 << 64) if s >= 1 << 63 else s, i]
            for p, s, i in zip(params, seeds, indices, strict=True)
        ]
        top_k, self.seeds, self.indices = upload(torch.tensor(ints, dtype=torch.long), device).T
        self.top_k = top_k[:, None]
        if penalized:  # (rows, 1 + longest history) of ids; -1 pads
            width = 1 + max(len(h) for h in histories)
            padded = [list(h) + [-1] * (width - len(h)) for h in histories]
            self.seen = upload(torch.tensor(padded, dtype=torch.long), device)

    @property
    def keys(self) -> torch.Tensor:
        """Each row's stream key (`stream_key`), for the torch path: the CUDA kernel derives
        it itself, and greedy rows need none."""
        return stream_key(self.seeds, self.indices)


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalties: torch.Tensor
) -> torch.Tensor:
    """CTRL-style: the seen ids' positive logits shrink, negative ones grow (rows, vocab)."""
    mask = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.bool, device=seen.device)
    mask.scatter_(1, seen.where(seen >= 0, logits.shape[1]), True)  # pads land in a spare column
    penalized = torch.where(logits > 0, logits / penalties, logits * penalties)
    return torch.where(mask[:, :-1], penalized, logits)


def filter_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask every token that top-k, top-p or min-p excludes, each row by its own parameters."""
    if batch.max_top_k > 0:
        k_max = min(batch.max_top_k, logits.shape[1])
        values = torch.topk(logits, k_max, dim=-1).values
        kth = values.gather(1, (batch.top_k.clamp(1, k_max) - 1))
        logits = logits.masked_fill((batch.top_k > 0) & (logits < kth), -torch.inf)
    if batch.any_top_p:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs  # keeps at least the top token
        excluded = torch.empty_like(logits, dtype=torch.bool).scatter_(
            1, order, mass_before >= batch.top_p
        )
        logits = logits.masked_fill(excluded & (batch.top_p < 1.0), -torch.inf)
    if batch.any_min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < batch.min_p * probs.amax(-1, keepdim=True), -torch.inf)
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Token ids (rows,) from float32 `logits` (rows, vocab), on the logits' device, computed
    without waiting for it, so that the caller can queue the next step before it reads them."""
    logits = logits.float()
    if batch.seen is not None:
        logits = apply_repetition_penalty(logits, batch.seen, batch.penalties)
    if batch.greedy:
        return logits.argmax(-1)
    greedy = batch.temperatures == 0.0
    filtered = filter_logits(logits / torch.where(greedy, 1.0, batch.temperatures), batch)
    if logits.is_cuda:
        drawn = gumbel_argmax(filtered, batch.seeds, batch.indices)  # the same draw in one pass
    else:
        drawn = (filtered + gumbel_noise(batch.keys, logits.shape[1])).argmax(-1)
    return torch.where(greedy[:, 0], logits.argmax(-1), drawn)
