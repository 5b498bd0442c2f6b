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


def log_sampling_probs(item_counts: Tensor) -> Tensor:
    """log q(j) = log(count_j / total) per item [N+1] float32 (-inf where count_j = 0): the chance that a
    positive drawn from the training targets is item j, which is how in-batch negatives are sampled."""
    counts = item_counts.to(torch.float64)
    return torch.log(counts / counts.sum()).to(torch.float32)


@_fp32
def in_batch_softmax_loss(
    queries: Tensor,
    positive_ids: Tensor,
    positive_vectors: Tensor,
    *,
    temperature: float,
    log_q: Tensor,
    weights: Tensor | None = None,
) -> Tensor:
    """Softmax over the batch's positives as negatives, logQ-corrected (Yi et al., RecSys 2019): log_q [n]
    is each positive's `log_sampling_probs`, so popular items, drawn as negatives more often, are not
    pushed away more for it.

    logit[i, j] = cos(q_i, p_j) / temperature - log_q[j]; columns j != i holding the same item as row i's
    positive are masked (accidental hits), so repeated items are not pushed away from themselves.
    """
    q = F.normalize(queries, dim=-1)
    p = F.normalize(positive_vectors, dim=-1)
    logits = (q @ p.T) / temperature - log_q[None, :].to(torch.float32)
    n = positive_ids.numel()
    same = positive_ids[:, None] == positive_ids[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    losses = torch.logsumexp(logits, dim=1) - logits[torch.arange(n), torch.arange(n)]
    return _weighted_mean(losses, weights)
