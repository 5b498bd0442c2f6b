"""Small helpers for jagged [total_tokens, ...] tensors described by offsets [B+1] (FBGEMM where it helps)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def fbgemm_ops():
    """`torch.ops.fbgemm`, registered on first use, so machines without fbgemm can still import modules/."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)

    return torch.ops.fbgemm


def offsets_from_lengths(lengths: Tensor) -> Tensor:
    """[B] lengths -> [B+1] int64 offsets starting at 0."""
    return F.pad(torch.cumsum(lengths.to(torch.int64), 0), (1, 0))


def lengths_from_offsets(offsets: Tensor) -> Tensor:
    """[B+1] offsets -> [B] lengths."""
    return offsets[1:] - offsets[:-1]


def positions_in_sequence(offsets: Tensor, total: int | None = None) -> Tensor:
    """[T] position of every token within its own sequence (0 = the sequence's first, oldest token)."""
    lengths = lengths_from_offsets(offsets)
    total = int(offsets[-1]) if total is None else total
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=total)
    return torch.arange(total, device=offsets.device) - starts


def last_positions(offsets: Tensor) -> Tensor:
    """[B] index of each sequence's last token (sequences must be non-empty)."""
    return offsets[1:] - 1


def jagged_to_padded(values: Tensor, offsets: Tensor, max_len: int, padding_value: float = 0.0) -> Tensor:
    """[T, D] jagged -> [B, max_len, D] padded (right padding), differentiable."""
    return fbgemm_ops().jagged_to_padded_dense(values, [offsets], [max_len], padding_value)


def padded_to_jagged(padded: Tensor, offsets: Tensor, total: int | None = None) -> Tensor:
    """[B, N, D] padded -> [T, D] jagged, dropping the padding, differentiable."""
    total = int(offsets[-1]) if total is None else total
    return fbgemm_ops().dense_to_jagged(padded, [offsets], total_L=total)[0]
