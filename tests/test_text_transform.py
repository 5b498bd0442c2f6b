"""Centering / whitening of frozen text vectors against a naive NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.config import ModelConfig
from modules.text_transform import (
    WHITEN_EPS,
    TextMoments,
    apply_text_transform,
    fit_text_transform,
    text_moments,
)
from trainer.config_io import ConfigError


def _anisotropic(n: int = 300, dim: int = 12, seed: int = 0) -> np.ndarray:
    """Unit vectors sharing one common direction (mean pairwise cosine well above 0), with zero rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) + 3.0 * rng.standard_normal(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[[0, 7, 150]] = 0.0  # padding and items without text
    return x


def naive_text_transform(x: np.ndarray, mode: str) -> np.ndarray:
    keep = np.linalg.norm(x, axis=1) > 0
    rows = x[keep]
    moved = rows - rows.mean(axis=0)
    if mode == "whiten":
        values, vectors = np.linalg.eigh(np.cov(rows, rowvar=False))
        values = np.maximum(values, WHITEN_EPS * values.max())
        moved = moved @ vectors @ np.diag(values**-0.5) @ vectors.T
    out = np.zeros_like(x)
    out[keep] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
    return out


def _fit_apply(x: np.ndarray, mode: str, *, block_rows: int = 65536) -> np.ndarray:
    rows = torch.from_numpy(x)
    moments = text_moments(rows, with_outer=mode == "whiten", block_rows=block_rows)
    mean, matrix = fit_text_transform(moments, mode)
    return apply_text_transform(rows, mean, matrix, block_rows=block_rows).numpy()


@pytest.mark.parametrize("mode", ["center", "whiten"])
def test_transform_matches_naive_reference(mode):
    x = _anisotropic()
    np.testing.assert_allclose(_fit_apply(x, mode), naive_text_transform(x, mode), atol=1e-10)
    np.testing.assert_allclose(_fit_apply(x, mode, block_rows=7), naive_text_transform(x, mode), atol=1e-10)


def test_centering_removes_the_common_direction_and_keeps_zero_rows():
    x = _anisotropic()
    keep = np.linalg.norm(x, axis=1) > 0
    assert np.linalg.norm(x[keep].mean(axis=0)) > 0.5
    out = _fit_apply(x, "center")
    assert np.array_equal(out[~keep], np.zeros_like(out[~keep]))
    np.testing.assert_allclose(np.linalg.norm(out[keep], axis=1), 1.0, atol=1e-12)
    assert np.linalg.norm(out[keep].mean(axis=0)) < 0.1


def test_whitening_decorrelates_before_the_unit_rescale():
    x = _anisotropic(n=2000)
    rows = torch.from_numpy(x)
    mean, matrix = fit_text_transform(text_moments(rows, with_outer=True), "whiten")
    keep = np.linalg.norm(x, axis=1) > 0
    white = (rows[torch.from_numpy(keep)] - mean) @ matrix
    np.testing.assert_allclose(np.cov(white.numpy(), rowvar=False), np.eye(x.shape[1]), atol=1e-8)


def test_moments_add_up_across_row_blocks():
    """What ranks holding row blocks all-reduce equals the moments of the whole table."""
    rows = torch.from_numpy(_anisotropic())
    parts = [text_moments(part, with_outer=True) for part in (rows[:100], rows[100:101], rows[101:])]
    whole = text_moments(rows, with_outer=True)
    assert float(sum(p.count for p in parts)) == float(whole.count) == rows.shape[0] - 3
    torch.testing.assert_close(sum(p.total for p in parts), whole.total)
    torch.testing.assert_close(sum(p.outer for p in parts), whole.outer)


def test_fp16_rows_keep_their_dtype():
    rows = torch.from_numpy(_anisotropic()).half()
    out = apply_text_transform(rows, *fit_text_transform(text_moments(rows, with_outer=False), "center"))
    assert out.dtype == torch.float16
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_bad_fits_say_why():
    one = text_moments(torch.eye(4)[:1].double(), with_outer=True)
    with pytest.raises(ValueError, match="at least 2 non-zero"):
        fit_text_transform(one, "center")
    with pytest.raises(ValueError, match="with_outer=True"):
        fit_text_transform(TextMoments(torch.tensor(5.0), torch.zeros(4), None), "whiten")
    with pytest.raises(ValueError, match="'center' or 'whiten'"):
        fit_text_transform(one, "none")


def test_config_refuses_a_text_transform_without_text():
    with pytest.raises(ConfigError, match=r"set model\.fusion"):
        ModelConfig(fusion="none", text_transform="center")
    assert ModelConfig(fusion="add", text_transform="whiten").text_transform == "whiten"
