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
    seen = history.unique()
    scores = logits[seen]
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> None:
    """Mask, in place, every token that top-k, top-p or min-p excludes."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = -torch.inf
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(descending=True)
        mass_before = probs.cumsum(-1) - probs
        logits[order[mass_before >= top_p]] = -torch.inf  # keeps at least the top token
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits[probs < min_p * probs.max()] = -torch.inf


def sample(
    logits: torch.Tensor, history: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> int:
    """One token id from the float32 `logits` (vocab,); `history` holds the generated ids."""
    logits = logits.float().clone()
    if params.temperature == 0.0:
        apply_repetition_penalty(logits, history, params.repetition_penalty)
        return int(logits.argmax())
    if params.temperature != 1.0:
        logits /= params.temperature
    apply_repetition_penalty(logits, history, params.repetition_penalty)
    filter_logits(logits, params.top_k, params.top_p, params.min_p)
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(1, generator=generator, device=logits.device) * cdf[-1]
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=logits.numel() - 1))
