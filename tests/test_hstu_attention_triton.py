"""The fused Triton HSTU attention, run on the CPU through TRITON_INTERPRET=1, against plain-PyTorch oracles.

TRITON_INTERPRET=1 is set by tests/conftest.py before anything imports triton (its `tl.*` helpers are
built in the mode active at triton's first import).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from modules import hstu_attention_triton as hstu_triton

MODULE = "modules.hstu_attention_triton"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tri():
    """modules.hstu_attention_triton with its kernels running in Triton's interpreter on CPU tensors."""
    mod = importlib.import_module(MODULE)
    assert mod._INTERPRET, "TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)"
    return mod


def naive_hstu_attention(
    q, k, v, offsets, timestamps, query_times, pos_w, time_w, *, max_seq_len, alpha, denominator
):
    """Per-sequence, per-pair loops in float64 written straight from the contract's formula."""
    num_buckets = time_w.numel() - 1
    outs = []
    for b in range(offsets.numel() - 1):
        s0, s1 = int(offsets[b]), int(offsets[b + 1])
        n = s1 - s0
        if n == 0:
            continue
        qb, kb, vb = (x[s0:s1].double() for x in (q, k, v))
        ts, tq = timestamps[s0:s1], query_times[s0:s1]
        i = torch.arange(n)
        rel = i[None, :] - i[:, None] + max_seq_len - 1  # [i, j] -> j - i + N - 1
        dt = (tq[:, None] - ts[None, :]).abs().clamp(min=1).float()
        bucket = (torch.log(dt) / 0.301).long().clamp(0, num_buckets)
        rab = pos_w.double()[rel] + time_w.double()[bucket]
        scores = torch.einsum("ihd,jhd->hij", qb, kb) * alpha + rab[None]
        den = float(n) if denominator is None else float(denominator)
        attn = F.silu(scores) * (i[None, :] <= i[:, None]).double()[None] / den
        outs.append(torch.einsum("hij,jhd->ihd", attn, vb))
    return torch.cat(outs) if outs else v.new_zeros(0, *v.shape[1:]).double()


def make_inputs(lengths, *, heads=2, dqk=16, dv=32, max_seq_len=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_seq_len = max_seq_len or max(max(lengths), 1)
    total = sum(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    q = (torch.randn(total, heads, dqk, generator=g) * 0.5).to(dtype)
    k = (torch.randn(total, heads, dqk, generator=g) * 0.5).to(dtype)
    v = torch.randn(total, heads, dv, generator=g).to(dtype)
    # Mostly increasing timestamps with gaps over many orders of magnitude, plus some out-of-order ones.
    gaps = torch.exp(torch.rand(total, generator=g) * 18).long()
    timestamps = 1_600_000_000 + gaps.cumsum(0)
    shuffle = torch.rand(total, generator=g) < 0.1
    timestamps[shuffle] -= (torch.rand(int(shuffle.sum()), generator=g) * 1e7).long()
    query_times = query_times_after(timestamps, offsets, g)
    pos_w = torch.randn(2 * max_seq_len - 1, generator=g) * 0.3
    time_w = torch.randn(129, generator=g) * 0.3
    return q, k, v, offsets, timestamps, query_times, pos_w, time_w, max_seq_len


def query_times_after(timestamps, offsets, g):
    """Each position's next timestamp, and at a sequence's last position a target's time up to 10^8 s after
    it (as the data loader gives them)."""
    query_times = torch.cat([timestamps[1:], timestamps[-1:]])
    last = offsets[1:][offsets[1:] > offsets[:-1]] - 1
    query_times[last] = timestamps[last] + (torch.rand(last.numel(), generator=g) * 1e8).long()
    return query_times


def run_both(tri, lengths, *, denominator, alpha=None, bias_grad=True, **kw):
    """The kernel and the oracle on the same inputs, both backpropagated; bias_grad=False freezes the bias
    weights (in both, so they get no gradient)."""
    q, k, v, offsets, ts, tq, pos_w, time_w, n = make_inputs(lengths, **kw)
    alpha = alpha if alpha is not None else 1.0 / math.sqrt(q.shape[-1])
    leaves = [x.clone().requires_grad_(i < 3 or bias_grad) for i, x in enumerate((q, k, v, pos_w, time_w))]
    out = tri.triton_hstu_attention(
        leaves[0], leaves[1], leaves[2], offsets, ts, tq, leaves[3], leaves[4],
        max_seq_len=n, alpha=alpha, denominator=denominator,
    )  # fmt: skip
    ref_leaves = [
        x.detach().double().requires_grad_(i < 3 or bias_grad) for i, x in enumerate((q, k, v, pos_w, time_w))
    ]
    ref = naive_hstu_attention(
        ref_leaves[0], ref_leaves[1], ref_leaves[2], offsets, ts, tq, ref_leaves[3], ref_leaves[4],
        max_seq_len=n, alpha=alpha, denominator=denominator,
    )  # fmt: skip
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    return out, ref, leaves, ref_leaves


def assert_close(actual, expected, name, rtol, atol):
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= atol + rtol * scale, f"{name}: max abs err {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize(
    ("lengths", "denominator", "dqk", "dv"),
    [
        ([1, 37, 5, 0, 64, 1, 70], None, 16, 32),  # lengths 1 and 0, several 16-row blocks, per-seq den
        ([33, 1, 17], 50.0, 32, 16),  # fixed denominator (reference: max_seq_len), Dqk > Dv
        ([90, 2, 31], None, 24, 20),  # head dims that are not powers of two (masked)
    ],
)
def test_forward_and_grads_match_naive_oracle(tri, lengths, denominator, dqk, dv):
    out, ref, leaves, ref_leaves = run_both(tri, lengths, denominator=denominator, dqk=dqk, dv=dv)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_close(out, ref, "out", 1e-4, 1e-5)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert a.grad is not None and a.grad.shape == b.grad.shape, name
        assert_close(a.grad, b.grad, f"grad {name}", 1e-4, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_time_table_gather_matches_naive_oracle(tri, monkeypatch, dtype):
    """The autotuner's other time-bias lookup (`tl.gather` from the program's copy of time_weights)."""
    monkeypatch.setattr(tri, "_TABLE_GATHER", True)
    rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (5e-3, 1e-3)
    out, ref, leaves, ref_leaves = run_both(tri, [1, 37, 0, 20], denominator=None, dtype=dtype)
    assert_close(out, ref, "out", rtol, atol)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", rtol, atol)


def naive_rab(offsets, timestamps, query_times, pos_w, time_w, max_seq_len):
    """Per sequence, the [n, n] bias rab(i, j) for j <= i (zero above the diagonal), from the formula."""
    out = []
    for b in range(offsets.numel() - 1):
        s0, s1 = int(offsets[b]), int(offsets[b + 1])
        ts, tq = timestamps[s0:s1], query_times[s0:s1]
        i = torch.arange(s1 - s0)
        dt = (tq[:, None] - ts[None, :]).abs().clamp(min=1).float()
        bucket = (torch.log(dt) / 0.301).long().clamp(0, time_w.numel() - 1)
        rab = pos_w[i[None, :] - i[:, None] + max_seq_len - 1] + time_w[bucket]
        out.append(torch.where(i[None, :] <= i[:, None], rab, 0.0))
    return out


def naive_layouts(length, align=64, pad=8):
    """A sequence's two bias/ds-buffer layouts as stated in words, {(i, j): offset in its part}: rows up to
    its length rounded up to 8; query-major, row i holds keys 0 .. round_up(i + 1, 64) - 1; key-major,
    column j holds those pairs' rows 64 floor(j / 64) .. last (the same pairs, transposed)."""
    rows = -(-length // pad) * pad
    pairs = [(i, j) for i in range(rows) for j in range(-(-(i + 1) // align) * align)]
    query_major = {pair: offset for offset, pair in enumerate(pairs)}
    key_major = {pair: offset for offset, pair in enumerate(sorted(pairs, key=lambda p: (p[1], p[0])))}
    return query_major, key_major


def test_bias_buffer_layouts_and_fill(tri):
    """Both layouts of the bias buffer (query-major for the forward and dq, key-major for dk/dv), sequences
    back to back: the fill kernel writes every pair's bias there, halved (for the kernels' SiLU in
    tanh(s / 2)), with zeros past the diagonal and in the padding rows, and every element once."""
    lengths = torch.tensor([0, 1, 63, 64, 65, 130, 7, 72])
    layouts = [naive_layouts(n) for n in lengths.tolist()]
    sizes = [len(rows) for rows, _ in layouts]
    assert tri._rab_numel(lengths).tolist() == sizes
    *_, offsets, ts, tq, pos_w, time_w, n = make_inputs(lengths.tolist(), seed=4)
    batch = tri.plan_triton_attention(offsets, ts, tq, max_seq_len=n)
    assert batch.rab_numel == sum(sizes)
    assert batch.rab_base.tolist() == [sum(sizes[:b]) for b in range(len(sizes))]
    assert batch.rab_ends == tuple(sum(sizes[: b + 1]) for b in range(len(sizes)))
    (chunk,) = tri._chunks(batch, pos_w)  # no memory limit under the interpreter: one run
    for query_major, key_major in ((True, False), (False, True), (True, True)):
        buffers = [
            torch.full((batch.rab_numel,), float("nan")) if on else None for on in (query_major, key_major)
        ]
        tri._fill_rab(*buffers, batch, chunk, pos_w, time_w, n)
        for buffer, which in zip(buffers, (0, 1), strict=True):
            if buffer is None:
                continue
            want = torch.full_like(buffer, float("nan"))
            for base, seq, length, layout in zip(
                batch.rab_base.tolist(), naive_rab(offsets, ts, tq, pos_w, time_w, n), lengths.tolist(),
                layouts, strict=True,
            ):  # fmt: skip
                for (i, j), offset in layout[which].items():
                    want[base + offset] = seq[i, j] / 2 if j <= i < length else 0.0
            torch.testing.assert_close(buffer, want, msg=f"query_major={query_major}, key_major={key_major}")


def test_bias_buffer_tiles_stay_inside_their_sequence_and_column(tri):
    """Unmasked reads must stay in their sequence's part of a buffer, and writes in their own row or column
    (else they overwrite another program's ds), for every tile any config visits, over sequence lengths
    1-299. Query-major (forward, dq): bias tiles of up to 64 keys, rows past the end clamped to the last.
    Key-major (dk/dv, the ds reduction's diagonal bands, the fill's writes; all masked past the padded
    rows only): every entry a tile touches lies in its own column."""
    align, pad = tri._RAB_ALIGN, tri._RAB_ROW_PAD
    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tri._FWD_CONFIGS}
    tiles |= {(tri._INTERPRET_BLOCK, tri._INTERPRET_BLOCK)}
    bands = {c.kwargs["BLOCK"] for c in tri._RAB_GRAD_CONFIGS} | {tri._INTERPRET_BLOCK}
    dkdv = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tri._DKDV_CONFIGS}
    dkdv |= {(tri._INTERPRET_BLOCK, tri._INTERPRET_DKDV_KEYS), (tri._INTERPRET_BLOCK, 128)}
    fills = {c.kwargs["BLOCK_R"] for c in tri._FILL_CONFIGS} | {tri._INTERPRET_BLOCK}
    assert all(bn <= align for _, bn in tiles) and max(bands) <= align
    assert all(c.kwargs["BLOCK_C"] == align for c in tri._FILL_CONFIGS)

    for length in range(1, 300):
        rows = -(-length // pad) * pad
        row_len = [-(-(i + 1) // align) * align for i in range(rows)]
        row_start = [0, *itertools.accumulate(row_len)]
        for bm, bn in tiles:  # query-major bias reads
            for m0 in range(0, length, bm):
                last = min(m0 + bm, length) - 1  # rows past the end read the last one
                for n0 in range(0, min(m0 + bm, length), bn):
                    assert row_start[last] + n0 + bn <= row_start[-1], (length, m0, n0, bm, bn)
        # Key-major tiles as (first query, first key, keys), queries up to the padded rows (masked past
        # them). Column j holds rows 64 floor(j / 64) .. rows - 1, for j < rows rounded up to 64. dk/dv's
        # 128-key blocks mask each entry to its column; the tiles below have no such mask.
        tiles_k = []
        for block in bands:  # the ds reduction's diagonal bands: keys a whole number of blocks back
            for first in range(0, length, block):
                tiles_k += [(m0, m0 - first, block) for m0 in range(first, length, block)]
        for bm, bn in dkdv:
            if bn <= align:
                tiles_k += [(m0, n0, bn) for n0 in range(0, length, bn) for m0 in range(n0, length, bm)]
        for block_r in fills:
            for m0 in range(0, rows, block_r):
                for n0 in range(0, (min(m0 + block_r, rows) - 1) // align * align + align, align):
                    assert all(n0 + align <= row_len[i] for i in range(m0, min(m0 + block_r, rows)))
                    tiles_k.append((m0, n0, align))
        for m0, j0, width in tiles_k:
            last_key = j0 + width - 1
            assert m0 >= last_key // align * align and last_key < -(-rows // align) * align, (length, m0, j0)


@pytest.mark.parametrize("ds_buffer", [False, True])
@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"), [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 4e-2, 1e-3)]
)
def test_bias_buffer_path_matches_naive_oracle(tri, monkeypatch, dtype, rtol, atol, ds_buffer):
    """The kernels reading rab from the precomputed buffer (the GPU default when it fits): forward and all
    five gradients, on lengths that cross the buffer's 64-key rows and the 16-row interpreter blocks; the
    bias-weight gradients reduced in dk/dv's loop, or (the GPU default) from the per-head ds buffer."""
    monkeypatch.setattr(tri, "_RAB_TILES", True)
    monkeypatch.setattr(tri, "_DS_BUFFER", ds_buffer)
    out, ref, leaves, ref_leaves = run_both(tri, [1, 70, 0, 17, 64], denominator=None, dtype=dtype)
    assert_close(out, ref, "out", rtol, atol)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", rtol, atol)


def test_bias_buffer_out_of_memory_falls_back_to_inline(tri, monkeypatch):
    """A GPU too full for the buffer (as the default chose it) gets the inline path and a warning, not an
    error; pinned to the buffer, the error stands."""

    _, _, _, offsets, ts, tq, _, _, _ = make_inputs([9, 1, 30])
    rab_numel = tri.plan_triton_attention(offsets, ts, tq, max_seq_len=30).rab_numel
    real_empty = torch.empty

    def no_room(*args, **kwargs):
        if args == (rab_numel,):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(tri, "_use_rab_tiles", lambda batch, q: True)
    monkeypatch.setattr(tri.torch, "empty", no_room)
    with pytest.warns(UserWarning, match="computing the bias inline"):
        out, ref, leaves, ref_leaves = run_both(tri, [9, 1, 30], denominator=None)
    assert_close(out, ref, "out", 1e-4, 1e-5)
    assert_close(leaves[4].grad, ref_leaves[4].grad, "grad time_weights", 1e-4, 1e-5)
    monkeypatch.setattr(tri, "_RAB_TILES", True)
    with pytest.raises(torch.OutOfMemoryError):
        run_both(tri, [9, 1, 30], denominator=None)


@pytest.mark.parametrize("ds_buffer", [False, True])
def test_dkdv_key_blocks_wider_than_the_bias_buffer_rows(tri, monkeypatch, ds_buffer):
    """dk/dv programs of 128 keys (wider than the buffer's 64-key row padding, so bias reads and ds writes
    are masked at each row's diagonal) over 16-row query steps: still the oracle's gradients."""
    monkeypatch.setattr(tri, "_INTERPRET_DKDV_KEYS", 128)
    monkeypatch.setattr(tri, "_RAB_TILES", True)
    monkeypatch.setattr(tri, "_DS_BUFFER", ds_buffer)
    *_, leaves, ref_leaves = run_both(tri, [130, 1, 64, 200], denominator=None, dqk=16, dv=16, seed=9)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", 1e-4, 1e-5)


@pytest.mark.parametrize("rab_tiles", [False, True])
def test_ds_buffer_for_some_heads_at_a_time(tri, monkeypatch, rab_tiles):
    """A ds buffer with room for 2 of 3 heads: dk/dv runs for heads 0-1, then head 2, each launch followed
    by its reduction; still the oracle's gradients."""
    monkeypatch.setattr(tri, "_RAB_TILES", rab_tiles)
    monkeypatch.setattr(tri, "_ds_buffer_heads", lambda batch, q: 2)
    real_empty, sizes = torch.empty, []

    def recording_empty(*args, **kwargs):
        sizes.append(args[0] if args else None)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(tri.torch, "empty", recording_empty)
    *_, leaves, ref_leaves = run_both(tri, [40, 1, 23], denominator=None, heads=3, seed=11)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", 1e-4, 1e-5)
    _, _, _, offsets, ts, tq, _, _, n = make_inputs([40, 1, 23])
    assert 2 * tri.plan_triton_attention(offsets, ts, tq, max_seq_len=n).rab_numel in sizes


def test_ds_buffer_with_inline_bias_and_its_out_of_memory_fallback(tri, monkeypatch):
    """The ds buffer also serves the inline-bias kernels; a GPU too full for it (as the default chose it)
    gets dk/dv's in-loop reduction and a warning; pinned to the buffer, the error stands."""
    monkeypatch.setattr(tri, "_DS_BUFFER", True)
    *_, leaves, ref_leaves = run_both(tri, [33, 1, 20], denominator=40.0, max_seq_len=40, seed=3)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", 1e-4, 1e-5)
    real_empty = torch.empty

    def no_room(*args, **kwargs):
        if args and args[0] == 2 * tri.plan_triton_attention(offsets, ts, tq, max_seq_len=30).rab_numel:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_empty(*args, **kwargs)

    _, _, _, offsets, ts, tq, _, _, _ = make_inputs([9, 1, 30])
    monkeypatch.setattr(tri.torch, "empty", no_room)
    with pytest.raises(torch.OutOfMemoryError):
        run_both(tri, [9, 1, 30], denominator=None)
    monkeypatch.setattr(tri, "_DS_BUFFER", None)
    monkeypatch.setattr(tri, "_ds_buffer_heads", lambda batch, q: q.shape[1])
    with pytest.warns(UserWarning, match="dk/dv reduces the bias gradients itself and dq is recomputed"):
        *_, leaves, ref_leaves = run_both(tri, [9, 1, 30], denominator=None)
    assert_close(leaves[3].grad, ref_leaves[3].grad, "grad pos_weights", 1e-4, 1e-5)
    assert_close(leaves[4].grad, ref_leaves[4].grad, "grad time_weights", 1e-4, 1e-5)


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol", "rab_tiles", "ds_heads"),
    [(torch.float32, 1e-4, 1e-5, False, 0), (torch.bfloat16, 4e-2, 1e-3, True, 2)],
)
def test_dq_added_up_by_dkdv_atomics(tri, monkeypatch, dtype, rtol, atol, rab_tiles, ds_heads):
    """ "atomic" dq: dk/dv adds each step's dq with atomics and no dq kernel runs; fp32 inputs accumulate into
    dq itself, 16-bit ones into an fp32 buffer; per-head launches (ds buffer for 2 of 3 heads) add theirs."""
    monkeypatch.setattr(tri, "_DQ_SOURCE", "atomic")
    monkeypatch.setattr(tri, "_RAB_TILES", rab_tiles)
    monkeypatch.setattr(tri, "_DS_BUFFER", ds_heads > 0)
    monkeypatch.setattr(tri, "_ds_buffer_heads", lambda batch, q: ds_heads)
    fwd, _, dkdv = tri._kernels()

    def no_dq_kernel(*args, **kwargs):
        raise AssertionError("the dq kernel ran although dk/dv adds dq up")

    monkeypatch.setattr(tri, "_kernels", lambda *streamed: (fwd, no_dq_kernel, dkdv))
    out, ref, leaves, ref_leaves = run_both(tri, [1, 70, 0, 17], denominator=None, dtype=dtype, heads=3)
    assert_close(out, ref, "out", rtol, atol)
    assert leaves[0].grad.dtype == dtype
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", rtol, atol)


class RecordingKernel:
    """A raw kernel that records the grid of each launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol", "rab_tiles", "ds_heads", "bias_grad"),
    [
        (torch.float32, 1e-4, 1e-5, True, 3, True),
        (torch.bfloat16, 4e-2, 1e-3, True, 2, False),
        (torch.float32, 1e-4, 1e-5, False, 2, True),
    ],
)
def test_dq_from_the_ds_buffer(tri, monkeypatch, dtype, rtol, atol, rab_tiles, ds_heads, bias_grad):
    """The default dq: one launch of the dq-from-ds kernel per group of heads whose ds dk/dv stored (3 of 3,
    or 2 then 1), no dq kernel recomputing it, and a backward that fills only the key-major bias buffer;
    with the bias weights frozen, dk/dv writes the ds buffer for dq alone. Lengths cross the 16-row query
    blocks, the 32-key blocks and the buffer's 64-key rows, and end off a block boundary."""
    monkeypatch.setattr(tri, "_RAB_TILES", rab_tiles)
    monkeypatch.setattr(tri, "_DS_BUFFER", True)
    monkeypatch.setattr(tri, "_ds_buffer_heads", lambda batch, q: ds_heads)
    fwd, _, dkdv = tri._kernels()

    def no_dq_kernel(*args, **kwargs):
        raise AssertionError("the dq kernel recomputed ds although dk/dv stored it")

    monkeypatch.setattr(tri, "_kernels", lambda *streamed: (fwd, no_dq_kernel, dkdv))
    dq_ds = RecordingKernel(tri._hstu_bwd_dq_ds_kernel)
    monkeypatch.setattr(tri, "_hstu_bwd_dq_ds_kernel", dq_ds)
    fills, real_fill = [], tri._fill_rab

    def recording_fill(query_major, key_major, *args):
        fills.append((query_major is not None, key_major is not None))
        real_fill(query_major, key_major, *args)

    monkeypatch.setattr(tri, "_fill_rab", recording_fill)
    real_buffer = tri._transient_buffer  # NaN, as fresh GPU memory may be: entries never written stay unread
    monkeypatch.setattr(tri, "_transient_buffer", lambda *a, **kw: real_buffer(*a, **kw).fill_(float("nan")))
    out, ref, leaves, ref_leaves = run_both(
        tri, [1, 70, 0, 17, 131], denominator=None, dtype=dtype, heads=3, bias_grad=bias_grad
    )
    assert_close(out, ref, "out", rtol, atol)
    names = ("q", "k", "v", "pos_weights", "time_weights")[: 5 if bias_grad else 3]
    for name, a, b in zip(names, leaves, ref_leaves, strict=False):
        assert_close(a.grad, b.grad, f"grad {name}", rtol, atol)
    assert [grid[0] for grid in dq_ds.grids] == ([3] if ds_heads == 3 else [2, 1])
    assert fills == ([(True, False), (False, True)] if rab_tiles else [])


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol", "rab_tiles", "lengths", "dqk", "dv"),
    [
        (torch.bfloat16, 4e-2, 1e-3, True, [1, 70, 0, 17, 64], 16, 32),
        (torch.float32, 1e-4, 1e-5, False, [90, 2, 31], 24, 20),  # head dims past which TMA reads zeros
    ],
)
def test_tma_streaming_matches_naive_oracle(tri, monkeypatch, dtype, rtol, atol, rab_tiles, lengths, dqk, dv):
    """The kernels streaming keys and values (forward, dq) and queries and output gradients (dk/dv) through
    TMA descriptors of each sequence's rows: tiles past a sequence's end must read zeros, as the masked
    loads do (the next sequence's rows would add to dk and dv); head dims that are not powers of two too."""
    monkeypatch.setattr(tri, "_TMA", True)
    monkeypatch.setattr(tri, "_RAB_TILES", rab_tiles)
    monkeypatch.setattr(tri, "_DS_BUFFER", rab_tiles)
    out, ref, leaves, ref_leaves = run_both(tri, lengths, denominator=None, dtype=dtype, dqk=dqk, dv=dv)
    assert_close(out, ref, "out", rtol, atol)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", rtol, atol)


def test_tma_needs_aligned_rows(tri):
    """TMA streams a tensor only if every head's rows start on 16 bytes and its rows are contiguous."""
    x = torch.zeros(10, 4, 64, dtype=torch.bfloat16)
    assert tri._tma_aligned(x)
    assert tri._tma_aligned(torch.zeros(10, 12, 64, dtype=torch.bfloat16)[:, 4:8])  # a head slice
    assert not tri._tma_aligned(torch.zeros(10, 4, 20, dtype=torch.bfloat16))  # 40-byte head stride
    assert not tri._tma_aligned(torch.zeros(10 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(10, 4, 64))
    assert not tri._tma_aligned(x.transpose(0, 2).contiguous().transpose(0, 2))  # strided rows
    assert not tri._tma_usable(x)  # a CPU tensor


@pytest.mark.parametrize("rab_tiles", [False, True])
@pytest.mark.parametrize(("lengths", "max_seq_len"), [([1, 5, 3], 5), ([70, 3], 70)])
def test_bias_table_reads_stay_inside_the_tables(tri, monkeypatch, rab_tiles, lengths, max_seq_len):
    """Blocks far longer than max_seq_len (rows and keys past each sequence's end), and a sequence as long
    as max_seq_len whose last block of rows runs into the padding: the kernels must not read outside the
    bias tables. Here the tables are views into storage NaN-padded on both sides, so a stray read poisons
    the result (the padding rows' bias, which dk/dv reads, included)."""
    monkeypatch.setattr(tri, "_RAB_TILES", rab_tiles)
    q, k, v, offsets, ts, tq, pos_w, time_w, n = make_inputs(lengths, max_seq_len=max_seq_len, seed=5)
    padded = [torch.full((x.numel() + 128,), float("nan")) for x in (pos_w, time_w)]
    for store, x in zip(padded, (pos_w, time_w), strict=True):
        store[64 : 64 + x.numel()] = x
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    tables = [store[64 : 64 + x.numel()] for store, x in zip(padded, (pos_w, time_w), strict=True)]
    tables = [x.requires_grad_(True) for x in tables]
    out = tri.triton_hstu_attention(
        *leaves, offsets, ts, tq, *tables, max_seq_len=n, alpha=0.25, denominator=None
    )  # fmt: skip
    out.backward(torch.ones_like(out))
    for x in [out, *(leaf.grad for leaf in leaves + tables)]:
        assert torch.isfinite(x).all()


@pytest.fixture
def gpu_launch_path(tri, monkeypatch):
    """The module's GPU launch path (autotuned kernels, grids from each config, the bias and ds buffers by
    memory budget) running in the interpreter: autotuning runs each config once and calls them all equal."""

    def bench_once(kernel_call, quantiles):
        kernel_call()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(tri, "_INTERPRET", False)
    monkeypatch.setattr(tri, "_require_cuda", lambda x: None)
    monkeypatch.setattr(tri, "_fast_math", lambda dtype: False)  # no inline PTX in the interpreter
    monkeypatch.setattr(tri, "_budget_numel", lambda x: 10**9)
    monkeypatch.setattr(tri, "_tma_usable", lambda *tensors: True)  # so the TMA configs run too
    tri._autotuned_kernels.cache_clear()
    tri._autotuned_buffer_kernels.cache_clear()
    for kernel in (*tri._autotuned_kernels(None, None), *tri._autotuned_buffer_kernels()):
        kernel._do_bench = bench_once
    yield tri
    tri._autotuned_kernels.cache_clear()
    tri._autotuned_buffer_kernels.cache_clear()


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol", "ds_heads", "dq_source"),
    [
        (torch.float32, 1e-4, 1e-5, None, "ds_buffer"),
        (torch.bfloat16, 4e-2, 1e-3, 1, "ds_buffer"),
        (torch.bfloat16, 4e-2, 1e-3, 1, "atomic"),
        (torch.bfloat16, 4e-2, 1e-3, None, "recompute"),
    ],
)
def test_gpu_launch_path_matches_naive_oracle(
    gpu_launch_path, monkeypatch, dtype, rtol, atol, ds_heads, dq_source
):
    """What only a GPU run would otherwise exercise: autotuned launches with every config (bf16 tries them
    all, TMA streaming included; fp32 one), the bias buffer, and the ds buffer for all heads or
    (ds_heads=1) one head at a time, so later dk/dv launches reuse the tuned config without zeroing the
    gradients of the first; dq from the ds buffer, recomputed, or added up by dk/dv ("atomic": every config
    the autotuner tries adds to a copy, not to dq). The bias and ds buffers start as NaN, as fresh GPU
    memory may: what a kernel reads without writing it first (the ds reduction's and the dq kernel's larger
    tiles reach entries past the diagonal that no dk/dv tile wrote) must stay masked."""
    real_buffer = gpu_launch_path._transient_buffer

    def nan_buffer(*args, **kwargs):
        buffer = real_buffer(*args, **kwargs)
        return None if buffer is None else buffer.fill_(float("nan"))

    monkeypatch.setattr(gpu_launch_path, "_transient_buffer", nan_buffer)
    if ds_heads is not None:
        monkeypatch.setattr(gpu_launch_path, "_ds_buffer_heads", lambda batch, q: ds_heads)
    monkeypatch.setattr(gpu_launch_path, "_DQ_SOURCE", dq_source)
    out, ref, leaves, ref_leaves = run_both(gpu_launch_path, [3, 70, 1], denominator=None, dtype=dtype)
    assert_close(out, ref, "out", rtol, atol)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", rtol, atol)


def test_gluon_rectangles_cover_their_groups_of_the_bias_buffers():
    """The Gluon kernels' TMA rectangles: 64-key group G of a sequence's key-major bias/ds part ([64 keys,
    rows - 64 G queries], dk/dv) and its query-major 64-row group G ([rows, 64 (G + 1) keys], forward) hold
    exactly that group's pairs, where the stated layout (and so the fill kernel) puts them. Their start
    offsets are plain arithmetic, run here on Python ints."""
    from modules import hstu_attention_gluon as gluon

    base, align = 4096, hstu_triton._RAB_ALIGN
    for length in (1, 8, 63, 64, 65, 129, 200, 257):
        query_major, key_major = naive_layouts(length)
        rows = -(-length // hstu_triton._RAB_ROW_PAD) * hstu_triton._RAB_ROW_PAD
        for group in range(-(-length // align)):
            first = align * group
            start = int(getattr(v := gluon._key_group_start.fn(base, rows, group), "value", v)) - base
            height = rows - first
            got = {
                (first + m, first + k): start + k * height + m for k in range(align) for m in range(height)
            }
            assert got == {pair: at for pair, at in key_major.items() if pair[1] // align == group}, (
                length,
                group,
            )
            start = int(getattr(v := gluon._row_group_start.fn(base, group), "value", v)) - base
            width = align * (group + 1)
            got = {
                (first + r, c): start + r * width + c
                for r in range(min(align, rows - first))
                for c in range(width)
            }
            assert got == {pair: at for pair, at in query_major.items() if pair[0] // align == group}, (
                length,
                group,
            )


def test_gluon_dkdv_says_what_it_needs():
    """`hstu_attention_gluon.usable` names the first requirement a call misses (the Triton dk/dv then runs):
    16-bit inputs, equal head dims of 64 or 128, TMA-aligned rows, an sm_90 GPU."""
    from modules import hstu_attention_gluon as gluon

    q = torch.zeros(5, 2, 128, dtype=torch.bfloat16)
    assert gluon.usable(q.float(), q, q, q) == "needs bf16 or fp16 inputs, not torch.float32"
    assert (
        gluon.usable(q[..., :64], q, q[..., :32], q)
        == "needs head dims q = k = v in (64, 128), not 64 and 32"
    )
    assert gluon.usable(q, q, torch.zeros(5 * 2 * 128 + 1, dtype=torch.bfloat16)[1:].view(5, 2, 128), q) == (
        "needs q, k, v and out (or its grad) rows on 16 bytes (TMA)"
    )
    assert gluon.usable(q, q, q, q) == "needs an sm_90 GPU (Hopper wgmma)"  # CPU tensors
    assert gluon.usable(q.half()[..., :64], q[..., :64], q[..., :64], q[..., :64]) == (
        "needs an sm_90 GPU (Hopper wgmma)"
    )


@pytest.mark.parametrize(("ds_heads", "denominator"), [(None, None), (1, 150.0)])
def test_gluon_dkdv_dispatch_hands_it_everything(gpu_launch_path, monkeypatch, ds_heads, denominator):
    """With `_DKDV_IMPL` "gluon" and a call it can take, the backward hands dk/dv, for each group of heads
    whose ds the buffer holds, to `hstu_attention_gluon.dkdv` instead of the Triton dk/dv. Gluon cannot run
    on a CPU, so here the Triton dk/dv stands in for it, launched from nothing but the arguments the Gluon
    launcher gets (the key-major bias buffer, the ds buffer, the run's offsets, its scalars): every
    output and gradient still matches the oracle, with the sequence length or a fixed denominator, so those
    arguments carry all that dk/dv needs."""
    from modules import hstu_attention_gluon as gluon

    tri = gpu_launch_path
    calls = []

    def triton_in_gluon_place(q, k, v, do, dk, dv, offsets, rab_keys, rab_base, ds, *, alpha, inv_den_const,
                              den_is_len, ds_head_stride, head0, group_heads, longest):  # fmt: skip
        calls.append((head0, group_heads, ds.numel() // ds_head_stride))
        unused = torch.zeros(q.shape[0], dtype=torch.int32)  # times, bias weights: the buffers hold rab
        block_dqk, block_dv = tri._dims(q.shape[2], v.shape[2])
        tri._hstu_bwd_dkdv_kernel[(group_heads, triton.cdiv(longest, 64), offsets.numel() - 1)](
            q, k, v, do, dk, dv, dk, unused.float(), unused.float(), offsets, unused, unused, unused.float(),
            unused.float(), rab_keys, rab_base, ds, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
            dv.stride(1), dk.stride(0), dk.stride(1),
            alpha=alpha, inv_den_const=inv_den_const, max_seq_len=1, num_buckets=0, len_key=0,
            ds_head_stride=ds_head_stride, head0=head0, DQK=q.shape[2], DV=v.shape[2], BLOCK_DQK=block_dqk,
            BLOCK_DV=block_dv, DEN_IS_LEN=den_is_len, DOT_PREC="ieee", FAST_MATH=False, BLOCK_BUCKETS=2,
            RAB_TILES=True, RAB_GRAD=False, DS_STORE=True, DQ_ATOMIC=False, BLOCK_M=16, BLOCK_N=64,
            TABLE_GATHER=False, TMA=False,
        )  # fmt: skip

    def no_triton_dkdv(*args, **kwargs):
        raise AssertionError("the Triton dk/dv ran in the Gluon kernel's place")

    monkeypatch.setattr(tri, "_DKDV_IMPL", "gluon")
    monkeypatch.setattr(gluon, "usable", lambda *tensors: None)
    monkeypatch.setattr(gluon, "dkdv", triton_in_gluon_place)
    _, _, dkdv = tri._autotuned_kernels(None, None)
    monkeypatch.setattr(dkdv, "run", no_triton_dkdv)
    if ds_heads is not None:
        monkeypatch.setattr(tri, "_ds_buffer_heads", lambda batch, q: ds_heads)
    out, ref, leaves, ref_leaves = run_both(tri, [3, 70, 1, 130], denominator=denominator, heads=3)
    assert calls == ([(0, 3, 3)] if ds_heads is None else [(0, 1, 1), (1, 1, 1), (2, 1, 1)])
    assert_close(out, ref, "out", 1e-4, 1e-5)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", 1e-4, 1e-5)


@pytest.mark.parametrize("denominator", [None, 150.0])
def test_gluon_forward_dispatch_hands_it_everything(gpu_launch_path, monkeypatch, denominator):
    """With `_FWD_IMPL` "gluon" and a call it can take, the forward of each run of sequences goes to
    `hstu_attention_gluon.forward` instead of the Triton forward; as for dk/dv, the Triton forward stands in,
    launched from nothing but the Gluon launcher's arguments (the query-major bias buffer, the run's
    offsets, its scalars), and the outputs and gradients match the oracle. A tiny memory budget makes the
    batch several runs, each with its own call."""
    from modules import hstu_attention_gluon as gluon

    tri = gpu_launch_path
    calls = []

    def triton_in_gluon_place(
        q, k, v, out, offsets, rab, rab_base, *, alpha, inv_den_const, den_is_len, longest
    ):
        calls.append(offsets.numel() - 1)
        unused = torch.zeros(q.shape[0], dtype=torch.int32)  # timestamps, bias weights: the buffer holds rab
        block_dqk, block_dv = tri._dims(q.shape[2], v.shape[2])
        tri._hstu_fwd_kernel[(q.shape[1], triton.cdiv(longest, 16), offsets.numel() - 1)](
            q, k, v, out, offsets, unused, unused, unused.float(), unused.float(), rab, rab_base,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), alpha=alpha, inv_den_const=inv_den_const, max_seq_len=1, num_buckets=0, len_key=0,
            DQK=q.shape[2], DV=v.shape[2], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, DEN_IS_LEN=den_is_len,
            DOT_PREC="ieee", FAST_MATH=False, BLOCK_BUCKETS=2, RAB_TILES=True, BLOCK_M=16, BLOCK_N=16,
            TABLE_GATHER=False, TMA=False,
        )  # fmt: skip

    def no_triton_forward(*args, **kwargs):
        raise AssertionError("the Triton forward ran in the Gluon kernel's place")

    monkeypatch.setattr(tri, "_FWD_IMPL", "gluon")
    monkeypatch.setattr(tri, "_budget_numel", lambda x: 6000)  # runs of sequences whose buffers fit
    monkeypatch.setattr(gluon, "usable", lambda *tensors: None)
    monkeypatch.setattr(gluon, "forward", triton_in_gluon_place)
    fwd, _, _ = tri._autotuned_kernels(None, None)
    monkeypatch.setattr(fwd, "run", no_triton_forward)
    out, ref, leaves, ref_leaves = run_both(tri, [3, 70, 1, 40, 25], denominator=denominator, heads=3)
    assert calls == [2, 3]  # bias buffers of 512 + 5120, then 512 + 2560 + 2048 elements
    assert_close(out, ref, "out", 1e-4, 1e-5)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", 1e-4, 1e-5)


@pytest.mark.parametrize("dq_source", ["ds_buffer", "atomic"])
def test_batch_runs_within_the_memory_budget(gpu_launch_path, monkeypatch, dq_source):
    """A batch whose bias buffer passes the budget runs as consecutive runs of sequences that each fit; a
    sequence too long for it alone runs by itself with the bias computed inline and dk/dv reducing the bias
    gradients in its loop (a different autotune key, tuned mid-batch: it must not zero the other runs'
    gradients, nor, when dk/dv adds dq up, their dq); a run with room for one head's ds at a time
    relaunches dk/dv per head."""
    tri = gpu_launch_path
    monkeypatch.setattr(tri, "_budget_numel", lambda x: 3100)
    monkeypatch.setattr(tri, "_DQ_SOURCE", dq_source)
    lengths = [40, 3, 70, 1, 25]  # bias-buffer sizes 2560, 512, 5120, 512, 2048 (rows padded to 8)
    _, _, _, offsets, ts, tq, _, _, n = make_inputs(lengths)
    batch = tri.plan_triton_attention(offsets, ts, tq, max_seq_len=n)
    runs = tri._chunks(batch, torch.empty(0))
    assert [(c.num_seqs, c.rab_numel, c.rab_base.tolist()) for c in runs] == [
        (2, 3072, [0, 2560]), (1, 5120, [0]), (2, 2560, [0, 512])
    ]  # fmt: skip
    assert [c.offsets.tolist() for c in runs] == [[0, 40, 43], [43, 113], [113, 114, 139]]
    # bf16: the autotuner tries several configs (and zeroes the bias gradients before each)
    out, ref, leaves, ref_leaves = run_both(tri, lengths, denominator=None, dtype=torch.bfloat16)
    assert_close(out, ref, "out", 4e-2, 1e-3)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", 4e-2, 1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gpu_launch_path_random_batches_and_budgets(gpu_launch_path, monkeypatch, seed):
    """Random jagged batches (lengths 0 and 1 included), head counts, denominators and memory budgets: runs
    of sequences, groups of heads, and inline runs mix as they fall (dq from the ds buffer where a run has
    it; seed 1 with dq added up by dk/dv, so a run tuned mid-batch must keep the dq of the runs before it;
    seed 2 recomputing dq); every output and gradient matches, though they start as NaN."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 90, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
    lengths[0] = 1
    heads = int(torch.randint(1, 4, (1,), generator=g))
    budget = int(torch.randint(64, 9000, (1,), generator=g))
    monkeypatch.setattr(gpu_launch_path, "_budget_numel", lambda x: budget)
    monkeypatch.setattr(gpu_launch_path, "_DQ_SOURCE", ("ds_buffer", "atomic", "recompute")[seed])
    real_empty_like = torch.empty_like  # NaN outputs, as fresh GPU memory may hold: every row must be written
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: real_empty_like(*a, **kw).fill_(float("nan")))
    denominator = None if seed % 2 == 0 else 100.0
    out, ref, leaves, ref_leaves = run_both(
        gpu_launch_path, lengths, denominator=denominator, heads=heads, max_seq_len=100, seed=seed
    )
    assert_close(out, ref, "out", 1e-4, 1e-5)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(
            a.grad, b.grad, f"grad {name} (lengths {lengths}, heads {heads}, budget {budget})", 1e-4, 1e-5
        )


def test_matches_team_reference_backend(tri):
    """Same numbers as modules.hstu_attention's reference backend (denominator = max_seq_len there)."""
    hstu_attention = pytest.importorskip("modules.hstu_attention").hstu_attention
    q, k, v, offsets, ts, tq, pos_w, time_w, n = make_inputs([20, 1, 45, 8], max_seq_len=50, seed=3)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, pos_w, time_w)]
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v, pos_w, time_w)]
    kw = dict(max_seq_len=n, alpha=0.25, denominator=float(n))
    out = tri.triton_hstu_attention(*leaves[:3], offsets, ts, tq, *leaves[3:], **kw)
    ref = hstu_attention(*ref_leaves[:3], offsets, ts, tq, *ref_leaves[3:], backend="reference", **kw)
    assert_close(out, ref, "out", 1e-4, 1e-5)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    ref.backward(grad)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, b.grad, f"grad {name}", 1e-4, 1e-5)


def test_strided_inputs_and_frozen_bias(tri):
    """q/k/v as column slices of one projection (as HSTU splits U, V, Q, K); bias weights without grad."""
    lengths = [19, 3, 40]
    q, k, v, offsets, ts, tq, pos_w, time_w, n = make_inputs(lengths, dqk=16, dv=16, seed=5)
    packed = torch.cat([q, k, v], dim=-1).requires_grad_(True)  # [T, H, 48]
    qs, ks, vs = packed[..., :16], packed[..., 16:32], packed[..., 32:]
    assert not qs.is_contiguous()
    out = tri.triton_hstu_attention(qs, ks, vs, offsets, ts, tq, pos_w, time_w, max_seq_len=n, alpha=0.3,
                                    denominator=None)  # fmt: skip
    ref = naive_hstu_attention(
        q, k, v, offsets, ts, tq, pos_w, time_w, max_seq_len=n, alpha=0.3, denominator=None
    )
    assert_close(out, ref, "out", 1e-4, 1e-5)
    out.sum().backward()
    assert packed.grad is not None and packed.grad.abs().sum() > 0
    assert pos_w.grad is None and time_w.grad is None


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_precision_forward_and_grads(tri, dtype, rtol):
    """16-bit inputs (bf16 is what training uses on GPUs): fp32 accumulation keeps every error at the
    input's rounding level; gradients come back in the inputs' dtype (bias gradients in theirs)."""
    out, ref, leaves, ref_leaves = run_both(tri, [23, 1, 48, 17], denominator=None, dtype=dtype)
    assert out.dtype == dtype
    assert_close(out, ref, "out", rtol, 1e-3)
    for name, a, b in zip(("q", "k", "v", "pos_weights", "time_weights"), leaves, ref_leaves, strict=True):
        assert a.grad.dtype == a.dtype, name
        assert_close(a.grad, b.grad, f"grad {name}", rtol, 1e-3)


def test_plan_shared_by_calls(tri):
    """A plan built once per batch (as HSTUEncoder does for its layers) gives the same outputs and gradients
    as each call building its own; a plan for other offsets, times or max_seq_len is refused."""
    from modules.hstu_attention import hstu_attention, plan_attention

    q, k, v, offsets, ts, tq, pos_w, time_w, n = make_inputs([12, 1, 30], seed=21)
    kw = dict(max_seq_len=n, alpha=0.3, denominator=None)
    plan = plan_attention(offsets, ts, tq, max_seq_len=n, num_time_buckets=128, backend="triton")
    assert isinstance(plan, tri.TritonPlan)
    results = []
    for shared in (None, plan, plan):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, pos_w, time_w)]
        out = hstu_attention(*leaves[:3], offsets, ts, tq, *leaves[3:], backend="triton", plan=shared, **kw)
        out.square().sum().backward()
        results.append([out.detach()] + [x.grad for x in leaves])
    for got in results[1:]:
        for a, b in zip(got, results[0], strict=True):
            assert torch.equal(a, b)
    equal_copy = offsets.clone()  # another tensor with the same values is accepted
    tri.triton_hstu_attention(q, k, v, equal_copy, ts, tq, pos_w, time_w, plan=plan, **kw)
    other = torch.tensor([0, 13, 13, 43])
    with pytest.raises(ValueError, match="other offsets"):
        tri.triton_hstu_attention(q, k, v, other, ts, tq, pos_w, time_w, plan=plan, **kw)
    with pytest.raises(ValueError, match="other timestamps"):
        tri.triton_hstu_attention(q, k, v, offsets, ts + 1, tq, pos_w, time_w, plan=plan, **kw)
    with pytest.raises(ValueError, match="other query_times"):
        tri.triton_hstu_attention(q, k, v, offsets, ts, tq + 1, pos_w, time_w, plan=plan, **kw)
    with pytest.raises(ValueError, match="max_seq_len"):
        tri.triton_hstu_attention(q, k, v, offsets, ts, tq, torch.zeros(2 * n + 1), time_w, plan=plan,
                                  max_seq_len=n + 1, alpha=0.3, denominator=None)  # fmt: skip
    jagged_plan = plan_attention(offsets, ts, tq, max_seq_len=n, num_time_buckets=128, backend="jagged")
    with pytest.raises(ValueError, match="built for backend 'jagged'"):
        hstu_attention(q, k, v, offsets, ts, tq, pos_w, time_w, backend="triton", plan=jagged_plan, **kw)
    with pytest.raises(ValueError, match="built for backend 'triton'"):
        hstu_attention(q, k, v, offsets, ts, tq, pos_w, time_w, backend="jagged", plan=plan, **kw)


@pytest.mark.parametrize(
    ("offsets", "found"),
    [
        ([2, 5, 10], "first offset 2, last 10, shortest sequence 3"),  # tokens 0-1 in no sequence
        ([0, 5, 9], "first offset 0, last 9, shortest sequence 4"),  # token 9 in no sequence
        ([0, 6, 4, 10], "first offset 0, last 10, shortest sequence -2"),
    ],
)
def test_plan_rejects_offsets_that_leave_tokens_out(tri, offsets, found):
    """Every token must lie in exactly one sequence: the kernels write only the rows of sequences, so a
    token outside them would get an unwritten output row."""
    _, _, _, _, ts, tq, _, _, _ = make_inputs([10])
    with pytest.raises(ValueError, match=f"must start at 0, never decrease and end at T=10.*{found}"):
        tri.plan_triton_attention(torch.tensor(offsets), ts, tq, max_seq_len=10)


def test_rejects_sequences_longer_than_max_seq_len(tri):
    q, k, v, offsets, ts, tq, pos_w, time_w, _ = make_inputs([10, 30])
    with pytest.raises(ValueError, match="max_seq_len=20"):
        tri.triton_hstu_attention(q, k, v, offsets, ts, tq, pos_w[: 2 * 20 - 1], time_w, max_seq_len=20,
                                  alpha=1.0, denominator=None)  # fmt: skip


def test_kernels_compile_for_hopper(tri):
    """The real compiler (not the interpreter) builds all three kernels for sm_90 within its limits.

    Runs benchmarks/triton_compile.py in a fresh process without TRITON_INTERPRET: layouts, tensor-core
    shapes and shared memory are only checked there, and no GPU is needed to check them. Every bf16 config
    is compiled, with and without the bias buffer (dk/dv with it also writing the ds buffer, with and
    without adding dq up), with both time-bias lookups, and the kernels that fill or read the buffers (dq
    from ds among them); fp32 (correctness only) compiles one small tile of each attention kernel. The Gluon
    forward and dk/dv (bf16) compile warp-specialised, with one SiLU a pair and at most 256 spilled bytes.
    Two processes, forward and dq in one, dk/dv and the buffer kernels in the other, share the work.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "triton_compile.py"), "--dtypes", "bf16,fp32"]
    procs = [
        subprocess.Popen(
            [*cmd, "--kernels", kernels], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for kernels in ("fwd,dq,gluon_fwd", "dkdv,fill,gluon_dkdv")
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out + err
    results = [re.search(r"^RESULT arch=sm_90 compiled=(\d+) failed=(\d+)", out, re.M) for out, _ in outputs]
    assert all(results), outputs
    with_buffer = [tri._prune_configs(c, {}, RAB_TILES=True) for c in (tri._FWD_CONFIGS, tri._DKDV_CONFIGS)]
    dkdv_in_loop = tri._prune_configs(tri._DKDV_CONFIGS, {}, RAB_GRAD=True, DS_STORE=False)
    # dk/dv with the buffer twice: dq from its own kernel, and added up by dk/dv's atomics
    bf16 = 2 * len(tri._FWD_CONFIGS) + len(dkdv_in_loop) + 2 * len(with_buffer[0]) + 2 * len(with_buffer[1])
    fp32 = 3 * 2 + 1  # one small tile per kernel, with and without the buffer (and dk/dv's dq atomics)
    # the fill (forward: query-major; backward: key-major, or both layouts) and the ds reduction, both dtypes
    buffer_kernels = 3 * len(tri._FILL_CONFIGS) + len(tri._RAB_GRAD_CONFIGS)
    dq_ds = len(tri._DQ_DS_CONFIGS) + 1  # every bf16 tile, one fp32
    compiled = bf16 + fp32 + 2 * buffer_kernels + dq_ds + 2  # + the Gluon forward and dk/dv (16-bit only)
    counts = [(int(r.group(1)), int(r.group(2))) for r in results]
    assert sum(n for n, _ in counts) == compiled and all(f == 0 for _, f in counts), outputs
    # the Gluon kernels: warp-specialised (else their status fails), one SiLU a pair, within 256 spilled bytes
    for kernel, (out, _) in zip(("gluon_fwd", "gluon_dkdv"), outputs, strict=True):
        row = re.search(
            rf"^{kernel} +bf16 .* w4 s\d +[0-9.]+ +\d+ +(\d+) +[0-9.]+ +1 +[0-9.]+ +\d+  ok$", out, re.M
        )
        assert row is not None and int(row.group(1)) <= 256, out


@triton.jit
def bucket_bounds_kernel(TQ, TK, OUT, N: tl.constexpr):
    """`_bucket_bounds` of N query and N key times, into OUT[0:2]."""
    tq, tk = tl.load(TQ + tl.arange(0, N)), tl.load(TK + tl.arange(0, N))
    lo, hi = hstu_triton._bucket_bounds(tq, tk, 128, False)
    tl.store(OUT, lo)
    tl.store(OUT + 1, hi)


def test_warp_specialisation_probe_matches_the_readme():
    """benchmarks/triton_ws_probe.py compiles a dk/dv-shaped loop with Triton's automatic warp
    specialisation for sm_90 and reads how it split the work. The README says Triton 3.6 duplicates the
    work at 64 keys and misplaces the second consumer's tiles at 128: a Triton that does better fails this
    test, so that the README and the kernels' plans get revisited."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "triton_ws_probe.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = "keys64=every_product_done_twice keys128=wrong_tile_coordinates usable=no"
    assert f"RESULT triton={triton.__version__} {result}" in proc.stdout, proc.stdout


def test_bucket_bounds_hold_every_pair_and_are_exact_for_separate_times():
    """`_bucket_bounds` (the ds reduction's per-tile bucket range, from the query and key times alone)
    against every pair's bucket: they bound all of them, for any times, and are the exact lowest and
    highest when the query times all follow the key times (off the diagonal of sorted times) or all
    precede them."""
    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        times = torch.exp(torch.rand(32, generator=g) * 20).long().to(torch.int32)
        order = trial % 3  # 0: any order; 1: queries after keys; 2: queries before keys
        if order:
            times = times.sort(descending=order == 2).values
        tk, tq = times[:16].contiguous(), times[16:].contiguous()
        out = torch.zeros(2, dtype=torch.int32)
        bucket_bounds_kernel[(1,)](tq, tk, out, N=16)
        dt = (tq[:, None] - tk[None, :]).abs().clamp(min=1).float()  # the kernel's fp32 logarithm
        buckets = (torch.log(dt) / 0.301).long().clamp(0, 128)
        assert out[0] <= buckets.min() and buckets.max() <= out[1], (trial, out.tolist())
        if order:
            assert out.tolist() == [buckets.min().item(), buckets.max().item()], trial


@pytest.mark.parametrize(("gap_scale", "kernel_dtype"), [(1e6, torch.int32), (3e8, torch.int64)])
def test_timestamps_relative_to_each_sequence(tri, gap_scale, kernel_dtype):
    """Kernels get each sequence's timestamps and query times minus its first timestamp, as int32 when
    every span fits and int64 past 2**31 seconds; both give the oracle's buckets."""
    lengths = [25, 1, 0, 40]
    q, k, v, offsets, _, _, pos_w, time_w, n = make_inputs(lengths, seed=11)
    g = torch.Generator().manual_seed(12)
    ts = 1_600_000_000 + (torch.rand(sum(lengths), generator=g) * gap_scale).long().cumsum(0)
    ts[3] -= 5_000  # one out of order
    tq = query_times_after(ts, offsets, g)
    plan = tri.plan_triton_attention(offsets, ts, tq, max_seq_len=n)
    kernel_ts, kernel_tq = plan.kernel_timestamps, plan.kernel_query_times
    assert kernel_ts.dtype == kernel_tq.dtype == kernel_dtype
    for s0, s1 in ((0, 25), (25, 26), (26, 66)):  # differences within each sequence are kept exactly
        assert torch.equal(kernel_ts[s0:s1].long() - kernel_ts[s0], ts[s0:s1] - ts[s0])
        assert torch.equal(kernel_tq[s0:s1].long() - kernel_ts[s0], tq[s0:s1] - ts[s0])
    out = tri.triton_hstu_attention(q, k, v, offsets, ts, tq, pos_w, time_w, max_seq_len=n, alpha=0.2,
                                    denominator=None)  # fmt: skip
    ref = naive_hstu_attention(
        q, k, v, offsets, ts, tq, pos_w, time_w, max_seq_len=n, alpha=0.2, denominator=None
    )
    assert_close(out, ref, "out", 1e-4, 1e-5)


def test_gpu_check_harness_runs_in_the_interpreter():
    """benchmarks/hstu_attention.py's correctness check and benchmark (gpu_check.sh's first two steps) on tiny
    CPU cases, so a GPU session never spends its device time on a broken harness."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "hstu_attention.py"), "--cpu-smoke"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESULT check: PASS" in proc.stdout, proc.stdout
    variants = ("rab_buffer ", "rab_buffer_dq_recompute", "rab_buffer_dq_atomic", "inline_global")
    variants += ("inline_table_gather", "rab_buffer_gluon_dkdv", "rab_buffer_gluon_fwd")
    assert all(f"check {name}" in proc.stdout for name in variants), proc.stdout
    rows = (
        "triton ",
        "triton_frozen_bias",
        "triton_gluon_dkdv",
        "triton_gluon_fwd",
        "triton_dq_recompute",
        "triton_dq_atomic",
        "triton_fused_bias_grad",
        "triton_inline_bias",
    )
    rows += ("sdpa_causal",)
    assert all(f"  {row}" in proc.stdout for row in rows), proc.stdout
    assert "RESULT hstu_attention fwd+bwd TFLOP/s on CPU" in proc.stdout, proc.stdout


def test_training_step_benchmark_runs_in_the_interpreter():
    """benchmarks/hstu_step_gpu.py (gpu_check.sh's third step) on its tiny CPU config: the full training step
    with the Triton backend in the interpreter and with the padded reference, whose losses agree."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "hstu_step_gpu.py"), "--cpu-smoke"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(
        r"^RESULT hstu_step on CPU .*tiny/triton .*tiny/padded .*; failed: none$", proc.stdout, re.M
    )
    losses = dict(re.findall(r"^\[tiny/(\w+)\] .* loss ([0-9.]+)$", proc.stdout, re.M))
    # bf16 backbone: five steps apart by 1e-4 to 2e-3 (in fp32 the two agree to the printed digits)
    assert abs(float(losses["triton"]) - float(losses["padded"])) < 5e-3, proc.stdout


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package; its scripts import each other)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
        del sys.modules[spec.name]
    return module


def test_gpu_check_reports_a_broken_path_and_goes_on(tri, monkeypatch, capsys):
    """A kernel path that fails on the GPU (dq added up by dk/dv, here) is reported as a failed check and a
    failed benchmark row, and every other variant and row still runs: a GPU session keeps their numbers."""
    bench = load_benchmark("hstu_attention")
    real = tri.triton_hstu_attention

    def broken_atomic_dq(*args, **kwargs):
        if tri._DQ_SOURCE == "atomic":
            raise RuntimeError("simulated compile failure\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(tri, "triton_hstu_attention", broken_atomic_dq)
    monkeypatch.setattr(
        bench, "VARIANTS", {k: bench.VARIANTS[k] for k in ("rab_buffer", "rab_buffer_dq_atomic")}
    )
    assert not bench.run_check("cpu", small=True)
    out = capsys.readouterr().out
    assert re.search(
        r"check rab_buffer_dq_atomic .* FAIL: RuntimeError: simulated compile failure$", out, re.M
    )
    assert re.search(r"check rab_buffer .* d_time_weights .* ok$", out, re.M), out
    monkeypatch.undo()
    monkeypatch.setattr(tri, "triton_hstu_attention", broken_atomic_dq)
    assert bench.run_benchmark(skip_padded=True, device="cpu", shapes=[("B64_L1024", 2, 1, 20)]) == [
        "B64_L1024/triton_dq_atomic"
    ]
    out = capsys.readouterr().out
    assert "  triton_dq_atomic       FAILED: RuntimeError: simulated compile failure\n" in out, out
    assert re.search(r"^  triton_dq_recompute .* TFLOP/s$", out, re.M), out
    assert "failed rows: B64_L1024/triton_dq_atomic" in out, out


def test_gpu_check_says_where_a_result_is_wrong():
    """The GPU check's `where_wrong` localises wrong rows of a per-token result: by head, by 64-row half of
    their 128-row block, in or before the sequence's last block; NaN counts as wrong."""
    bench = load_benchmark("hstu_attention")
    offsets = torch.tensor([0, 3, 300, 301])
    expected = torch.zeros(301, 2, 4, dtype=torch.float64)
    actual = expected.clone()
    actual[3 + 70, 0, 2] = float("nan")  # sequence 1 (297 long): block 0, second half
    actual[3 + 130, 1, 0] = 1.0  # block 1, first half
    actual[3 + 260, 1, 3] = -1.0  # the last block (256..296), first half
    actual[3 + 5, 0, 1] = 1e-4  # within the tolerance
    assert bench.where_wrong(actual, expected, offsets, 1e-3) == (
        "3 of 602 (token, head) rows; by head 0: 1, 1: 2; in the first/second 64 rows of a 128-row block "
        "2/1; in the sequence's last 128-row block 1, before it 2; first: sequence 1 position 70 of 297, "
        "head 0"
    )
    assert bench.where_wrong(expected, expected, offsets, 1e-3) == "no row over the tolerance"


def sigterm_on_call(fn, call: int):
    """fn, except that its call number `call` sends this process SIGTERM first (as gpu_check.sh's
    `timeout` does), so the harness is interrupted in the middle of its work."""
    calls = itertools.count(1)

    def wrapped(*args, **kwargs):
        if next(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return fn(*args, **kwargs)

    return wrapped


def test_gpu_check_stopped_by_its_time_limit_still_reports(tri, monkeypatch, capsys):
    """A check or benchmark that gpu_check.sh's time limit stops (SIGTERM) still ends with its RESULT line,
    holding what it finished, marked INCOMPLETE with where it stopped, and counts as failed; the benchmark
    times the default path and SDPA, at the target's shape, before anything else."""
    bench = load_benchmark("hstu_attention")
    assert bench.SHAPES[0][0] == "B16_L4096"
    monkeypatch.setattr(tri, "triton_hstu_attention", sigterm_on_call(tri.triton_hstu_attention, 2))
    with bench.stop_on_sigterm():
        assert not bench.run_check("cpu", small=True)
    out = capsys.readouterr().out
    assert re.search(r"^check rab_buffer  .* d_time_weights .* ok$", out, re.M), out
    assert re.search(
        r"^RESULT check: FAIL .*; INCOMPLETE: stopped by SIGTERM during rab_buffer_dq_recompute autotuned "
        r"float32 L<=40$",
        out,
        re.M,
    ), out
    assert "check rab_buffer_dq_recompute" not in out, out

    shape = [("B16_L4096", 2, 1, 20)]
    monkeypatch.setattr(bench, "bench", sigterm_on_call(bench.bench, 6))  # plan, 2 x triton, 2 x sdpa, ...
    with bench.stop_on_sigterm():
        failed = bench.run_benchmark(skip_padded=True, device="cpu", shapes=shape)
    assert failed == ["stopped during B16_L4096/triton_gluon_dkdv"]
    out = capsys.readouterr().out
    assert re.search(r"^  triton  .* TFLOP/s$", out, re.M), out
    assert re.search(r"^  sdpa_causal_padded .* TFLOP/s$", out, re.M), out
    result = re.search(r"^RESULT hstu_attention .*$", out, re.M).group(0)
    assert result.endswith(
        "failed rows: stopped during B16_L4096/triton_gluon_dkdv; INCOMPLETE: stopped by SIGTERM during "
        "B16_L4096/triton_gluon_dkdv, later rows not timed"
    ), result
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_training_step_benchmark_stopped_by_its_time_limit_still_reports(monkeypatch, capsys):
    """hstu_step_gpu.py stopped by SIGTERM in its second configuration prints the first one's numbers in
    its RESULT line, marked INCOMPLETE, and exits 1."""
    step = load_benchmark("hstu_step_gpu")
    finished = dict(ms=2.0, tokens_per_s=5e5, mfu=0.1, loss=1.0, mem_gib=0.0)
    monkeypatch.setattr(step, "run", sigterm_on_call(lambda *args: finished, 2))
    monkeypatch.setattr(sys, "argv", ["hstu_step_gpu.py", "--cpu-smoke"])
    with pytest.raises(SystemExit) as exit_:
        step.main()
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert (
        "RESULT hstu_step on CPU (interpreter smoke run): tiny/triton 0.500 Mtok/s MFU 10.00% (2.0 ms); "
        "failed: none; INCOMPLETE: stopped by SIGTERM during tiny/padded\n"
    ) in out, out


def test_benchmark_logs_every_config_time(gpu_launch_path, capsys):
    """benchmarks/hstu_attention.py prints each config's time whenever a kernel is autotuned (Triton prints
    only the winner), TMA configs included, and leaves Triton's autotuner as it was."""
    from triton.runtime.autotuner import Autotuner

    bench = load_benchmark("hstu_attention")
    tune = Autotuner.run
    with bench.config_times():
        run_both(gpu_launch_path, [3, 20], denominator=None, dtype=torch.bfloat16)
    assert Autotuner.run is tune
    out = capsys.readouterr().out
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq_ds", "rab_fill", "rab_grad"):
        assert f"tuned _hstu_{kernel}_kernel (ms, best first): " in out, out
    assert "64x64 w4 s2 tma 1.000" in out, out


def test_benchmark_compiles_each_tuning_configs_together_first(gpu_launch_path, monkeypatch):
    """benchmarks/hstu_attention.py's `parallel_compile`: when an autotuner is about to tune, every config
    it will time is first compiled (a warmup launch, submitted to Triton's async compile mode on a thread
    pool) before any of them runs; tuned launches compile nothing more; the autotuner is restored."""
    from triton import AsyncCompileMode
    from triton.runtime import _async_compile
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    bench = load_benchmark("hstu_attention")
    events = []
    launch = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        mode = _async_compile.active_mode.get()
        assert not warmup or isinstance(mode, AsyncCompileMode), "a warmup outside the async compile mode"
        tile = tuple(v for k, v in sorted(kwargs.items()) if k.startswith(("BLOCK_", "TMA", "LOOP")))
        events.append((self.fn.__name__, "compile" if warmup else "launch", tile, kwargs.get("num_warps")))
        return launch(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    prune = Autotuner.prune_configs
    with bench.parallel_compile(workers=2):
        run_both(gpu_launch_path, [3, 20], denominator=None, dtype=torch.bfloat16)
    assert Autotuner.prune_configs is prune
    for kernel in (
        "_hstu_fwd_kernel",
        "_hstu_bwd_dkdv_kernel",
        "_hstu_bwd_dq_ds_kernel",
        "_hstu_rab_fill_kernel",
    ):
        mine = [(what, tile, warps) for name, what, tile, warps in events if name == kernel]
        compiled = [(tile, warps) for what, tile, warps in mine if what == "compile"]
        assert len(compiled) > 1, (kernel, mine)
        first_launch = next(i for i, (what, _, _) in enumerate(mine) if what == "launch")
        assert all(what == "compile" for what, _, _ in mine[:first_launch]), (kernel, mine)
        assert sorted(compiled) == sorted(
            (tile, warps) for _, tile, warps in mine[first_launch:][: len(compiled)]
        )


def test_descriptor_scratch_allocator_only_where_none_is_set(tri):
    """The TMA descriptors' scratch: a torch allocation on the inputs' device for our launches when the
    caller set no Triton allocator (Triton would refuse to launch), the caller's own otherwise; restored
    on the way out."""
    from triton.runtime import _allocation

    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    with tri._descriptor_scratch(torch.device("cpu")):
        scratch = _allocation._allocator.get()(256, 128, None)
        assert scratch.numel() == 256 and scratch.dtype == torch.int8 and scratch.device.type == "cpu"
    assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)

    def own(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    token = _allocation._allocator.set(own)
    try:
        with tri._descriptor_scratch(torch.device("cpu")):
            assert _allocation._allocator.get() is own
        assert _allocation._allocator.get() is own
    finally:
        _allocation._allocator.reset(token)
