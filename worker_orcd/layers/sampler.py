"""Next-token choice from logits, in the order of spec M0-W-1421.

temperature -> repetition penalty -> top-k -> top-p -> min-p -> sample. Temperature 0 is greedy
(argmax after the penalty). Randomness comes only from the request's own seeded generator, so a
request's tokens depend on its model, prompt, parameters and seed, and on nothing else.
"""

from __future__ import annotations

import torch

from worker_orcd.sampling_params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> None:
    """CTRL-style, in place: seen tokens' positive logits shrink, negative ones grow."""
    if penalty == 1.0 or history.numel() == 0:
        return
    seen = torch.zeros_like(logits, dtype=torch.bool).index_fill_(0, history, True)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits.copy_(torch.where(seen, penalized, logits))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> None:
    """Mask, in place, every token that top-k, top-p or min-p excludes."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(descending=True)
        mass_before = probs.cumsum(-1) - probs  # keeps at least the top token
        excluded = torch.empty_like(logits, dtype=torch.bool).scatter_(
            0, order, mass_before >= top_p
        )
        logits.masked_fill_(excluded, -torch.inf)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits.masked_fill_(probs < min_p * probs.max(), -torch.inf)


def sample(
    logits: torch.Tensor, history: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """One token id from the float32 `logits` (vocab,); `history` holds the generated ids.

    Returns the id as a one-element tensor on the logits' device, computed without waiting for
    the device, so that the caller can queue the next step before it reads the id."""
    if params.temperature == 0.0 and params.repetition_penalty == 1.0:
        return logits.argmax().view(1)
    logits = logits.float().clone()
    if params.temperature == 0.0:
        apply_repetition_penalty(logits, history, params.repetition_penalty)
        return logits.argmax().view(1)
    if params.temperature != 1.0:
        logits /= params.temperature
    apply_repetition_penalty(logits, history, params.repetition_penalty)
    filter_logits(logits, params.top_k, params.top_p, params.min_p)
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(1, generator=generator, device=logits.device) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=logits.numel() - 1)
