"""Centering or whitening of frozen text vectors before fusion: pure math, fitted over the whole catalog.

Sentence encoders are anisotropic: every item vector shares one large common direction (all-MiniLM-L6-v2
on ML-100K's titles: mean pairwise cosine 0.31), so after the projection every item looks alike.
`center` removes the catalog mean, `whiten` also decorrelates and equalises the directions (ZCA, as in
UniSRec / WhitenRec); both then rescale each vector to unit length. All-zero rows (padding, items without
text) carry no text and stay zero. Statistics are sums, so ranks holding row blocks add theirs up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from modules.config import TextTransform

WHITEN_EPS = 1e-3
"""Eigenvalues below WHITEN_EPS x the largest are floored there, so near-empty directions are not blown up."""


@dataclass
class TextMoments:
    """Sums over the non-zero rows of a text table: count, sum [D] and (for whitening) sum of x x^T [D, D]."""

    count: Tensor
    total: Tensor
    outer: Tensor | None


def text_moments(rows: Tensor, *, with_outer: bool, block_rows: int = 65536) -> TextMoments:
    """Float64 sums over the non-zero rows of [n, D] `rows`, block by block (a rank's catalog rows)."""
    dim = rows.shape[1]
    count = torch.zeros((), dtype=torch.float64, device=rows.device)
    total = torch.zeros(dim, dtype=torch.float64, device=rows.device)
    outer = torch.zeros(dim, dim, dtype=torch.float64, device=rows.device) if with_outer else None
    for start in range(0, rows.shape[0], block_rows):
        block = rows[start : start + block_rows].double()
        block = block[block.ne(0).any(dim=1)]
        count += block.shape[0]
        total += block.sum(dim=0)
        if outer is not None:
            outer += block.T @ block
    return TextMoments(count=count, total=total, outer=outer)


def fit_text_transform(moments: TextMoments, mode: TextTransform) -> tuple[Tensor, Tensor | None]:
    """(mean [D], ZCA matrix [D, D] or None for `center`) from the catalog's summed moments."""
    if mode not in ("center", "whiten"):
        raise ValueError(f"fit_text_transform: mode must be 'center' or 'whiten', got {mode!r}")
    count = float(moments.count)
    if count < 2:
        raise ValueError(f"fit_text_transform: needs at least 2 non-zero text vectors, got {count:.0f}")
    mean = moments.total / count
    if mode == "center":
        return mean, None
    if moments.outer is None:
        raise ValueError("fit_text_transform: 'whiten' needs moments computed with with_outer=True")
    covariance = (moments.outer - count * torch.outer(mean, mean)) / (count - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    floor = WHITEN_EPS * eigenvalues.max().clamp_min(torch.finfo(torch.float64).tiny)
    scale = eigenvalues.clamp_min(floor).rsqrt()
    return mean, (eigenvectors * scale) @ eigenvectors.T


def apply_text_transform(
    rows: Tensor, mean: Tensor, matrix: Tensor | None, *, block_rows: int = 65536
) -> Tensor:
    """normalize((x - mean) @ matrix) for every non-zero row of [n, D] `rows`; zero rows stay zero."""
    out = torch.zeros_like(rows)
    for start in range(0, rows.shape[0], block_rows):
        block = rows[start : start + block_rows].double()
        keep = block.ne(0).any(dim=1, keepdim=True)
        moved = block - mean
        if matrix is not None:
            moved = moved @ matrix
        moved = torch.nn.functional.normalize(moved, dim=1) * keep
        out[start : start + block_rows] = moved.to(rows.dtype)
    return out
