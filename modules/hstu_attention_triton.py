"""Fused Triton HSTU attention over jagged sequences: forward and backward, no padded N x N tensor.

Same math as `modules.hstu_attention.hstu_attention` (see that module's docstring):
out[i] = sum_{j <= i, same sequence} SiLU(alpha * <q_i, k_j> + rab(i, j)) / den * v_j, with
rab(i, j) = pos_weights[(j - i) + max_seq_len - 1] + time_weights[bucket(tq_i - t_j)], the bucket taken
from the query and key times. Inputs bf16/fp16/fp32, accumulation fp32.

Where rab comes from: on the GPU, by default, one fill kernel writes rab(i, j) / 2 of every causal pair into a
buffer (sum of L^2 / 2 entries in the inputs' dtype; row i padded to a multiple of 64 keys, a sequence's rows
to a multiple of 8) once per call, and the attention kernels read it as 16-byte-vectorised tiles: query-major
for the forward and dq; in the backward also key-major (the same pairs transposed, each key's queries
contiguous) for dk/dv, whose tiles are key-major, so its bias tiles need no transpose. Computing it
inline instead costs each pair a bucket logarithm and two table gathers per head and per kernel, which on
an H100 made the forward L1-bound at about a third of its bias-free speed (README, GPU status); the buffer
does that work once for all heads. A batch whose buffer would pass `_RAB_MEMORY_FRACTION` of the GPU's
memory runs as consecutive runs of sequences whose buffers fit, launched one after another. The inline
path remains for a sequence too long for the budget alone, for a buffer that finds no room (with a
warning), and under the interpreter.

Tiling (grid = (heads, blocks, sequences); each program reads its sequence's start/length from offsets):
- forward: one program per query block; one loop over the key blocks up to its last row, acc += SiLU(s) @ v
  in fp32, times 1/den once at the end. The causal mask j <= min(i, last position) is applied behind a
  branch, only in the key blocks that reach the diagonal: with it on every block, the comparisons (which
  the compiler widens to 64 bits) and selects were 20-30% of the loop's sm_90 instructions in all three
  attention kernels. (One loop with a branch holds fewer live registers than two loops, and spills less.)
- backward dk/dv: one program per key block; loops over query blocks i >= j, recomputes s^T key-major
  (as FlashAttention's backward does: no register transposes, and Hopper wgmma tiles of 64 keys per warp
  group), accumulates dv += p^T do and dk += ds^T q. The bias-weight gradients need ds summed over heads,
  diagonal by diagonal (position) and bucket by bucket (time). By default dk/dv writes each pair's ds per
  head into a buffer laid out like its key-major bias buffer, and `_hstu_rab_grad_kernel` sums the heads of
  each pair once and then reduces, walking diagonal bands of square tiles (ds accumulated elementwise along a
  band, its diagonal sums taken once per band through a sheared `tl.gather`; per tile, masked bucket sums
  into a per-program histogram; a few relaxed atomics per band); a buffer too large for the memory budget
  holds as many heads as fit, and dk/dv runs once per group of heads. Done per head inside dk/dv's loop
  instead (the fallback when not even one head fits), these reductions took 57% of the fwd+bwd kernel time
  on an H200 (16 sequences of 2048-4096); the buffer path is not yet timed on a GPU. On Hopper, dk/dv on
  the buffer path can run as the warp-specialised Gluon kernel of `modules.hstu_attention_gluon` instead
  (`_DKDV_IMPL`); so can the forward (`_FWD_IMPL`).
- backward dq: by default from the ds buffer (`_DQ_SOURCE`): `_hstu_bwd_dq_ds_kernel` multiplies the ds
  that dk/dv stored by k, one program per query block looping over key blocks (no atomics). That is one
  product per pair and a 2-byte read per pair and head, against three products and the SiLU work to
  recompute ds (0.69 ms of a 3.3 ms fwd+bwd on an H200, 16 sequences of 2048-4096), and the backward needs
  no query-major bias buffer. With the bias weights frozen, dk/dv writes that buffer for dq alone. Without
  the buffer, a dq kernel shaped like the forward recomputes s and dp. Or (as FlashAttention-2/3 do) dk/dv
  adds each step's ds q-tile product to an fp32 dq with 16-byte relaxed atomics: no dq pass at all, at the
  cost of atomics traffic and a dq whose low bits vary with their order. `benchmarks/hstu_attention.py`
  times the three (only the recomputing one is timed so far).
The loops stream their large tiles (keys and values in the forward and dq, queries and output gradients in
dk/dv) with masked loads, or on sm_90+ through TMA descriptors of each sequence's rows (`_rows_source`: one
copy instruction a tile, no address arithmetic per thread); the autotuner tries both where the tensors'
alignment allows TMA.
Per (i, j) pair, the work besides the two products bounds the speed, so it is kept small: timestamps
travel as int32 offsets from each sequence's first one (int64 only past 68 years), the causal limit and
position index come from per-row values, 1/den and alpha scale the accumulators once, 16-bit inputs
take lg2 and tanh from one GPU instruction each (FAST_MATH), and SiLU works on hs = s / 2 (hence the halved
bias buffer): SiLU(s) = hs (1 + tanh(hs)) is one FFMA after the tanh, and 2 SiLU'(s) two FFMAs and an add
(`_dsilu2`; the 1/2 folds into scalings the kernels do anyway).
Import cost: triton + torch only (no fbgemm/torchrec), so the GPU machine can run it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime import _allocation

from modules.hstu_attention import TIME_BUCKET_DIVISOR, check_attention_shapes, same_tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET_BLOCK = 16
"""Block size under TRITON_INTERPRET=1 (CPU tests): small, so short sequences still span several blocks."""
_INTERPRET_DKDV_KEYS = 2 * _INTERPRET_BLOCK
"""Keys per dk/dv program under the interpreter: twice its query rows, so the tests cover unequal tiles."""
_TABLE_GATHER: bool | None = None
"""Pin the time-bias lookup (tests, the GPU check): None lets the GPU autotuner try both and the
interpreter use the global-memory one in the attention kernels; the bias-buffer fill gathers from its
table copy unless this is False."""
_RAB_TILES: bool | None = None
"""Pin where the bias comes from (tests, the GPU check): True, the precomputed bias buffer; False, computed
per pair and head in the attention kernels; None, the buffer on the GPU for each run of sequences that fits
`_RAB_MEMORY_FRACTION` of the device's memory (`_chunks`), per-pair computation under the interpreter."""
_TMA: bool | None = None
"""Pin how the attention kernels stream their loop's tiles (keys and values in the forward and dq, queries
and output gradients in dk/dv): True, through TMA tensor descriptors (sm_90+, 16-byte aligned tensors and
strides); False, plain masked loads; None, the GPU autotuner tries both where the device and tensors allow
TMA, and the interpreter uses plain loads."""
_DS_BUFFER: bool | None = None
"""Pin how dk/dv hands over ds (tests, the GPU check): True, it writes each pair's ds per head to a buffer
that `_hstu_rab_grad_kernel` reduces once over all heads into the bias-weight gradients, and that the dq
kernel reads (`_DQ_SOURCE`); False, no buffer: dk/dv reduces the bias gradients per head inside its loop
and dq is recomputed; None, the buffer on the GPU, for as many heads at a time as fit
`_RAB_MEMORY_FRACTION` (dk/dv then runs once per group of heads), no buffer under the interpreter."""
_DQ_SOURCE = "ds_buffer"
"""How the backward gets dq. "ds_buffer": dk/dv writes each pair's ds per head to the ds buffer (which the
bias-weight gradients read too; with the bias weights frozen it is written for dq alone), and
`_hstu_bwd_dq_ds_kernel` multiplies it by k: one product per pair instead of recomputing s, SiLU and dp; a
run without that buffer (no room, or `_DS_BUFFER` False) recomputes. "recompute": a dq kernel recomputes
ds from q, k, v and do (timed on an H200: 0.69 ms at 16 x 2048-4096, 350 TFLOP/s of its three products).
"atomic": dk/dv adds ds k to an fp32 dq with atomics, and no dq kernel runs. Only "recompute" is timed
so far; the GPU benchmark times all three."""
_DKDV_IMPL = "triton"
"""Which kernel computes dk/dv where the bias and ds buffers are in use. "triton": `_hstu_bwd_dkdv_kernel`.
"gluon": `modules.hstu_attention_gluon` (FlashAttention-3's warp specialisation, which Triton 3.6 cannot
apply to this loop) on the calls it can take (`hstu_attention_gluon.usable`: an sm_90 GPU, bf16/fp16, head
dims 64 or 128), the Triton kernel on the others. Not yet run on a GPU: the GPU check compares and times it
before it can become the default."""
_FWD_IMPL = "triton"
"""The same choice for the forward where the bias buffer is in use: "triton" (`_hstu_fwd_kernel`) or "gluon"
(`modules.hstu_attention_gluon`'s warp-specialised forward, on the calls it can take)."""
_RAB_MEMORY_FRACTION = 1 / 32
"""Largest share of the GPU's memory a transient bias or ds buffer may take (2.5 GB on an 80 GB H100: a batch
of 16 sequences of 4096 events needs 0.3 GB in bf16); larger batches run in runs of sequences that fit."""
_RAB_ALIGN = 64
"""Each row i of the bias buffer holds round_up(i + 1, _RAB_ALIGN) keys: a multiple of every key block, so
the kernels' unmasked tile loads stay inside their sequence, and of 16 bytes, so they are vectorised."""
_RAB_ROW_PAD = 8
"""A sequence's rows in the bias and ds buffers run to its length rounded up to this (16 bytes of bf16), so
the key-major layout's columns, which hold those rows' queries, are whole 16-byte vectors."""


def _patch_interpreter() -> None:
    """Two Triton 3.6 interpreter bugs our CPU tests hit; compiled (GPU) kernels are unaffected.

    - It calls int() on shape-(1,) numpy arrays, an error since NumPy 2.4, which breaks every
      `range(0, runtime_value)` loop: `__index__` takes the single element instead.
    - Its `tl.dot` multiplies bf16 operands as their raw uint16 bits: they are widened to fp32 first
      (exact: a bf16 is the top half of an fp32).
    """
    import numpy as np
    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor
    if getattr(original_patch, "_hstu_patched", False):
        return

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    patch_lang_tensor._hstu_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = create_dot


if _INTERPRET:
    _patch_interpreter()


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

_BUCKET_DIVISOR = tl.constexpr(TIME_BUCKET_DIVISOR)
_LOG2_TO_BUCKET = tl.constexpr(math.log(2.0) / TIME_BUCKET_DIVISOR)
_ALIGN = tl.constexpr(_RAB_ALIGN)
_ROW_PAD = tl.constexpr(_RAB_ROW_PAD)


@triton.jit
def _tanh(x, FAST_MATH: tl.constexpr):
    """tanh(x); FAST_MATH: the GPU's one-instruction tanh (16-bit inputs); else 2 sigmoid(2x) - 1."""
    if FAST_MATH:
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _dsilu2(hs, t):
    """2 SiLU'(s) at s = 2 hs, from t = tanh(hs): sigmoid(s) + s sigmoid(s) (1 - sigmoid(s)), with
    sigmoid(s) = (1 + t) / 2, is ((1 + hs) + t (1 - hs t)) / 2. Two FFMAs and an add; the kernels fold the
    1/2 into a scaling they do anyway (dq: its do tile, halved once; dk/dv: its outputs' scales)."""
    return t * (1.0 - hs * t) + (hs + 1.0)


@triton.jit
def _time_bucket(tq, tk, num_buckets, FAST_MATH: tl.constexpr):
    """bucket(|tq - tk|) as int32 (`_bucket_of`)."""
    return _bucket_of(tl.abs(tq - tk), num_buckets, FAST_MATH)


@triton.jit
def _bucket_of(dt, num_buckets, FAST_MATH: tl.constexpr):
    """The time bucket of gaps dt >= 0, as int32: non-decreasing in dt. FAST_MATH takes the logarithm from
    the GPU's one-instruction lg2, in its flush-to-zero form: dt >= 1 is never subnormal, and the plain
    form's subnormal handling cost three instructions per pair in the sm_90 SASS (12% of the bias fill's
    and of the ds reduction's loops)."""
    dt = tl.maximum(dt, 1).to(tl.float32)
    if FAST_MATH:
        lg2 = tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [dt], dtype=tl.float32, is_pure=True, pack=1
        )
        bucket = (lg2 * _LOG2_TO_BUCKET).to(tl.int32)
    else:
        bucket = (tl.log(dt) / _BUCKET_DIVISOR).to(tl.int32)
    return tl.minimum(bucket, num_buckets)  # dt >= 1, so bucket >= 0


@triton.jit
def _time_table(TIME_W, num_buckets, BLOCK_BUCKETS: tl.constexpr):
    """time_weights as an fp32 register tensor, zero-padded to BLOCK_BUCKETS; loaded once per program."""
    offs = tl.arange(0, BLOCK_BUCKETS)
    return tl.load(TIME_W + offs, mask=offs <= num_buckets, other=0.0).to(tl.float32)


@triton.jit
def _time_bias(TIME_W, time_table, bucket, TABLE_GATHER: tl.constexpr):
    """time_weights[bucket] in fp32, [BLOCK_M, BLOCK_N].

    TABLE_GATHER: looked up in the program's copy of the table (`tl.gather`, staged in shared memory);
    otherwise one global-memory gather per pair, which on an H100 made the forward L1-bound. The
    autotuner times both.
    """
    if TABLE_GATHER:
        flat = tl.reshape(bucket, [bucket.shape[0] * bucket.shape[1]])
        return tl.reshape(tl.gather(time_table, flat, 0), [bucket.shape[0], bucket.shape[1]])
    else:
        return tl.load(TIME_W + bucket).to(tl.float32)


@triton.jit
def _min_max(lo_a, hi_a, lo_b, hi_b):
    return tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b)


@triton.jit
def _inv_den(seq_len, DEN_IS_LEN: tl.constexpr, inv_den_const):
    """1 / the attention's denominator: the sequence's length, or the one given for all."""
    if DEN_IS_LEN:
        return 1.0 / tl.maximum(seq_len, 1).to(tl.float32)
    else:
        return inv_den_const


@triton.jit
def _seq_info(OFFSETS, b, DEN_IS_LEN: tl.constexpr, inv_den_const):
    seq_start = tl.load(OFFSETS + b).to(tl.int64)
    seq_len = (tl.load(OFFSETS + b + 1) - seq_start).to(tl.int32)
    return seq_start, seq_len, _inv_den(seq_len, DEN_IS_LEN, inv_den_const)


@triton.jit
def _load_query_times(TQ, seq_start, offs_m, seq_len):
    """tq_i, and the last position's for rows past the end (so they widen no bucket bounds). Needs
    seq_len >= 1."""
    return tl.load(TQ + seq_start + tl.minimum(offs_m, seq_len - 1))


@triton.jit
def _rows_source(
    X, seq_start, seq_len, h, stride_t, stride_h, D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Where a loop's streamed [rows, D] tiles of one head of one sequence come from (`_rows_tile`): with
    TMA, a tensor descriptor of exactly those rows (Hopper's tensor memory accelerator fills tiles past the
    sequence's end or past D with zeros, and copies each tile in one instruction); else the head's first
    row."""
    if TMA:
        return tl.make_tensor_descriptor(
            X + seq_start * stride_t + h * stride_h, shape=[seq_len, D], strides=[stride_t, 1],
            block_shape=[BLOCK_ROWS, BLOCK_D],
        )  # fmt: skip
    else:
        return X + seq_start * stride_t + h * stride_h


@triton.jit
def _rows_tile(
    src, r0, seq_len, stride_t, D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """Rows r0 .. r0 + BLOCK_ROWS of `_rows_source`'s src, zeros past the sequence's end and past D."""
    if TMA:
        return src.load([r0, 0])
    else:
        offs = r0 + tl.arange(0, BLOCK_ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        return tl.load(
            src + offs[:, None] * stride_t + offs_d[None, :],
            mask=(offs < seq_len)[:, None] & (offs_d < D)[None, :],
            other=0.0,
        )


@triton.jit
def _rab_row_start(i):
    """Offset of row i in its sequence's part of the bias buffer: sum of round_up(i' + 1, A) over i' < i."""
    i = i.to(tl.int64)
    full, part = i // _ALIGN, i % _ALIGN
    return (_ALIGN * _ALIGN // 2) * full * (full + 1) + _ALIGN * part * (full + 1)


@triton.jit
def _rab_start(rab_base, rows):
    """Buffer offsets of rows [M, 1] of the sequence whose rows start at rab_base (both multiples of 64)."""
    return tl.multiple_of(rab_base + _rab_row_start(rows), [_ALIGN, _ALIGN])


@triton.jit
def _rab_tile(RAB, rab_base, rows, keys):
    """Precomputed bias / 2 of rows x keys ([M, 1] x [1, N], within the sequence) from the query-major
    buffer, fp32. Unmasked (16-byte vectors): a block of at most 64 keys, starting at or before a row's last
    key, ends inside the row's allocation or in later rows of the same sequence, and entries past the
    diagonal are only ever masked out."""
    return tl.load(RAB + _rab_start(rab_base, rows) + keys).to(tl.float32)


@triton.jit
def _padded_rows(seq_len):
    """Rows of a sequence's part of the bias and ds buffers: its length rounded up to `_RAB_ROW_PAD`."""
    return (seq_len + _ROW_PAD - 1) // _ROW_PAD * _ROW_PAD


@triton.jit
def _rab_key_start(rab_base, keys, rows):
    """Key-major layout (the backward's dk/dv and ds reduction): entry (i, j) of the sequence whose part
    starts at rab_base, with `rows` padded rows, sits at this + i for keys j. Column j holds queries
    64 floor(j / 64) .. rows - 1, columns back to back: the same pairs as the query-major rows, transposed,
    so both layouts take the same space and share each sequence's start. Multiples of 8 (16 bytes)."""
    j = keys.to(tl.int64)
    full, part = j // _ALIGN, j % _ALIGN
    origin = j * rows - _ALIGN * full * ((_ALIGN // 2) * (full - 1) + part + 1)
    return tl.multiple_of(rab_base + origin, [_ROW_PAD, _ROW_PAD])


@triton.jit
def _rab_key_mask(keys, queries, rows, WIDE: tl.constexpr):
    """Entries of a key-major [N, 1] x [1, M] tile inside their columns: queries before the sequence's padded
    end (a bound that is a multiple of 8, so the mask is constant over 16-byte vectors). WIDE key blocks
    (> 64) also stop at the last column and, where a column starts after the block's first query (keys in
    its second 64), at the column's start."""
    mask = queries < rows
    if WIDE:
        mask = mask & (keys < (rows + _ALIGN - 1) // _ALIGN * _ALIGN) & (queries >= keys // _ALIGN * _ALIGN)
    return mask


@triton.jit
def _row_block(OFFSETS, BLOCK_R: tl.constexpr):
    """(sequence, its start and length, first row, rows) of a program in a (row blocks, sequences) grid.

    The last rows come first: they span the most keys, and started last they would run alone at the end.
    """
    b = tl.program_id(1)
    seq_start = tl.load(OFFSETS + b)
    seq_len = (tl.load(OFFSETS + b + 1) - seq_start).to(tl.int32)
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_R
    return b, seq_start, seq_len, m0, m0 + tl.arange(0, BLOCK_R)


@triton.jit
def _flat(x):
    """x as one dimension, in whatever element order its layout holds: for whole-tile reductions."""
    return tl.reshape(x, [x.numel], can_reorder=True)


@triton.jit
def _sum2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _add_diagonal_sums(DPOS, ds, diag0, max_seq_len, scale, SHEAR: tl.constexpr):
    """Adds the diagonal sums (j - i constant) of an [R, C] tile of ds (rows i, keys j; j - i = diag0 at
    its first row and key) to the position-bias gradient, times scale: a sheared `tl.gather` (SHEAR: a power
    of two >= R + C - 1), a reduction over the rows, and one relaxed atomic per diagonal."""
    R: tl.constexpr = ds.shape[0]
    C: tl.constexpr = ds.shape[1]
    src_col = tl.arange(0, SHEAR)[None, :] + tl.arange(0, R)[:, None] - (R - 1)  # key column of (i, t)
    in_band = (src_col >= 0) & (src_col < C)
    sheared = tl.gather(ds, tl.where(in_band, src_col, 0), axis=1)
    diag = tl.sum(tl.where(in_band, sheared, 0.0), axis=0) * scale  # [SHEAR]
    tt = tl.arange(0, SHEAR)
    pos_idx = diag0 + tt - (R - 1) + (max_seq_len - 1)
    pos_ok = (tt < R + C - 1) & (pos_idx >= 0) & (pos_idx < 2 * max_seq_len - 1)
    tl.atomic_add(DPOS + pos_idx, diag, mask=pos_ok & (diag != 0.0), sem="relaxed")


@triton.jit
def _bucket_bounds(tq, tk, num_buckets, FAST_MATH: tl.constexpr):
    """Bounds on the buckets of every (tq_i, tk_j) pair of a tile, from its query and key times (two short
    reductions, not one over the tile's buckets, whose other register layout made the compiler compute
    every bucket again): the bucket of the gap between their ranges (0 where they overlap), and that of
    their widest spread. Exact off the diagonal for sorted times, where queries' times follow keys'."""
    tq_lo, tq_hi = tl.reduce((_flat(tq), _flat(tq)), 0, _min_max)
    tk_lo, tk_hi = tl.reduce((_flat(tk), _flat(tk)), 0, _min_max)
    gap = tl.maximum(tl.maximum(tq_lo - tk_hi, tk_lo - tq_hi), 0)
    spread = tl.maximum(tq_hi - tk_lo, tk_hi - tq_lo)
    return _bucket_of(gap, num_buckets, FAST_MATH), _bucket_of(spread, num_buckets, FAST_MATH)


@triton.jit
def _time_grad_tile(ds, bucket, b_lo, b_hi, time_grad, BLOCK_BUCKETS: tl.constexpr):
    """Adds an [R, C] tile of ds to the program's time-bias histogram time_grad, per time bucket, and
    returns it; every pair's bucket lies in [b_lo, b_hi]. A tile within two buckets (most, away from the
    diagonal) takes one whole-tile reduction of (masked sum, total); wider ones, one more per four buckets
    past the first. All in the tile's own register layout, so the compiler computes its buckets once.
    Whole-tile reductions (`_flat`) move no per-row partials between threads, which halved these sums'
    instructions against reducing rows, then columns."""
    bucket_ids = tl.arange(0, BLOCK_BUCKETS)
    low, total = tl.reduce((_flat(tl.where(bucket == b_lo, ds, 0.0)), _flat(ds)), 0, _sum2)
    time_grad += tl.where(bucket_ids == b_lo, low, 0.0)
    if b_hi - b_lo <= 1:  # the rest is b_hi's (nothing, if b_hi is b_lo)
        time_grad += tl.where(bucket_ids == b_hi, total - low, 0.0)
    else:
        for bk in range(b_lo + 1, b_hi + 1, 4):  # four buckets per reduction, joined in registers
            part = tl.join(  # [R, C, 2, 2]: join adds a last axis, so [..., i, j] holds bucket bk + 2 i + j
                tl.join(tl.where(bucket == bk, ds, 0.0), tl.where(bucket == bk + 2, ds, 0.0)),
                tl.join(tl.where(bucket == bk + 1, ds, 0.0), tl.where(bucket == bk + 3, ds, 0.0)),
            )
            part = tl.sum(tl.reshape(part, [ds.numel, 4]), axis=0)  # [4]: buckets bk .. bk + 3
            ids = bk + tl.arange(0, 4)
            time_grad += tl.sum(tl.where(bucket_ids[None, :] == ids[:, None], part[:, None], 0.0), axis=0)
    return time_grad


@triton.jit
def _sum_heads(ptrs, head_stride, HEADS: tl.constexpr, mask):
    """The heads' ds tiles at ptrs, ptrs + head_stride, ..., summed in fp32; unrolled, so their loads are
    in flight together (the pointer advances a head at a time: no head * stride product to overflow)."""
    ds = tl.zeros(ptrs.shape, dtype=tl.float32)
    for _ in tl.static_range(HEADS):
        if mask is None:
            ds += tl.load(ptrs).to(tl.float32)
        else:
            ds += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += head_stride
    return ds


@triton.jit
def _add_time_grad(DTIME, time_grad, scale, num_buckets, BLOCK_BUCKETS: tl.constexpr):
    """A program's time-bias histogram into DTIME: one relaxed atomic per non-zero bucket."""
    ids = tl.arange(0, BLOCK_BUCKETS)
    tl.atomic_add(
        DTIME + ids, time_grad * scale, mask=(ids <= num_buckets) & (time_grad != 0.0), sem="relaxed"
    )


@triton.jit
def _hstu_rab_grad_kernel(
    DS, RAB_BASE, OFFSETS, TS, TQ, DPOS, DTIME, ds_head_stride, inv_den_const, max_seq_len, num_buckets,
    len_key,
    HEADS: tl.constexpr, DEN_IS_LEN: tl.constexpr, FAST_MATH: tl.constexpr, BLOCK_BUCKETS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Bias-weight gradients from the key-major ds buffer that dk/dv wrote per head (2 ds, its product
    operand: the 1/2 joins the 1/den scaling here). Each pair's heads are summed first, so the reductions
    (and the scaling) run once per pair, not once per head inside dk/dv.

    A program walks one diagonal band of its sequence: BLOCK x BLOCK tiles ([keys, queries], as stored)
    whose keys lie `band` blocks before their queries (band 0, the longest, holds the diagonal and runs
    first). Every tile of a band covers the same diagonals, so the position gradient accumulates ds
    elementwise and takes its diagonal sums once per band; the time-bias sums run per tile, as buckets
    change from tile to tile. Tiles off the diagonal and before the sequence's end load whole 16-byte
    vectors unmasked; the others load only their causal, real pairs.
    """
    tl.static_assert(_ALIGN % BLOCK == 0)  # keys up to each tile's last row stay in its rows' allocations
    band = tl.program_id(0)
    b = tl.program_id(1)
    seq_start = tl.load(OFFSETS + b)
    seq_len = (tl.load(OFFSETS + b + 1) - seq_start).to(tl.int32)
    first_row = band * BLOCK
    if first_row >= seq_len:
        return
    inv_den = _inv_den(seq_len, DEN_IS_LEN, inv_den_const)
    rab_base = tl.load(RAB_BASE + b)
    rows = _padded_rows(seq_len)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    time_grad = tl.zeros([BLOCK_BUCKETS], dtype=tl.float32)
    for m0 in range(first_row, seq_len, BLOCK):
        offs_m = m0 + tl.arange(0, BLOCK)
        offs_n = offs_m - first_row
        queries, keys = offs_m[None, :], offs_n[:, None]
        ptrs = DS + _rab_key_start(rab_base, keys, rows) + queries
        tq = _load_query_times(TQ, seq_start, offs_m, seq_len)
        tk = tl.load(TS + seq_start + tl.minimum(offs_n, seq_len - 1))  # keys past the end: the last one's
        bucket = _time_bucket(tq[None, :], tk[:, None], num_buckets, FAST_MATH)
        b_lo, b_hi = _bucket_bounds(tq, tk, num_buckets, FAST_MATH)
        if (first_row > 0) & (m0 + BLOCK <= seq_len):  # off the diagonal, before the end: all pairs real
            ds = _sum_heads(ptrs, ds_head_stride, HEADS, None)
        else:  # pairs past the diagonal or the end may hold anything, even NaN bits: not loaded
            ds = _sum_heads(ptrs, ds_head_stride, HEADS, (keys <= queries) & (queries < seq_len))
        time_grad = _time_grad_tile(ds, bucket, b_lo, b_hi, time_grad, BLOCK_BUCKETS)
        acc += ds
    # query-major for the diagonal sums (once per band); the buffer holds 2 ds
    _add_diagonal_sums(DPOS, tl.trans(acc), -first_row, max_seq_len, 0.5 * inv_den, 2 * BLOCK)
    _add_time_grad(DTIME, time_grad, 0.5 * inv_den, num_buckets, BLOCK_BUCKETS)


@triton.jit
def _hstu_rab_fill_kernel(
    RAB, RAB_KEYS, RAB_BASE, OFFSETS, TS, TQ, POS_W, TIME_W, max_seq_len, num_buckets, len_key,
    QUERY_MAJOR: tl.constexpr, KEY_MAJOR: tl.constexpr, FAST_MATH: tl.constexpr, BLOCK_BUCKETS: tl.constexpr,
    TABLE_GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    """Writes rab(i, j) / 2 (pos + time bias, halved for the kernels' SiLU in tanh(s / 2)) for j <= i, and
    zero past the diagonal and in the padding rows, over every row's allocation: to the query-major buffer
    RAB (forward and dq) and/or the key-major RAB_KEYS (dk/dv), from one computation.

    Shared by all heads and by the three attention kernels, so each pair's bucket and two table lookups are
    done once per call instead of once per head and kernel. TABLE_GATHER (the default) looks the time table
    up in the program's copy: per-pair global gathers made the inline forward 1.8x slower on an H200.
    """
    tl.static_assert((_ALIGN % BLOCK_R == 0) & (_ALIGN % BLOCK_C == 0))
    b, seq_start, seq_len, m0, offs_m = _row_block(OFFSETS, BLOCK_R)
    rows = _padded_rows(seq_len)
    if m0 >= rows:
        return
    in_rows = offs_m[:, None] < rows
    real = offs_m[:, None] < seq_len
    rab_base = tl.load(RAB_BASE + b)
    start = _rab_start(rab_base, offs_m[:, None])
    tq = _load_query_times(TQ, seq_start, offs_m, seq_len)[:, None]
    pos_row = (max_seq_len - 1) - offs_m[:, None]
    last_row = tl.minimum(m0 + BLOCK_R, rows) - 1
    time_table = _time_table(TIME_W, num_buckets, BLOCK_BUCKETS)
    # BLOCK_R divides the row padding, so the block's rows share one allocation length: the loop's bound
    # (and every key-major column the loop writes starts at or before the block's first row).
    # LOOP_STAGES = 2 prefetches the next step's timestamps and position weights while this one computes
    for n0 in tl.range(0, (last_row // _ALIGN + 1) * _ALIGN, BLOCK_C, num_stages=LOOP_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_C)
        mask_n = offs_n < seq_len
        tk = tl.load(TS + seq_start + offs_n, mask=mask_n, other=0)[None, :]
        bias = _time_bias(TIME_W, time_table, _time_bucket(tq, tk, num_buckets, FAST_MATH), TABLE_GATHER)
        pos_ptrs = POS_W + (pos_row + offs_n[None, :])
        if (n0 + BLOCK_C <= m0) & (m0 + BLOCK_R <= seq_len):  # keys before every row, and rows all real
            bias += tl.load(pos_ptrs)  # (a padding row past max_seq_len would index before the table)
        else:
            valid = (offs_n[None, :] <= offs_m[:, None]) & real
            bias = tl.where(valid, bias, 0.0) + tl.load(pos_ptrs, mask=valid, other=0.0)
        half = (0.5 * bias).to(RAB.dtype.element_ty)  # exact: a power-of-two scaling
        if QUERY_MAJOR:
            tl.store(RAB + start + offs_n[None, :], half, mask=in_rows)  # 16-byte vectors
        if KEY_MAJOR:  # 16-byte vectors along the rows (the mask is constant over 8 of them)
            keys_start = _rab_key_start(rab_base, offs_n[None, :], rows)
            tl.store(RAB_KEYS + keys_start + offs_m[:, None], half, mask=in_rows)


@triton.jit
def _half_bias(
    RAB, rab_base, last_key, TS, seq_start, offs_n, mask_n, valid, tq, pos_row, POS_W, TIME_W, time_table,
    num_buckets, FAST_MATH: tl.constexpr, TABLE_GATHER: tl.constexpr, RAB_TILES: tl.constexpr,
):  # fmt: skip
    """rab(i, j) / 2 of one [M, N] tile in fp32: from the bias buffer, or computed from the timestamps."""
    if RAB_TILES:
        return _rab_tile(RAB, rab_base, last_key, offs_n[None, :])
    else:
        tk = tl.load(TS + seq_start + offs_n, mask=mask_n, other=0)[None, :]
        bias = _time_bias(TIME_W, time_table, _time_bucket(tq, tk, num_buckets, FAST_MATH), TABLE_GATHER)
        return 0.5 * (
            bias + tl.load(POS_W + (pos_row + offs_n[None, :]), mask=valid, other=0.0).to(tl.float32)
        )


@triton.jit
def _hstu_fwd_kernel(
    Q, K, V, OUT, OFFSETS, TS, TQ, POS_W, TIME_W, RAB, RAB_BASE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    alpha, inv_den_const, max_seq_len, num_buckets, len_key,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DEN_IS_LEN: tl.constexpr, DOT_PREC: tl.constexpr, FAST_MATH: tl.constexpr, BLOCK_BUCKETS: tl.constexpr,
    RAB_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TABLE_GATHER: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)  # heads vary fastest: the H reads of a bias tile follow each other (L2 hits)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # longest work first
    b = tl.program_id(2)
    seq_start, seq_len, inv_den = _seq_info(OFFSETS, b, DEN_IS_LEN, inv_den_const)
    m0 = pid_m * BLOCK_M
    if m0 >= seq_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seq_len
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (seq_start + offs_m)[:, None]
    q = tl.load(
        Q + rows * stride_qt + h * stride_qh + offs_dqk[None, :],
        mask=mask_m[:, None] & (offs_dqk < DQK)[None, :],
        other=0.0,
    )
    last_key = tl.minimum(offs_m, seq_len - 1)[:, None]  # causal limit; rows past the end are never stored
    rab_base = tl.load(RAB_BASE + b)
    tq = _load_query_times(TQ, seq_start, offs_m, seq_len)[:, None]
    pos_row = (max_seq_len - 1) - last_key
    time_table = _time_table(TIME_W, num_buckets, BLOCK_BUCKETS)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_src = _rows_source(K, seq_start, seq_len, h, stride_kt, stride_kh, DQK, BLOCK_N, BLOCK_DQK, TMA)
    v_src = _rows_source(V, seq_start, seq_len, h, stride_vt, stride_vh, DV, BLOCK_N, BLOCK_DV, TMA)
    for n0 in range(0, tl.minimum(m0 + BLOCK_M, seq_len), BLOCK_N):
        offs_n = n0 + offs_n0
        mask_n = offs_n < seq_len
        k = _rows_tile(k_src, n0, seq_len, stride_kt, DQK, BLOCK_N, BLOCK_DQK, TMA)
        v = _rows_tile(v_src, n0, seq_len, stride_vt, DV, BLOCK_N, BLOCK_DV, TMA)
        valid = offs_n[None, :] <= last_key
        hs = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * (0.5 * alpha)  # hs = s / 2
        hs += _half_bias(RAB, rab_base, last_key, TS, seq_start, offs_n, mask_n, valid, tq, pos_row, POS_W,
                        TIME_W, time_table, num_buckets, FAST_MATH, TABLE_GATHER, RAB_TILES)  # fmt: skip
        p = hs * _tanh(hs, FAST_MATH) + hs  # SiLU(s) = s sigmoid(s) = hs (1 + tanh(hs))
        if n0 >= m0:  # only key blocks reaching the diagonal (or the sequence's end) need the causal mask
            p = tl.where(valid, p, 0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    tl.store(
        OUT + rows * stride_ot + h * stride_oh + offs_dv[None, :],
        (acc * inv_den).to(OUT.dtype.element_ty),
        mask=mask_m[:, None] & (offs_dv < DV)[None, :],
    )


@triton.jit
def _hstu_bwd_dq_kernel(
    Q, K, V, DO, DQ, OFFSETS, TS, TQ, POS_W, TIME_W, RAB, RAB_BASE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    alpha, inv_den_const, max_seq_len, num_buckets, len_key,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DEN_IS_LEN: tl.constexpr, DOT_PREC: tl.constexpr, FAST_MATH: tl.constexpr, BLOCK_BUCKETS: tl.constexpr,
    RAB_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TABLE_GATHER: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    seq_start, seq_len, inv_den = _seq_info(OFFSETS, b, DEN_IS_LEN, inv_den_const)
    m0 = pid_m * BLOCK_M
    if m0 >= seq_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < seq_len
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (seq_start + offs_m)[:, None]
    q = tl.load(
        Q + rows * stride_qt + h * stride_qh + offs_dqk[None, :],
        mask=mask_m[:, None] & (offs_dqk < DQK)[None, :],
        other=0.0,
    )
    do = tl.load(
        DO + rows * stride_dot + h * stride_doh + offs_dv[None, :],
        mask=mask_m[:, None] & (offs_dv < DV)[None, :],
        other=0.0,
    )
    do_half = (do.to(tl.float32) * 0.5).to(do.dtype)  # exact; dp / 2 meets 2 SiLU'(s) (`_dsilu2`)
    last_key = tl.minimum(offs_m, seq_len - 1)[:, None]
    rab_base = tl.load(RAB_BASE + b)
    tq = _load_query_times(TQ, seq_start, offs_m, seq_len)[:, None]
    pos_row = (max_seq_len - 1) - last_key
    time_table = _time_table(TIME_W, num_buckets, BLOCK_BUCKETS)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_src = _rows_source(K, seq_start, seq_len, h, stride_kt, stride_kh, DQK, BLOCK_N, BLOCK_DQK, TMA)
    v_src = _rows_source(V, seq_start, seq_len, h, stride_vt, stride_vh, DV, BLOCK_N, BLOCK_DV, TMA)
    for n0 in range(0, tl.minimum(m0 + BLOCK_M, seq_len), BLOCK_N):
        offs_n = n0 + offs_n0
        mask_n = offs_n < seq_len
        k = _rows_tile(k_src, n0, seq_len, stride_kt, DQK, BLOCK_N, BLOCK_DQK, TMA)
        v = _rows_tile(v_src, n0, seq_len, stride_vt, DV, BLOCK_N, BLOCK_DV, TMA)
        valid = offs_n[None, :] <= last_key
        hs = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * (0.5 * alpha)
        hs += _half_bias(RAB, rab_base, last_key, TS, seq_start, offs_n, mask_n, valid, tq, pos_row, POS_W,
                        TIME_W, time_table, num_buckets, FAST_MATH, TABLE_GATHER, RAB_TILES)  # fmt: skip
        t = _tanh(hs, FAST_MATH)
        dp_half = tl.dot(do_half, tl.trans(v), input_precision=DOT_PREC)
        ds = dp_half * _dsilu2(hs, t)
        if n0 >= m0:  # as in the forward: earlier key blocks lie wholly before the block's first row
            ds = tl.where(valid, ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(
        DQ + rows * stride_dqt + h * stride_dqh + offs_dqk[None, :],
        (dq * (alpha * inv_den)).to(DQ.dtype.element_ty),
        mask=mask_m[:, None] & (offs_dqk < DQK)[None, :],
    )


@triton.jit
def _hstu_bwd_dq_ds_kernel(
    DS, K, DQ, OFFSETS, RAB_BASE, stride_kt, stride_kh, stride_dqt, stride_dqh,
    alpha, inv_den_const, len_key, ds_head_stride, head0,
    DQK: tl.constexpr, BLOCK_DQK: tl.constexpr, DEN_IS_LEN: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq = ds k from the key-major ds buffer that dk/dv wrote for a group of heads (2 ds, its product
    operand: the 1/2 joins the scaling at the end): one product per pair, where recomputing ds costs three
    (s, dp, dq) and the SiLU work. One program per query block, head and sequence; its loop reads [BLOCK_N
    keys, BLOCK_M queries] tiles as stored (each key's queries contiguous) and multiplies their transpose.

    Entries past the diagonal (and, in a column that starts after the block's first query, before it) were
    never written, so the key blocks that reach the diagonal load only causal pairs of real queries. So do
    all key blocks of the last query block: its rows past the sequence's padded end would read beyond each
    key's column (beyond the buffer, for its last sequence). The others load whole 16-byte vectors.
    """
    hh = tl.program_id(0)  # the head within the buffer's group
    h = head0 + hh
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # longest work first
    b = tl.program_id(2)
    seq_start, seq_len, inv_den = _seq_info(OFFSETS, b, DEN_IS_LEN, inv_den_const)
    m0 = pid_m * BLOCK_M
    if m0 >= seq_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    queries = offs_m[None, :]
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_n0 = tl.arange(0, BLOCK_N)
    rows = _padded_rows(seq_len)
    ds_head = DS + hh.to(tl.int64) * ds_head_stride
    rab_base = tl.load(RAB_BASE + b)
    k_src = _rows_source(K, seq_start, seq_len, h, stride_kt, stride_kh, DQK, BLOCK_N, BLOCK_DQK, False)
    k_cols = (offs_dqk < DQK)[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    # key blocks wholly before the block's first query, in a block that ends inside the sequence
    whole = m0 // BLOCK_N * BLOCK_N if m0 + BLOCK_M <= seq_len else 0
    for n0 in range(0, whole, BLOCK_N):
        keys = (n0 + offs_n0)[:, None]
        ds = tl.load(ds_head + _rab_key_start(rab_base, keys, rows) + queries)
        k = tl.load(k_src + keys * stride_kt + offs_dqk[None, :], mask=k_cols, other=0.0)  # rows all real
        dq += tl.dot(tl.trans(ds), k, input_precision=DOT_PREC)
    for n0 in range(whole, tl.minimum(m0 + BLOCK_M, seq_len), BLOCK_N):
        keys = (n0 + offs_n0)[:, None]
        causal = (keys <= queries) & (queries < seq_len)
        ds = tl.load(ds_head + _rab_key_start(rab_base, keys, rows) + queries, mask=causal, other=0.0)
        k = _rows_tile(k_src, n0, seq_len, stride_kt, DQK, BLOCK_N, BLOCK_DQK, False)
        dq += tl.dot(tl.trans(ds), k, input_precision=DOT_PREC)
    tl.store(
        DQ + (seq_start + offs_m)[:, None] * stride_dqt + h * stride_dqh + offs_dqk[None, :],
        (dq * (0.5 * alpha * inv_den)).to(DQ.dtype.element_ty),
        mask=(offs_m < seq_len)[:, None] & (offs_dqk < DQK)[None, :],
    )


@triton.jit
def _hstu_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_OUT, DQ, DPOS, DTIME, OFFSETS, TS, TQ, POS_W, TIME_W, RAB, RAB_BASE, DS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    alpha, inv_den_const, max_seq_len, num_buckets, len_key, ds_head_stride, head0,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DEN_IS_LEN: tl.constexpr, DOT_PREC: tl.constexpr, FAST_MATH: tl.constexpr, BLOCK_BUCKETS: tl.constexpr,
    RAB_TILES: tl.constexpr, RAB_GRAD: tl.constexpr, DS_STORE: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TABLE_GATHER: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """BLOCK_N keys per program, BLOCK_M (<= BLOCK_N) query rows per step of its loop.

    Key-major tiles ([BLOCK_N keys, BLOCK_M queries], s^T = k q^T), as in FlashAttention's backward: p^T
    and ds^T are the left operands of dv += p^T do and dk += ds^T q as computed, with no transpose of a
    register tile in between, and every product's rows are the BLOCK_N keys (full Hopper wgmma tiles).
    The bias tiles it reads (RAB) and the ds tiles it writes (DS) are key-major in memory too (queries
    contiguous, `_rab_key_start`): the bias tile is then copied to shared memory asynchronously and read
    straight into the products' register layout, and ds leaves in one pass. Query-major buffers made every
    step transpose both through shared memory in chunks, 16 block-wide barriers per step at 64x128 in the
    sm_90 SASS (2 now), and kept the bias load out of the software pipeline.
    DQ_ATOMIC: also adds ds k (scaled) to the fp32 DQ of the step's query rows, with relaxed atomics (16-byte
    vectors on sm_90), so no dq kernel recomputes s and dp.
    """
    tl.static_assert(BLOCK_M <= BLOCK_N)
    h = head0 + tl.program_id(0)  # the launch covers heads head0 .. head0 + its grid's first dimension
    pid_n = tl.program_id(1)  # the first key blocks have the most query blocks: longest work first
    b = tl.program_id(2)
    seq_start, seq_len, inv_den = _seq_info(OFFSETS, b, DEN_IS_LEN, inv_den_const)
    n0 = pid_n * BLOCK_N
    if n0 >= seq_len:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < seq_len
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = (seq_start + offs_n)[:, None]
    k = tl.load(
        K + cols * stride_kt + h * stride_kh + offs_dqk[None, :],
        mask=mask_n[:, None] & (offs_dqk < DQK)[None, :],
        other=0.0,
    )
    v = tl.load(
        V + cols * stride_vt + h * stride_vh + offs_dv[None, :],
        mask=mask_n[:, None] & (offs_dv < DV)[None, :],
        other=0.0,
    )
    keys = offs_n[:, None]
    tk = tl.load(TS + seq_start + offs_n, mask=mask_n, other=0)[:, None]
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    time_table = _time_table(TIME_W, num_buckets, BLOCK_BUCKETS)
    time_grad = tl.zeros([BLOCK_BUCKETS], dtype=tl.float32)  # this key block's time-bias gradient
    ds_head = DS + tl.program_id(0).to(tl.int64) * ds_head_stride  # the buffer holds this launch's heads
    rab_base = tl.load(RAB_BASE + b)
    padded = _padded_rows(seq_len)
    keys_start = _rab_key_start(rab_base, keys, padded)
    q_src = _rows_source(Q, seq_start, seq_len, h, stride_qt, stride_qh, DQK, BLOCK_M, BLOCK_DQK, TMA)
    do_src = _rows_source(DO, seq_start, seq_len, h, stride_dot, stride_doh, DV, BLOCK_M, BLOCK_DV, TMA)
    for m0 in range(n0, seq_len, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seq_len
        rows = (seq_start + offs_m)[:, None]
        q = _rows_tile(q_src, m0, seq_len, stride_qt, DQK, BLOCK_M, BLOCK_DQK, TMA)
        do = _rows_tile(do_src, m0, seq_len, stride_dot, DV, BLOCK_M, BLOCK_DV, TMA)
        tq = _load_query_times(TQ, seq_start, offs_m, seq_len)[None, :]
        # Causal only: keys past the end lie past every real row, and rows past the end have q = do = 0, so
        # their p and ds add nothing to dk and dv (their ds, zero, is stored up to the padded rows)
        valid = keys <= offs_m[None, :]  # [BLOCK_N(j), BLOCK_M(i)]
        bucket = _time_bucket(tq, tk, num_buckets, FAST_MATH)  # compiled out with the buffer and no RAB_GRAD
        # the key-major bias and ds entries of the tile, each key's queries inside its own column (where a
        # column starts later than the block's first query, the mask keeps the column before it intact)
        in_cols = _rab_key_mask(keys, offs_m[None, :], padded, BLOCK_N > _ALIGN)
        if RAB_TILES:  # rows past the end (up to the padding) hold zeros; later ones are masked
            half_bias = tl.load(RAB + keys_start + offs_m[None, :], mask=in_cols, other=0.0).to(tl.float32)
        else:
            last_row = tl.minimum(offs_m, seq_len - 1)[None, :]
            pos = (max_seq_len - 1) - last_row + keys  # inside the table for keys before the end
            bias = tl.load(POS_W + pos, mask=valid & mask_n[:, None], other=0.0)
            half_bias = 0.5 * (bias.to(tl.float32) + _time_bias(TIME_W, time_table, bucket, TABLE_GATHER))
        hs = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * (0.5 * alpha) + half_bias  # hs = s / 2
        t = _tanh(hs, FAST_MATH)
        p = hs * t + hs  # SiLU(s) = hs (1 + tanh(hs))
        dsilu2 = _dsilu2(hs, t)  # 2 SiLU'(s), so that hs and t die before dp is computed
        if m0 < n0 + BLOCK_N:  # only the first query blocks reach the diagonal; later ones lie wholly after
            p = tl.where(valid, p, 0.0)
            dsilu2 = tl.where(valid, dsilu2, 0.0)  # so ds is zero there too (dp is finite)
        dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PREC)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds = dp * dsilu2  # 2 ds: each of its uses below takes the 1/2 with its own scaling, for free
        ds_in = ds.to(q.dtype)
        dk += tl.dot(ds_in, q, input_precision=DOT_PREC)
        if DQ_ATOMIC:  # other key blocks add to the same rows: the order of the adds varies from run to run
            dq = tl.dot(tl.trans(ds_in), k, input_precision=DOT_PREC) * (0.5 * alpha * inv_den)
            tl.atomic_add(
                DQ + rows * stride_dqt + h * stride_dqh + offs_dqk[None, :], dq,
                mask=mask_m[:, None] & (offs_dqk < DQK)[None, :], sem="relaxed",
            )  # fmt: skip
        if DS_STORE:  # the product's operand, for _hstu_rab_grad_kernel (all heads) and the dq kernel
            tl.store(ds_head + keys_start + offs_m[None, :], ds_in, mask=in_cols)  # 16-byte vectors
        elif RAB_GRAD:  # the fallback: the tile reduced per head, query-major
            ds_rows = tl.trans(ds)
            _add_diagonal_sums(DPOS, ds_rows, n0 - m0, max_seq_len, 0.5 * inv_den, 2 * BLOCK_N)
            b_lo, b_hi = _bucket_bounds(tq, tk, num_buckets, FAST_MATH)
            time_grad = _time_grad_tile(ds_rows, tl.trans(bucket), b_lo, b_hi, time_grad, BLOCK_BUCKETS)
    if RAB_GRAD and not DS_STORE:
        _add_time_grad(DTIME, time_grad, 0.5 * inv_den, num_buckets, BLOCK_BUCKETS)
    tl.store(
        DK + cols * stride_dkt + h * stride_dkh + offs_dqk[None, :],
        (dk * (0.5 * alpha * inv_den)).to(DK.dtype.element_ty),
        mask=mask_n[:, None] & (offs_dqk < DQK)[None, :],
    )
    tl.store(
        DV_OUT + cols * stride_dvt + h * stride_dvh + offs_dv[None, :],
        (dv * inv_den).to(DV_OUT.dtype.element_ty),
        mask=mask_n[:, None] & (offs_dv < DV)[None, :],
    )


# --------------------------------------------------------------------------------------------------
# Launch configuration: autotuned on the GPU, fixed small blocks under the interpreter.
# --------------------------------------------------------------------------------------------------


def _attention_config(
    block_m: int, block_n: int, warps: int, stages: int, *, table_gather: bool = False, tma: bool = False
) -> triton.Config:
    """An attention kernel's autotune config: its tile, how it looks the time bias up without the bias
    buffer (`_time_bias`), and whether it streams its loop's tiles through TMA (`_rows_source`)."""
    kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "TABLE_GATHER": table_gather, "TMA": tma}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


# Every config below compiles for sm_90 within H100 shared memory at Dqk = Dv = 128, and with the bias
# buffer spills at most 0.2 KB per thread without dq atomics, 1.3 KB with (benchmarks/triton_compile.py);
# 128x128 forward tiles overflow shared memory. dk/dv tiles are BLOCK_M query rows x BLOCK_N keys. Its
# products run on Hopper's wgmma when the keys give each warpgroup 64 rows (BLOCK_N >= 64 * warpgroups);
# 32x32 tiles fall back to Ampere's mma.sync, and were the fastest dk/dv on an H200 while it was
# query-major (its products then had BLOCK_M rows). A product that feeds another (s -> p -> dv, as in
# FlashAttention) gets one 16-row slice per warp, so its rows (BLOCK_M in the forward and dq, BLOCK_N in
# dk/dv) must be at least 16 x num_warps: with fewer, Triton 3.6 replicates the tile across warps, and
# 64-key dk/dv tiles at 8 warps computed s, dp and SiLU twice (triton_compile.py reports it). The
# key-major tiles, 64x128 (FlashAttention-3's dk/dv tile at d = 128) down to 16x64, are untimed on a GPU
# so far: the autotuner decides. Within a program, Triton 3.6 waits for each product before the SiLU work
# that reads it (a product issued a step early in the source is moved back next to its wait), and a
# 64x128 program's two warpgroups meet at its barriers every step, so they multiply and compute SiLU in
# step. Programs of one warpgroup that fit twice on an SM (4 warps, <= 255 registers, <= 113 KB of shared
# memory: dk/dv 64x64 at 2 stages and 32x64, forward and dq 64x64 at 2 stages and 64x32) run
# unsynchronised, so one's SiLU work can overlap the other's products (on an H200 the autotuner picked
# 4-warp tiles for every forward and dq launch). The TMA configs stream their tiles with one copy
# instruction each: with the bias buffer, 9.0-16.4 instructions per pair in the main loops against
# 10.5-19.0 with masked loads, and no spills at 64x64 dk/dv.
_FWD_CONFIGS = [
    _attention_config(128, 64, 8, 2),
    _attention_config(128, 64, 8, 2, tma=True),
    _attention_config(128, 32, 8, 3),
    _attention_config(64, 64, 4, 3),
    _attention_config(64, 64, 4, 2),
    _attention_config(64, 64, 4, 2, tma=True),
    _attention_config(64, 32, 4, 3),
    _attention_config(64, 32, 4, 3, tma=True),
    _attention_config(64, 64, 4, 2, table_gather=True),
    _attention_config(64, 32, 4, 3, table_gather=True),
]
_DKDV_CONFIGS = [
    _attention_config(64, 128, 8, 2),
    _attention_config(64, 128, 8, 2, tma=True),
    _attention_config(32, 128, 8, 2),
    _attention_config(32, 128, 8, 3),
    _attention_config(64, 64, 4, 2),
    _attention_config(64, 64, 4, 2, tma=True),
    _attention_config(32, 64, 4, 3),
    _attention_config(16, 64, 4, 3),
    _attention_config(32, 32, 4, 3),
    _attention_config(32, 32, 4, 3, table_gather=True),
]
_KEY = ["len_key", "DQK", "DV", "DOT_PREC", "DEN_IS_LEN", "RAB_TILES"]
_FILL_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "BLOCK_C": _RAB_ALIGN, "LOOP_STAGES": 1}, num_warps=4),
    triton.Config({"BLOCK_R": 32, "BLOCK_C": _RAB_ALIGN, "LOOP_STAGES": 2}, num_warps=4),
    triton.Config({"BLOCK_R": 32, "BLOCK_C": _RAB_ALIGN, "LOOP_STAGES": 2}, num_warps=8),
    triton.Config({"BLOCK_R": 64, "BLOCK_C": _RAB_ALIGN, "LOOP_STAGES": 2}, num_warps=8),
    triton.Config({"BLOCK_R": 16, "BLOCK_C": _RAB_ALIGN, "LOOP_STAGES": 2}, num_warps=4),
]
"""The bias-buffer fill's configs: rows per program divide the rows' 64-key padding, 64 keys per step; with
or without its loop's loads pipelined (it has no products, so only `tl.range`'s stages pipeline it)."""
_RAB_GRAD_CONFIGS = [
    triton.Config({"BLOCK": 64}, num_warps=8),
    triton.Config({"BLOCK": 32}, num_warps=8),
    triton.Config({"BLOCK": 32}, num_warps=4),
    triton.Config({"BLOCK": 16}, num_warps=4),
]
"""The ds-buffer reduction's configs: square tiles (a diagonal band's tiles cover the same diagonals)."""
_DQ_DS_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2),
]
"""dq from the ds buffer: query rows x keys per step. One product per step against a ds tile read once from
memory, so it streams: a wgmma of 64 query rows per warpgroup, and the loads pipelined 2-3 steps ahead."""


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs that cannot differ or cannot pay off.

    With the bias buffer (RAB_TILES) the time-table lookup is not used, so TABLE_GATHER configs would only
    repeat the others. dk/dv reducing the bias gradients in its loop (the fallback without the ds buffer)
    spills 4 KB per thread at 64x64 tiles and 6-7 KB at 128-key blocks, so only tiles of up to 2048 pairs
    are tried there. fp32 inputs (exact "ieee" products) serve correctness checks, not speed: one small tile
    (the squarest of the smallest, with plain loads) is compiled, as large fp32 tiles spill heavily and take
    ptxas minutes each (benchmarks/triton_compile.py measures it).
    """
    if kwargs.get("RAB_TILES"):
        configs = [c for c in configs if not c.kwargs.get("TABLE_GATHER")]
    if kwargs.get("RAB_GRAD") and not kwargs.get("DS_STORE"):
        configs = [c for c in configs if math.prod(_tile(c)) <= 2048]
    if kwargs.get("DOT_PREC") != "ieee":
        return configs
    return [min(configs, key=lambda c: (c.kwargs.get("TABLE_GATHER", False), c.kwargs.get("TMA", False),
                                        *_squareness(c)))]  # fmt: skip


def _tile(config: triton.Config) -> list[int]:
    return [v for k, v in config.kwargs.items() if k.startswith("BLOCK")]


def _squareness(config: triton.Config) -> tuple[int, int]:
    """(area, longest side) of a config's tile: the smallest, then the squarest, sorts first."""
    tile = _tile(config)
    return math.prod(tile), max(tile)


def _lookup_configs(
    configs: list[triton.Config], table_gather: bool | None, tma: bool | None = None
) -> list[triton.Config]:
    """The configs whose time-bias lookup is `table_gather` and whose streaming is `tma` (None: any)."""
    return [
        c
        for c in configs
        if table_gather in (None, c.kwargs["TABLE_GATHER"]) and tma in (None, c.kwargs["TMA"])
    ]


def _kernels(*streamed: Tensor):
    """(fwd, dq, dkdv) launchers for a call on these tensors: the raw kernels under the interpreter,
    autotuned ones on the GPU (with the TMA configs where `_tma_usable`)."""
    if _INTERPRET:
        return _hstu_fwd_kernel, _hstu_bwd_dq_kernel, _hstu_bwd_dkdv_kernel
    usable = _tma_usable(*streamed)
    if _TMA and not usable:
        raise ValueError(
            "triton_hstu_attention: _TMA pins TMA streaming, which needs an sm_90+ GPU and q, k, v, grad "
            "with 16-byte aligned data and token/head strides"
        )
    return _autotuned_kernels(_TABLE_GATHER, _TMA if usable else False)


def _tma_usable(*tensors: Tensor) -> bool:
    """Whether TMA descriptors can stream these tensors' rows: an sm_90+ GPU, and `_tma_aligned` tensors."""
    if _TMA is False or not all(t.is_cuda for t in tensors):
        return False
    return torch.cuda.get_device_capability(tensors[0].device) >= (9, 0) and all(map(_tma_aligned, tensors))


def _tma_aligned(x: Tensor) -> bool:
    """Whether every head's rows of a [T, H, D] tensor suit a TMA descriptor: contiguous rows, each head's
    first row on 16 bytes (aligned data and head stride), and a token stride of whole 16 bytes."""
    return (
        x.stride(2) == 1
        and x.data_ptr() % 16 == 0
        and all(stride * x.element_size() % 16 == 0 for stride in x.stride()[:2])
    )


@contextlib.contextmanager
def _descriptor_scratch(device: torch.device):
    """Lets the kernels build TMA descriptors on the device: Triton then asks for a little global memory
    per launch (128 bytes a descriptor and program), from the allocator set by `triton.set_allocator`.
    Where the caller has set none, a torch allocation on the inputs' device (and the current stream, which
    the launches use) serves our launches only."""
    if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(
        lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)
    )
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _buffer_kernels():
    """(bias fill, ds reduction, dq from ds) launchers: the kernels that fill or read the bias and ds
    buffers; raw under the interpreter, autotuned on the GPU."""
    if _INTERPRET:
        return _hstu_rab_fill_kernel, _hstu_rab_grad_kernel, _hstu_bwd_dq_ds_kernel
    return _autotuned_buffer_kernels()


@functools.cache
def _autotuned_buffer_kernels():
    fill = triton.autotune(_FILL_CONFIGS, key=["len_key", "TABLE_GATHER"])(_hstu_rab_fill_kernel)
    rab_grad = triton.autotune(
        _RAB_GRAD_CONFIGS, key=["len_key", "DEN_IS_LEN"], reset_to_zero=["DPOS", "DTIME"]
    )(_hstu_rab_grad_kernel)
    dq_ds = triton.autotune(
        _DQ_DS_CONFIGS, key=["len_key", "DQK", "DOT_PREC", "DEN_IS_LEN"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_hstu_bwd_dq_ds_kernel)  # fmt: skip
    return fill, rab_grad, dq_ds


@functools.cache
def _autotuned_kernels(table_gather: bool | None, tma: bool | None):
    """Autotuned launchers over the configs whose time-bias lookup is `table_gather` and whose streaming
    is `tma` (None: any). Calls whose tensors cannot take TMA get launchers without its configs (`False`),
    as the autotuner's cache would otherwise serve them a TMA config tuned on other tensors."""
    prune = {"early_config_prune": _prune_configs}
    fwd_configs = _lookup_configs(_FWD_CONFIGS, table_gather, tma)
    fwd = triton.autotune(fwd_configs, key=_KEY, prune_configs_by=prune)(_hstu_fwd_kernel)
    dq = triton.autotune(fwd_configs, key=_KEY, prune_configs_by=prune)(_hstu_bwd_dq_kernel)
    dkdv = triton.autotune(
        _lookup_configs(_DKDV_CONFIGS, table_gather, tma),
        key=[*_KEY, "RAB_GRAD", "DS_STORE", "DQ_ATOMIC"],
        prune_configs_by=prune,
        reset_to_zero=["DPOS", "DTIME"],
        restore_value=["DQ"],  # it holds earlier runs' and head groups' dq: each trial config adds to a copy
    )(_hstu_bwd_dkdv_kernel)
    return fwd, dq, dkdv


def _grid(max_len: int, heads: int, num_seqs: int, block_name: str, interpret_block: int = _INTERPRET_BLOCK):
    """(heads, blocks, sequences): the heads of one block run side by side and share its bias tiles in L2."""
    if _INTERPRET:
        return (heads, triton.cdiv(max_len, interpret_block), num_seqs)
    return lambda meta: (heads, triton.cdiv(max_len, meta[block_name]), num_seqs)


def _row_grid(max_len: int, num_seqs: int, block_name: str):
    """(row blocks, sequences): the bias fill's grid, and the ds reduction's (a band per block of rows)."""
    if _INTERPRET:
        return (triton.cdiv(max_len, _INTERPRET_BLOCK), num_seqs)
    return lambda meta: (triton.cdiv(max_len, meta[block_name]), num_seqs)


def _blocks(*names: str, **sizes: int) -> dict:
    """Explicit block sizes under the interpreter (no autotuning there): _INTERPRET_BLOCK unless given."""
    if not _INTERPRET:
        return {}
    pins = {"TABLE_GATHER": bool(_TABLE_GATHER), "TMA": bool(_TMA)}
    return {**dict.fromkeys(names, _INTERPRET_BLOCK), **sizes, **pins}


def _fill_blocks() -> dict:
    """The fill's tiles under the interpreter: _INTERPRET_BLOCK rows, 64 keys, its loop as written."""
    return {"BLOCK_R": _INTERPRET_BLOCK, "BLOCK_C": _RAB_ALIGN, "LOOP_STAGES": 1} if _INTERPRET else {}


def _len_key(max_len: int) -> int:
    """Autotune bucket: the next power of two of the longest sequence."""
    return 1 << max(4, math.ceil(math.log2(max(max_len, 1))))


def _dims(dqk: int, dv: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(dqk)), max(16, triton.next_power_of_2(dv))


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass(frozen=True, eq=False)
class TritonPlan:
    """One jagged batch as the kernels see it, measured with one host sync (`plan_triton_attention`).

    It depends only on offsets, times and max_seq_len, so `HSTUEncoder` builds one per forward and
    every layer reuses it; a call without one builds its own, and with it a sync that stops the host from
    queueing the layers ahead of the GPU.
    """

    offsets: Tensor
    """The caller's [B+1] offsets, to check a reused plan against."""
    timestamps: Tensor
    """The caller's [T] timestamps, likewise."""
    query_times: Tensor
    """The caller's [T] query times, likewise."""
    max_seq_len: int
    kernel_offsets: Tensor
    """[B+1] int64, contiguous."""
    longest: int
    kernel_timestamps: Tensor
    """Each sequence's timestamps minus its first one: int32, or int64 where a span passes 2**31 s."""
    kernel_query_times: Tensor
    """Its query times minus the same, in the same dtype."""
    rab_base: Tensor
    """[B] int64: where each sequence's rows start in the bias buffer."""
    rab_ends: tuple[int, ...]
    """Where each sequence's rows end in the bias buffer (on the host: the batch is cut into runs of
    sequences whose buffers fit the memory budget without another sync)."""

    @property
    def rab_numel(self) -> int:
        """Elements of the bias buffer for the whole batch."""
        return self.rab_ends[-1] if self.rab_ends else 0

    def check(
        self,
        offsets: Tensor,
        timestamps: Tensor,
        query_times: Tensor,
        *,
        max_seq_len: int,
        num_time_buckets: int,
        backend: str,
    ) -> None:
        """Raise ValueError unless this plan was built for these inputs (any time-bucket count serves)."""
        if (backend, max_seq_len) != ("triton", self.max_seq_len):
            raise ValueError(
                f"hstu_attention: plan was built for (backend, max_seq_len)=('triton', {self.max_seq_len}), "
                f"called with {(backend, max_seq_len)}; build it with plan_attention(...) for this call"
            )
        for name, given, planned in (
            ("offsets", offsets, self.offsets),
            ("timestamps", timestamps, self.timestamps),
            ("query_times", query_times, self.query_times),
        ):
            if not same_tensor(given, planned):
                raise ValueError(
                    f"hstu_attention: plan was built for other {name}; build one per batch with "
                    "plan_attention(offsets, timestamps, query_times, ...)"
                )


def _padded_len(length):
    """A sequence's rows in the bias and ds buffers (`_padded_rows`): its length rounded up to 8."""
    return -(-length // _RAB_ROW_PAD) * _RAB_ROW_PAD


def _rab_numel(lengths: Tensor) -> Tensor:
    """Bias-buffer elements a sequence of each length takes: row i < `_padded_len` holds round_up(i + 1,
    _RAB_ALIGN) keys (the key-major layout holds the same pairs, transposed)."""
    rows = _padded_len(lengths)
    full, part = rows // _RAB_ALIGN, rows % _RAB_ALIGN
    return _RAB_ALIGN * _RAB_ALIGN * full * (full + 1) // 2 + _RAB_ALIGN * part * (full + 1)


def _require_cuda(x: Tensor) -> None:
    if not _INTERPRET and x.device.type != "cuda":
        raise ValueError(
            "triton_hstu_attention: needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
            f"imported, for CPU tests); got device {x.device}. Use backend='jagged' on CPU."
        )


def plan_triton_attention(
    offsets: Tensor, timestamps: Tensor, query_times: Tensor, *, max_seq_len: int
) -> TritonPlan:
    """Validate offsets [B+1] against timestamps and query times [T] and measure the batch for the kernels
    (one sync)."""
    if (
        offsets.dim() != 1
        or offsets.numel() < 1
        or timestamps.dim() != 1
        or query_times.shape != timestamps.shape
    ):
        raise ValueError(
            f"triton_hstu_attention: offsets must be [B+1], timestamps and query_times [T], got "
            f"{tuple(offsets.shape)}, {tuple(timestamps.shape)} and {tuple(query_times.shape)}"
        )
    _require_cuda(offsets)
    total = timestamps.shape[0]
    kernel_offsets = offsets.to(torch.int64).contiguous()
    ts, tq = timestamps.to(torch.int64), query_times.to(torch.int64)
    plan = functools.partial(TritonPlan, offsets, timestamps, query_times, max_seq_len, kernel_offsets)
    if offsets.numel() == 1 or total == 0:
        no_rows = torch.zeros(offsets.numel() - 1, dtype=torch.int64, device=offsets.device)
        return plan(0, ts.contiguous(), tq.contiguous(), no_rows, (0,) * (offsets.numel() - 1))
    lengths = kernel_offsets[1:] - kernel_offsets[:-1]
    # Each sequence's timestamps relative to its first one: the kernels only take differences within a
    # sequence, and these offsets fit int32 (half the per-pair integer work) unless a user spans 68 years.
    first = ts[kernel_offsets[:-1].clamp(0, total - 1)]
    # each token's sequence, by search rather than repeat_interleave, so malformed offsets reach the check
    token_seq = torch.searchsorted(kernel_offsets[1:], torch.arange(total, device=ts.device), right=True)
    token_first = first[token_seq.clamp(max=first.numel() - 1)]
    rel, rel_q = ts - token_first, tq - token_first
    rab_sizes = _rab_numel(lengths.clamp(min=0))
    rab_ends = rab_sizes.cumsum(0)
    rel_min, rel_max = torch.minimum(rel.min(), rel_q.min()), torch.maximum(rel.max(), rel_q.max())
    stats = [lengths.max(), lengths.min(), kernel_offsets[0], kernel_offsets[-1], rel_min, rel_max]
    values = torch.cat([torch.stack(stats), rab_ends]).tolist()
    (longest, shortest, head, tail, rel_min, rel_max), host_rab_ends = values[:6], tuple(values[6:])
    if head != 0 or tail != total or shortest < 0:
        raise ValueError(
            f"triton_hstu_attention: offsets must start at 0, never decrease and end at T={total} (every "
            f"token in one sequence), got first offset {head}, last {tail}, shortest sequence {shortest}"
        )
    if longest > max_seq_len:
        raise ValueError(
            f"triton_hstu_attention: a sequence has {longest} tokens > max_seq_len={max_seq_len}"
        )
    dtype = torch.int32 if rel_max - rel_min < 2**31 else torch.int64
    return plan(int(longest), rel.to(dtype), rel_q.to(dtype), rab_ends - rab_sizes, host_rab_ends)


@dataclass(frozen=True)
class _Chunk:
    """A run of a batch's sequences that the kernels take in one launch, with one bias buffer."""

    offsets: Tensor
    """[n+1]: a view of the batch's kernel offsets (token positions stay global)."""
    rab_base: Tensor
    """[n] int64: where each sequence's rows start in this run's bias buffer."""
    rab_numel: int
    num_seqs: int


def _chunks(batch: TritonPlan, q: Tensor) -> list[_Chunk]:
    """The batch as runs of sequences whose bias buffers each fit the memory budget: one run when the whole
    batch fits; a sequence too long for the budget alone runs by itself (and computes its bias inline)."""
    budget, ends = _budget_numel(q), batch.rab_ends
    if batch.rab_numel <= budget:  # the common case, without a pass over the sequences
        return [_Chunk(batch.kernel_offsets, batch.rab_base, batch.rab_numel, len(ends))]
    bounds, first, base = [], 0, 0
    for b in range(1, len(ends)):
        if ends[b] - base > budget:
            bounds.append((first, b))
            first, base = b, ends[b - 1]
    bounds.append((first, len(ends)))
    chunks = []
    for first, last in bounds:
        base = ends[first - 1] if first else 0
        chunks.append(
            _Chunk(
                offsets=batch.kernel_offsets[first : last + 1],
                rab_base=batch.rab_base[first:last] - base,
                rab_numel=ends[last - 1] - base,
                num_seqs=last - first,
            )
        )
    return chunks


def _budget_numel(x: Tensor) -> int:
    """Elements of x's dtype that a transient buffer may take: `_RAB_MEMORY_FRACTION` of x's GPU memory
    (no limit under the interpreter, which has no GPU)."""
    if _INTERPRET:
        return sys.maxsize
    budget = torch.cuda.get_device_properties(x.device).total_memory * _RAB_MEMORY_FRACTION
    return int(budget) // x.element_size()


def _use_rab_tiles(chunk: _Chunk, q: Tensor) -> bool:
    """Precompute the run's bias buffer when it fits the memory budget (or as `_RAB_TILES` pins it)."""
    if _RAB_TILES is not None:
        return _RAB_TILES
    return not _INTERPRET and chunk.rab_numel <= _budget_numel(q)


def _ds_buffer_heads(chunk: _Chunk, q: Tensor) -> int:
    """How many heads' ds the buffer holds at a time: all of them, or as many as fit the memory budget;
    0 for no buffer (as `_DS_BUFFER` pins it, or no head fits)."""
    heads = q.shape[1]
    if _DS_BUFFER is not None:
        return heads if _DS_BUFFER else 0
    if _INTERPRET:
        return 0
    return min(heads, _budget_numel(q) // max(chunk.rab_numel, 1))


def _transient_buffer(
    numel: int, like: Tensor, what: str, pinned: bool | None, fallback: str
) -> Tensor | None:
    """An empty buffer of numel elements of like's dtype, or None where the GPU has no room for it: then the
    caller takes its slower path with a warning naming `fallback`, unless `pinned` makes that an error."""
    try:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    except torch.OutOfMemoryError:
        if pinned:
            raise
        gib = numel * like.element_size() / 2**30
        warnings.warn(
            f"triton_hstu_attention: no room for the {gib:.2f} GiB {what}; {fallback} for this call (slower, "
            "same result)",
            stacklevel=4,
        )
        return None


def _reduce_bias_grads(ds, batch: TritonPlan, chunk: _Chunk, dpos, dtime, heads: int, common: dict) -> None:
    """dpos, dtime += the bias-weight gradients held in a run's per-head ds buffer (`_hstu_rab_grad_kernel`);
    common: the attention kernels' named arguments (`_launch_args`)."""
    _, rab_grad, _ = _buffer_kernels()
    rab_grad[_row_grid(batch.longest, chunk.num_seqs, "BLOCK")](
        ds, chunk.rab_base, chunk.offsets, batch.kernel_timestamps, batch.kernel_query_times, dpos, dtime,
        chunk.rab_numel, common["inv_den_const"], common["max_seq_len"], dtime.numel() - 1, common["len_key"],
        HEADS=heads, DEN_IS_LEN=common["DEN_IS_LEN"], FAST_MATH=_fast_math(ds.dtype),
        BLOCK_BUCKETS=triton.next_power_of_2(dtime.numel()),
        **({"BLOCK": _INTERPRET_BLOCK} if _INTERPRET else {}),
    )  # fmt: skip


def _fill_rab(
    query_major: Tensor | None, key_major: Tensor | None, batch: TritonPlan, chunk: _Chunk, pos_w, time_w,
    max_seq_len: int,
) -> None:  # fmt: skip
    """Writes a run's bias buffers, either or both (one pass): rab(i, j) / 2 of every causal pair, shared by
    all heads, query-major (forward, dq) and key-major (dk/dv), in their dtype."""
    fill, _, _ = _buffer_kernels()
    some = query_major if query_major is not None else key_major  # the pointer a missing one passes
    fill[_row_grid(_padded_len(batch.longest), chunk.num_seqs, "BLOCK_R")](
        some, some if key_major is None else key_major, chunk.rab_base, chunk.offsets,
        batch.kernel_timestamps, batch.kernel_query_times, pos_w, time_w, max_seq_len, time_w.numel() - 1,
        _len_key(batch.longest),
        QUERY_MAJOR=query_major is not None, KEY_MAJOR=key_major is not None,
        FAST_MATH=_fast_math(some.dtype),
        BLOCK_BUCKETS=triton.next_power_of_2(time_w.numel()), TABLE_GATHER=_TABLE_GATHER is not False,
        **_fill_blocks(),
    )  # fmt: skip


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, offsets, pos_w, time_w, batch, max_seq_len, alpha, denominator):
        total, heads, _ = q.shape
        out = torch.empty(total, heads, v.shape[2], dtype=q.dtype, device=q.device)
        num_seqs = offsets.numel() - 1
        ctx.save_for_backward(q, k, v, offsets, pos_w, time_w)
        ctx.cfg = (batch, max_seq_len, alpha, denominator)
        if total == 0 or num_seqs == 0 or batch.longest == 0:
            return out.zero_()
        fwd, _, _ = _kernels(q, k, v)
        gluon = _gluon(_FWD_IMPL, q, k, v, out)
        with _descriptor_scratch(q.device):
            for chunk in _chunks(batch, q):
                rab, _, common = _launch_args(
                    q, v, batch, chunk, pos_w, time_w, max_seq_len, alpha, denominator, query_major=True
                )
                if gluon is not None and rab is not q:  # a run with the bias buffer (q: its placeholder)
                    gluon.forward(
                        q, k, v, out, chunk.offsets, rab, chunk.rab_base, alpha=common["alpha"],
                        inv_den_const=common["inv_den_const"], den_is_len=common["DEN_IS_LEN"],
                        longest=batch.longest,
                    )  # fmt: skip
                    continue
                fwd[_grid(batch.longest, heads, chunk.num_seqs, "BLOCK_M")](
                    q, k, v, out, chunk.offsets, batch.kernel_timestamps, batch.kernel_query_times, pos_w,
                    time_w, rab, chunk.rab_base, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                    v.stride(0), v.stride(1), out.stride(0), out.stride(1), **common,
                    **_blocks("BLOCK_M", "BLOCK_N"),
                )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, offsets, pos_w, time_w = ctx.saved_tensors
        batch, max_seq_len, alpha, denominator = ctx.cfg
        num_seqs = offsets.numel() - 1
        do = _last_dim_contiguous(grad_out.to(q.dtype))
        # no memsets: the kernels write every row of every head (the plan checks offsets cover all tokens)
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        dpos = torch.zeros(pos_w.numel(), dtype=torch.float32, device=q.device)
        dtime = torch.zeros(time_w.numel(), dtype=torch.float32, device=q.device)
        dq_acc = _dq_accumulator(dq)
        if q.shape[0] > 0 and num_seqs > 0 and batch.longest > 0:
            rab_grad = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
            with _descriptor_scratch(q.device):
                for chunk in _chunks(batch, q):
                    # Each run's bias gradients start from zero: the autotuner zeroes them when a run is
                    # the first to launch a kernel with its key (a run that computes its bias inline, say).
                    run_dpos, run_dtime = torch.zeros_like(dpos), torch.zeros_like(dtime)
                    _backward_run(
                        q, k, v, do, dq, dk, dv, dq_acc, run_dpos, run_dtime, pos_w, time_w, batch, chunk,
                        rab_grad, max_seq_len, alpha, denominator,
                    )  # fmt: skip
                    dpos += run_dpos
                    dtime += run_dtime
        if dq_acc is not None and dq_acc is not dq:
            dq.copy_(dq_acc)
        dpos_out = dpos.to(pos_w.dtype) if ctx.needs_input_grad[4] else None
        dtime_out = dtime.to(time_w.dtype) if ctx.needs_input_grad[5] else None
        return dq, dk, dv, None, dpos_out, dtime_out, None, None, None, None


def _gluon(impl: str, q: Tensor, k: Tensor, v: Tensor, x: Tensor):
    """`modules.hstu_attention_gluon` where a kernel's pin (`_FWD_IMPL`, `_DKDV_IMPL`: impl) asks for it and
    it can take the call (x: the output, or its gradient), else None."""
    if impl != "gluon" or _INTERPRET:
        return None
    from modules import hstu_attention_gluon

    return hstu_attention_gluon if hstu_attention_gluon.usable(q, k, v, x) is None else None


def _dq_accumulator(dq: Tensor) -> Tensor | None:
    """Where dk/dv adds dq up ("atomic" `_DQ_SOURCE`): in fp32, dq itself for fp32 inputs (None otherwise)."""
    if _DQ_SOURCE != "atomic":
        return None
    return (
        dq.zero_()
        if dq.dtype == torch.float32
        else torch.zeros(dq.shape, dtype=torch.float32, device=dq.device)
    )


def _backward_run(
    q, k, v, do, dq, dk, dv, dq_acc, dpos, dtime, pos_w, time_w, batch: TritonPlan, chunk: _Chunk,
    rab_grad: bool, max_seq_len, alpha, denominator,
) -> None:  # fmt: skip
    """The backward kernels on one run of sequences: dk/dv, writing each group of heads' ds to the ds
    buffer, then per group the bias-gradient reduction and dq from ds; without that buffer, dk/dv reduces
    the bias gradients itself and a dq kernel recomputes ds; given the fp32 dq_acc, dk/dv adds dq into it."""
    heads = q.shape[1]
    dq_from_ds = dq_acc is None and _DQ_SOURCE == "ds_buffer"
    group = _ds_buffer_heads(chunk, q) if rab_grad or dq_from_ds else 0
    ds = None
    if group:
        fallback = " and ".join(
            ["dk/dv reduces the bias gradients itself"] * rab_grad + ["dq is recomputed"] * dq_from_ds
        )
        ds = _transient_buffer(group * chunk.rab_numel, q, "ds buffer", _DS_BUFFER, fallback)
    if ds is None:
        group = heads
    dq_from_ds = dq_from_ds and ds is not None
    rab, rab_keys, common = _launch_args(
        q, v, batch, chunk, pos_w, time_w, max_seq_len, alpha, denominator,
        query_major=dq_acc is None and not dq_from_ds, key_major=True,
    )  # fmt: skip
    _, dq_kernel, dkdv_kernel = _kernels(q, k, v, do)
    _, _, dq_ds_kernel = _buffer_kernels()
    dq_out = dq[:0] if dq_acc is None else dq_acc  # an empty view: a pointer dk/dv never writes through
    # One dk/dv launch per group of heads whose ds the buffer holds, each followed by the kernels that read
    # it. Autotuning, which zeroes dpos and dtime, only happens at a key's first launch: the first group.
    gluon = (
        _gluon(_DKDV_IMPL, q, k, v, do) if rab_keys is not q and ds is not None and dq_acc is None else None
    )
    for head0 in range(0, heads, group):
        group_heads = min(group, heads - head0)
        if gluon is not None:
            gluon.dkdv(
                q, k, v, do, dk, dv, chunk.offsets, rab_keys, chunk.rab_base, ds, alpha=common["alpha"],
                inv_den_const=common["inv_den_const"], den_is_len=common["DEN_IS_LEN"],
                ds_head_stride=chunk.rab_numel, head0=head0, group_heads=group_heads, longest=batch.longest,
            )  # fmt: skip
        else:
            dkdv_kernel[_grid(batch.longest, group_heads, chunk.num_seqs, "BLOCK_N", _INTERPRET_DKDV_KEYS)](
                q, k, v, do, dk, dv, dq_out, dpos, dtime, chunk.offsets, batch.kernel_timestamps,
                batch.kernel_query_times, pos_w, time_w, rab_keys, chunk.rab_base,
                q if ds is None else ds,  # q: a placeholder, never read
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                dq_out.stride(0), dq_out.stride(1),
                **common, ds_head_stride=chunk.rab_numel, head0=head0, RAB_GRAD=rab_grad,
                DS_STORE=ds is not None, DQ_ATOMIC=dq_acc is not None,
                **_blocks("BLOCK_M", BLOCK_N=_INTERPRET_DKDV_KEYS),
            )  # fmt: skip
        if ds is not None and rab_grad:
            _reduce_bias_grads(ds, batch, chunk, dpos, dtime, group_heads, common)
        if dq_from_ds:
            dq_ds_kernel[_grid(batch.longest, group_heads, chunk.num_seqs, "BLOCK_M")](
                ds, k, dq, chunk.offsets, chunk.rab_base, k.stride(0), k.stride(1), dq.stride(0),
                dq.stride(1), common["alpha"], common["inv_den_const"], common["len_key"], chunk.rab_numel,
                head0,
                DQK=common["DQK"], BLOCK_DQK=common["BLOCK_DQK"], DEN_IS_LEN=common["DEN_IS_LEN"],
                DOT_PREC=common["DOT_PREC"],
                **({"BLOCK_M": _INTERPRET_BLOCK, "BLOCK_N": _INTERPRET_DKDV_KEYS} if _INTERPRET else {}),
            )  # fmt: skip
    if dq_acc is not None or dq_from_ds:
        return
    dq_kernel[_grid(batch.longest, heads, chunk.num_seqs, "BLOCK_M")](
        q, k, v, do, dq, chunk.offsets, batch.kernel_timestamps, batch.kernel_query_times, pos_w, time_w, rab,
        chunk.rab_base,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        **common, **_blocks("BLOCK_M", "BLOCK_N"),
    )  # fmt: skip


def _launch_args(
    q, v, batch: TritonPlan, chunk: _Chunk, pos_w, time_w, max_seq_len, alpha, denominator, *,
    query_major: bool, key_major: bool = False,
):  # fmt: skip
    """(the run's query-major bias buffer, its key-major one, the arguments every attention kernel takes by
    name); a buffer not asked for, or with no room (then neither is used), is a placeholder pointer.

    The buffers are filled per call (forward, then again in backward) rather than kept: they are quick to
    rebuild, and holding them per layer until backward would cost O(sum of squared lengths) memory each.
    """
    buffers = []
    if _use_rab_tiles(chunk, q):
        for _ in range(query_major + key_major):
            buffers.append(
                _transient_buffer(chunk.rab_numel, q, "bias buffer", _RAB_TILES, "computing the bias inline")
            )
            if buffers[-1] is None:
                buffers = []
                break
    tiles = bool(buffers)
    rab = buffers.pop(0) if tiles and query_major else None
    rab_keys = buffers.pop(0) if tiles and key_major else None
    if tiles:
        _fill_rab(rab, rab_keys, batch, chunk, pos_w, time_w, max_seq_len)
    block_dqk, block_dv = _dims(q.shape[2], v.shape[2])
    common = dict(
        alpha=float(alpha), inv_den_const=0.0 if denominator is None else 1.0 / float(denominator),
        max_seq_len=max_seq_len, num_buckets=time_w.numel() - 1, len_key=_len_key(batch.longest),
        DQK=q.shape[2], DV=v.shape[2], BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        DEN_IS_LEN=denominator is None, DOT_PREC=_dot_precision(q.dtype), FAST_MATH=_fast_math(q.dtype),
        BLOCK_BUCKETS=triton.next_power_of_2(time_w.numel()), RAB_TILES=tiles,
    )  # fmt: skip
    placeholder = lambda x: q if x is None else x  # noqa: E731  (q: a pointer the kernels never read)
    return placeholder(rab), placeholder(rab_keys), common


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (tests, reference checks); bf16/fp16 use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _fast_math(dtype: torch.dtype) -> bool:
    """One-instruction lg2/tanh for 16-bit inputs on the GPU: their error (~5e-4 relative at worst) sits
    below bf16/fp16 rounding. fp32 inputs and the CPU interpreter (no inline PTX) take the libdevice path."""
    return dtype != torch.float32 and not _INTERPRET


def triton_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    timestamps: Tensor,
    query_times: Tensor,
    pos_weights: Tensor,
    time_weights: Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    denominator: float | None,
    plan: TritonPlan | None = None,
) -> Tensor:
    """Fused HSTU attention; q, k: [T, H, Dqk], v: [T, H, Dv], offsets: [B+1] -> [T, H, Dv] in q's dtype.

    Differentiable in q, k, v, pos_weights and time_weights. Same arguments and math as
    `modules.hstu_attention.hstu_attention` (minus `backend`); `plan`: `plan_triton_attention(offsets,
    timestamps, query_times, max_seq_len=...)`, shared by the calls on one batch (None: built for this call).
    """
    check_attention_shapes(
        q, k, v, offsets, timestamps, query_times, pos_weights, time_weights, max_seq_len,
        who="triton_hstu_attention",
    )  # fmt: skip
    _require_cuda(q)
    if plan is None:
        plan = plan_triton_attention(offsets, timestamps, query_times, max_seq_len=max_seq_len)
    else:
        plan.check(
            offsets, timestamps, query_times, max_seq_len=max_seq_len, num_time_buckets=0, backend="triton"
        )
    k = _last_dim_contiguous(k.to(q.dtype))
    v = _last_dim_contiguous(v.to(q.dtype))
    q = _last_dim_contiguous(q)
    return _HSTUAttention.apply(
        q, k, v, plan.kernel_offsets, pos_weights.contiguous(), time_weights.contiguous(), plan, max_seq_len,
        alpha, denominator,
    )  # fmt: skip
