"""Next-item losses on L2-normalised vectors: sampled softmax over uniform negatives, in-batch with logQ."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_uniform_negatives(
    num_items: int, shape: tuple[int, ...], *, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """Uniform item ids in 1..num_items (never the padding id 0)."""
    return torch.randint(1, num_items + 1, shape, generator=generator, device=device)


_HALF = (torch.float16, torch.bfloat16)


def _fp32(fn):
    """Run a loss with autocast off and 16-bit inputs upcast: bf16 logits step by ~0.08 at temperature 0.05,
    which drowns a confident model's gradient in rounding (the backbone may still run in bf16)."""

    @functools.wraps(fn)
    def wrapper(*args: Tensor, **kwargs):
        device = next(a for a in args if isinstance(a, Tensor)).device
        cast = [a.float() if isinstance(a, Tensor) and a.dtype in _HALF else a for a in args]
        with torch.autocast(device_type=device.type, enabled=False):
            return fn(*cast, **kwargs)

    return wrapper


def _weighted_mean(losses: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return losses.mean()
    weights = weights.to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1e-12)


@_fp32
def sampled_softmax_loss(
    queries: Tensor,
    positive_ids: Tensor,
    positive_vectors: Tensor,
    negative_ids: Tensor,
    negative_vectors: Tensor,
    *,
    temperature: float,
    weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of the positive among [positive, R negatives], cosine / temperature.

    Args:
        queries: [n, d]; positive_ids: [n]; positive_vectors: [n, d].
        negative_ids: [R] shared by all rows, or [n, R]; negative_vectors: [R, d] or [n, R, d].
        weights: [n] per-row weights (0 drops a row), or None.
    Negatives equal to the row's positive (accidental hits) are masked out.
    """
    q = F.normalize(queries, dim=-1)
    pos = F.normalize(positive_vectors, dim=-1)
    neg = F.normalize(negative_vectors, dim=-1)
    pos_logit = (q * pos).sum(-1, keepdim=True)  # [n, 1]
    if neg.dim() == 2:
        neg_logits = q @ neg.T  # [n, R]
        hits = positive_ids[:, None] == negative_ids[None, :]
    else:
        neg_logits = torch.einsum("nd,nrd->nr", q, neg)
        hits = positive_ids[:, None] == negative_ids
    neg_logits = neg_logits.masked_fill(hits, float("-inf"))
    logits = torch.cat([pos_logit, neg_logits], dim=1) / temperature
    losses = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return _weighted_mean(losses, weights)


def in_batch_log_q(ids: Tensor, item_counts: Tensor | None = None) -> Tensor:
    """log of each candidate's sampling probability: from catalog counts [N+1] if given, else in-batch."""
    if item_counts is not None:
        probs = item_counts.to(torch.float64)[ids] / item_counts.to(torch.float64).sum()
        return torch.log(probs.clamp(min=1e-30)).to(torch.float32)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return torch.log(counts[inverse].to(torch.float32) / ids.numel())


@_fp32
def in_batch_softmax_loss(
    queries: Tensor,
    positive_ids: Tensor,
    positive_vectors: Tensor,
    *,
    temperature: float,
    log_q: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Softmax over the batch's positives as negatives, logQ-corrected (Yi et al., RecSys 2019).

    logit[i, j] = cos(q_i, p_j) / temperature - log_q[j]; columns j != i holding the same item as row i's
    positive are masked (accidental hits), so repeated items are not pushed away from themselves.
    """
    q = F.normalize(queries, dim=-1)
    p = F.normalize(positive_vectors, dim=-1)
    logits = (q @ p.T) / temperature
    if log_q is None:
        log_q = in_batch_log_q(positive_ids)
    logits = logits - log_q[None, :].to(logits.dtype)
    n = positive_ids.numel()
    same = positive_ids[:, None] == positive_ids[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    losses = torch.logsumexp(logits, dim=1) - logits[torch.arange(n), torch.arange(n)]
    return _weighted_mean(losses, weights)
