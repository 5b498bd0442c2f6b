"""Hopper (sm_90) forward and dk/dv of the fused HSTU attention in Gluon, warp-specialised as in
FlashAttention-3.

`modules.hstu_attention_triton`'s forward and dk/dv kernels, in their GPU default mode (bias from the bias
buffer; dk/dv writing ds to the ds buffer for the bias-weight gradients and dq), rewritten in Gluon,
Triton's explicit-layout dialect, because Triton 3.6 cannot warp-specialise those loops itself
(`benchmarks/triton_ws_probe.py`). A program takes 128 rows (forward: queries; dk/dv: keys) of one head
and sequence, in three partitions:
- a loader warp streams each step's 64 rows of the other side (forward: k and v; dk/dv: q and do) and the
  step's two 64 x 64 bias tiles into a two-stage shared-memory ring through TMA (one copy instruction a
  tile), and waits on mbarriers for a free stage;
- two consumer warpgroups, one per 64-row group, compute their products on wgmma (forward: s = q k^T,
  acc += SiLU(s) v; dk/dv: s^T = k q^T, dp^T = v do^T, dv += p^T do, dk += ds^T q) with SiLU(s) and ds as
  register operands, and store their results through shared memory and TMA (dk/dv: its ds tile each step).
The consumers share each stage's tiles but never wait for each other (they only each release the stage),
so one's SiLU work runs while the other's products are on the tensor cores; in the Triton kernels the two
warpgroups of a 128-row program meet at block-wide barriers every step. The loader's registers (24) go to
the consumers (240 each).

Every 64-row group of a sequence's bias and ds buffers is one rectangle: in the query-major layout (the
forward's) each row of group G holds 64 (G + 1) keys, rows back to back; in the key-major one (dk/dv's)
each key's column holds the queries from its group's first one on, columns back to back
(`_rab_key_start`). So each is one TMA descriptor made on the device: tiles past its end read as zeros and
are not written. Likewise q, k, v, do and out use descriptors of their sequence's rows, so rows past its
end need no mask; the only mask is the causal one on the diagonal step.

Only a GPU can run these (Gluon has no interpreter); `usable` says when a call can, and the attention uses
them when `modules.hstu_attention_triton._FWD_IMPL` / `_DKDV_IMPL` is "gluon". The CPU tests compile them
for sm_90.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from modules.hstu_attention_triton import _RAB_ALIGN, _RAB_ROW_PAD, _tma_aligned

_GROUP = gl.constexpr(_RAB_ALIGN)
_ROW_PAD = gl.constexpr(_RAB_ROW_PAD)
PROGRAM_ROWS = 2 * _RAB_ALIGN
"""Rows per program (forward: queries; dk/dv: keys): two 64-row groups, one per consumer warpgroup. Each
step takes 64 rows of the other side: one group's worth."""
STAGES = 2
"""Depth of the shared-memory ring. At d = 128, dk/dv: 2 x 48 KB next to k and v (64 KB) and the ds tiles
(32 KB); forward: 2 x 48 KB next to q (32 KB) and the output tiles (32 KB)."""
CONSUMER_REGS, LOADER_REGS, MAXNREG = 240, 24, 168
"""Registers per thread: a consumer's dk and dv accumulators alone take 128. 12 warps at MAXNREG fill the
register file; the loader keeps 24 and each consumer gets 240 (fewer spilled 44-140 bytes more, sm_90)."""
HEAD_DIMS = (64, 128)
"""Head dims it is built for (q, k and v alike): one wgmma N and one TMA tile per row of q, do, k, v."""


@gluon.jit
def _key_group_start(rab_base, rows, group):
    """Offset of 64-key group `group`'s first entry (key and query 64 group) in a sequence's key-major
    bias/ds part: each group g before it holds 64 columns of rows - 64 g queries
    (`modules.hstu_attention_triton._rab_key_start`). Plain arithmetic (int64 in the kernels), so the tests
    run it on Python ints against the layout."""
    return rab_base + group * (_GROUP * rows - (_GROUP * _GROUP // 2) * (group - 1))


@gluon.jit
def _row_group_start(rab_base, group):
    """Offset of 64-row group `group`'s first row in a sequence's query-major bias part: each group g
    before it holds 64 rows of 64 (g + 1) keys (`modules.hstu_attention_triton._rab_row_start`)."""
    return rab_base + (_GROUP * _GROUP // 2) * group * (group + 1)


@gluon.jit
def _tanh(x):
    return gl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1
    )


@gluon.jit
def _sequence(OFFSETS, b, DEN_IS_LEN: gl.constexpr, inv_den_const):
    """(first token, length, 1 / the denominator, rows padded as in the bias buffers) of sequence b."""
    seq_start = gl.load(OFFSETS + b).to(gl.int64)
    seq_len = (gl.load(OFFSETS + b + 1) - seq_start).to(gl.int32)
    inv_den = 1.0 / gl.maximum(seq_len, 1).to(gl.float32) if DEN_IS_LEN else inv_den_const
    return seq_start, seq_len, inv_den, (seq_len + _ROW_PAD - 1) // _ROW_PAD * _ROW_PAD


@gluon.jit
def _rows(
    X, seq_start, seq_len, h, stride_t, stride_h, D: gl.constexpr, ROWS: gl.constexpr, layout: gl.constexpr
):
    """TMA descriptor of head h's rows of one sequence of a [T, H, D] tensor, ROWS rows a tile."""
    return tma.make_tensor_descriptor(
        X + seq_start * stride_t + h * stride_h, [seq_len, D], [stride_t, 1], [ROWS, D], layout
    )


@gluon.jit
def _key_group_rectangle(buffer, rab_base, rows, group, tile_layout: gl.constexpr):
    """TMA descriptor of 64-key group `group` of a sequence's key-major bias/ds part: [64 keys,
    rows - 64 group queries], columns back to back."""
    length = rows - _GROUP * group
    start = _key_group_start(rab_base, rows.to(gl.int64), group.to(gl.int64))
    return tma.make_tensor_descriptor(
        buffer + start, [_GROUP, length], [length, 1], [_GROUP, _GROUP], tile_layout
    )


@gluon.jit
def _loader(q_desc, do_desc, bias0, bias1, q_bufs, do_bufs, bias_bufs, ready, empty, n0, seq_len):
    """One warp: per step, q and do rows m0 .. m0 + 63 and both groups' bias tiles, into a free stage."""
    NUM_STAGES: gl.constexpr = q_bufs.type.shape[0]
    ROWS: gl.constexpr = q_bufs.type.shape[1]
    nbytes: gl.constexpr = 2 * q_desc.block_type.nbytes + 2 * bias0.block_type.nbytes
    for step in range(gl.cdiv(seq_len - n0, ROWS)):
        stage = step % NUM_STAGES
        mbarrier.wait(empty.index(stage), ((step // NUM_STAGES) & 1) ^ 1)  # fresh barriers pass phase 1
        m0 = n0 + step * ROWS
        bar = ready.index(stage)
        # TMA counts whole tiles, the zeros past a tensor's end included. Group 1 skips the first step (its
        # rows all come before its first key), so no tile starts before its rectangle.
        if step == 0:
            mbarrier.expect(bar, nbytes - bias1.block_type.nbytes)
        else:
            mbarrier.expect(bar, nbytes)
        tma.async_copy_global_to_shared(q_desc, [m0, 0], bar, q_bufs.index(stage))
        tma.async_copy_global_to_shared(do_desc, [m0, 0], bar, do_bufs.index(stage))
        tile = bias_bufs.index(stage)
        tma.async_copy_global_to_shared(bias0, [0, m0 - n0], bar, tile.slice(0, _GROUP))
        tma.async_copy_global_to_shared(
            bias1, [0, m0 - n0 - _GROUP], bar, tile.slice(_GROUP, _GROUP), pred=step > 0
        )


@gluon.jit
def _consumer(shared, ds_desc, ds_bufs, out, GROUP: gl.constexpr):
    """One warpgroup: dk and dv of the 64 keys of group GROUP (0 or 1) of the program's key block.

    Per step: s^T and dp^T issued together; the bias tile read while they run; SiLU work on s^T once it is
    done (dp^T may still run); dv += p^T do issued, then ds from dp^T, its tile stored (two staging buffers,
    so a TMA store may still read the previous step's), and dk += ds^T q issued. Steps wholly before
    the group's first key (the diagonal step of group 1, the only step it skips) only release their stage,
    so the steps that store alternate between the staging buffers.
    """
    k_smem, v_smem, q_bufs, do_bufs, bias_bufs, ready, empty = shared
    DK, DV_OUT, seq_start, seq_len, n0, h, stride_dkt, stride_dkh, stride_dvt, stride_dvh, alpha, inv_den = (
        out
    )
    NUM_STAGES: gl.constexpr = q_bufs.type.shape[0]
    ROWS: gl.constexpr = q_bufs.type.shape[1]
    D: gl.constexpr = q_bufs.type.shape[2]
    WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, ROWS, 16]
    )
    d_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, D, 16]
    )
    operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout, k_width=2)
    dtype: gl.constexpr = q_bufs.dtype
    first_key = n0 + GROUP * _GROUP
    keys = first_key + gl.arange(0, _GROUP, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
    k_mine = k_smem.slice(GROUP * _GROUP, _GROUP)
    v_mine = v_smem.slice(GROUP * _GROUP, _GROUP)
    zero = gl.zeros([_GROUP, ROWS], gl.float32, s_layout)
    dk = gl.zeros([_GROUP, D], gl.float32, d_layout)
    dv = gl.zeros([_GROUP, D], gl.float32, d_layout)
    active = first_key < seq_len  # group 1 of a sequence's last block may hold no key
    for step in range(gl.cdiv(seq_len - n0, ROWS)):
        stage = step % NUM_STAGES
        m0 = n0 + step * ROWS
        mbarrier.wait(ready.index(stage), (step // NUM_STAGES) & 1)
        if active & (m0 + ROWS > first_key):
            q_s = q_bufs.index(stage)
            do_s = do_bufs.index(stage)
            st = warpgroup_mma(k_mine, q_s.permute((1, 0)), zero, use_acc=False, is_async=True)
            dpt = warpgroup_mma(v_mine, do_s.permute((1, 0)), zero, use_acc=False, is_async=True)
            half_bias = bias_bufs.index(stage).slice(GROUP * _GROUP, _GROUP).load(s_layout).to(gl.float32)
            st = warpgroup_mma_wait(1, deps=[st])
            hs = st * (0.5 * alpha) + half_bias  # hs = s / 2, as in the Triton kernels
            t = _tanh(hs)
            p = hs * t + hs  # SiLU(s)
            dsilu2 = t * (1.0 - hs * t) + (hs + 1.0)  # 2 SiLU'(s)
            if m0 < first_key + _GROUP:  # the diagonal step: causal pairs only
                valid = keys[:, None] <= (m0 + cols)[None, :]
                p = gl.where(valid, p, 0.0)
                dsilu2 = gl.where(valid, dsilu2, 0.0)
            p_op = gl.convert_layout(p.to(dtype), operand)  # the product's register layout: no shuffle
            dv = warpgroup_mma(p_op, do_s, dv, is_async=True)
            dpt = warpgroup_mma_wait(1, deps=[dpt])
            ds = (dpt * dsilu2).to(dtype)  # 2 ds, as the Triton kernel stores it
            ds_buf = ds_bufs.index(step % 2)
            tma.store_wait(1)  # the store that last read this staging buffer is done
            ds_buf.store(ds)
            fence_async_shared()
            tma.async_copy_shared_to_global(ds_desc, [0, m0 - first_key], ds_buf)
            # issued after the store reads ds: registers feeding a running wgmma must not be touched
            ds_op = gl.convert_layout(ds, operand)
            dk = warpgroup_mma(ds_op, q_s, dk, is_async=True)
            dv, dk, _, _ = warpgroup_mma_wait(0, deps=[dv, dk, p_op, ds_op])  # operands live until done
        mbarrier.arrive(empty.index(stage), count=1)
    tma.store_wait(0)
    if active:
        offs_n = first_key + gl.arange(0, _GROUP, layout=gl.SliceLayout(1, d_layout))
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, d_layout))
        tokens = (seq_start + offs_n)[:, None]
        mask = (offs_n < seq_len)[:, None]
        gl.store(
            DK + tokens * stride_dkt + h * stride_dkh + offs_d[None, :],
            (dk * (0.5 * alpha * inv_den)).to(DK.dtype.element_ty), mask=mask,
        )  # fmt: skip
        gl.store(
            DV_OUT + tokens * stride_dvt + h * stride_dvh + offs_d[None, :],
            (dv * inv_den).to(DV_OUT.dtype.element_ty), mask=mask,
        )  # fmt: skip


@gluon.jit
def _hstu_bwd_dkdv_gluon_kernel(
    Q, K, V, DO, DK, DV_OUT, OFFSETS, RAB, RAB_BASE, DS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    alpha, inv_den_const, ds_head_stride, head0,
    D: gl.constexpr, DEN_IS_LEN: gl.constexpr, NUM_STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """Grid (heads of the ds buffer's group, key blocks of 128, sequences): dk and dv of one key block, and
    its ds (2 ds, key-major) into the ds buffer, with the same arguments' meaning as the Triton dk/dv."""
    BLOCK_N: gl.constexpr = 2 * _GROUP
    BLOCK_M: gl.constexpr = _GROUP  # query rows per step
    hh = gl.program_id(0)
    h = head0 + hh
    n0 = gl.program_id(1) * BLOCK_N  # the first key blocks have the most steps: longest work first
    b = gl.program_id(2)
    seq_start, seq_len, inv_den, rows = _sequence(OFFSETS, b, DEN_IS_LEN, inv_den_const)
    if n0 >= seq_len:
        return
    rab_base = gl.load(RAB_BASE + b)
    dtype: gl.constexpr = Q.dtype.element_ty
    row_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
    key_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_GROUP, _GROUP], dtype)
    q_desc = _rows(Q, seq_start, seq_len, h, stride_qt, stride_qh, D, BLOCK_M, row_layout)
    do_desc = _rows(DO, seq_start, seq_len, h, stride_dot, stride_doh, D, BLOCK_M, row_layout)
    k_desc = _rows(K, seq_start, seq_len, h, stride_kt, stride_kh, D, BLOCK_N, key_layout)
    v_desc = _rows(V, seq_start, seq_len, h, stride_vt, stride_vh, D, BLOCK_N, key_layout)
    # Group 1 of a sequence's last key block may start past its last column: its descriptors then name
    # group 0's rectangle (real memory, finite values), which its idle consumer never uses.
    group0 = n0 // _GROUP
    group1 = gl.where(n0 + _GROUP < seq_len, group0 + 1, group0)
    ds_head = DS + hh.to(gl.int64) * ds_head_stride
    bias0 = _key_group_rectangle(RAB, rab_base, rows, group0, tile_layout)
    bias1 = _key_group_rectangle(RAB, rab_base, rows, group1, tile_layout)
    ds0 = _key_group_rectangle(ds_head, rab_base, rows, group0, tile_layout)
    ds1 = _key_group_rectangle(ds_head, rab_base, rows, group1, tile_layout)

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], key_layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], key_layout)
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, D], row_layout)
    do_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, D], row_layout)
    bias_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, _GROUP], tile_layout)
    ds_bufs0 = gl.allocate_shared_memory(dtype, [2, _GROUP, _GROUP], tile_layout)
    ds_bufs1 = gl.allocate_shared_memory(dtype, [2, _GROUP, _GROUP], tile_layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
    mbarrier.init(kv_bar, count=1)
    fence_async_shared()
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [n0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [n0, 0], kv_bar, v_smem)
    mbarrier.wait(kv_bar, 0)

    shared = (k_smem, v_smem, q_bufs, do_bufs, bias_bufs, ready, empty)
    out = (
        DK,
        DV_OUT,
        seq_start,
        seq_len,
        n0,
        h,
        stride_dkt,
        stride_dkh,
        stride_dvt,
        stride_dvh,
        alpha,
        inv_den,
    )
    gl.warp_specialize(
        [
            (_consumer, (shared, ds0, ds_bufs0, out, 0)),
            (_consumer, (shared, ds1, ds_bufs1, out, 1)),
            (_loader, (q_desc, do_desc, bias0, bias1, q_bufs, do_bufs, bias_bufs, ready, empty, n0, seq_len)),
        ],
        [4, 1],
        [CONSUMER_REGS, LOADER_REGS],
    )


@gluon.jit
def _fwd_loader(k_desc, v_desc, bias0, bias1, k_bufs, v_bufs, bias_bufs, ready, empty, m0, seq_len, has1):
    """One warp: per step, keys n0 .. n0 + 63 of k and v and the two row groups' bias tiles, into a free
    stage. A group's tile is skipped where its consumer does not need it: row group 0 past its diagonal
    step, row group 1 when the block has no row there."""
    NUM_STAGES: gl.constexpr = k_bufs.type.shape[0]
    KEYS: gl.constexpr = k_bufs.type.shape[1]
    kv: gl.constexpr = 2 * k_desc.block_type.nbytes
    tile: gl.constexpr = bias0.block_type.nbytes
    for step in range(gl.cdiv(gl.minimum(m0 + 2 * _GROUP, seq_len), KEYS)):
        stage = step % NUM_STAGES
        mbarrier.wait(empty.index(stage), ((step // NUM_STAGES) & 1) ^ 1)
        n0 = step * KEYS
        bar = ready.index(stage)
        need0 = n0 < m0 + _GROUP
        tiles = need0.to(gl.int32) + has1.to(gl.int32)
        mbarrier.expect(bar, kv, pred=tiles == 0)  # exactly one expect: its bytes are a constant
        mbarrier.expect(bar, kv + tile, pred=tiles == 1)
        mbarrier.expect(bar, kv + 2 * tile, pred=tiles == 2)
        tma.async_copy_global_to_shared(k_desc, [n0, 0], bar, k_bufs.index(stage))
        tma.async_copy_global_to_shared(v_desc, [n0, 0], bar, v_bufs.index(stage))
        tiles_smem = bias_bufs.index(stage)
        tma.async_copy_global_to_shared(bias0, [0, n0], bar, tiles_smem.slice(0, _GROUP), pred=need0)
        tma.async_copy_global_to_shared(bias1, [0, n0], bar, tiles_smem.slice(_GROUP, _GROUP), pred=has1)


@gluon.jit
def _fwd_consumer(shared, out_desc, o_smem, m0, seq_len, alpha, inv_den, GROUP: gl.constexpr):
    """One warpgroup: out of the 64 rows of group GROUP of the program's 128: per step s = q k^T on wgmma,
    the SiLU with the bias tile, acc += SiLU(s) v with SiLU(s) as the register operand; the steps past its
    rows' last key only release their stage."""
    q_smem, k_bufs, v_bufs, bias_bufs, ready, empty = shared
    NUM_STAGES: gl.constexpr = k_bufs.type.shape[0]
    KEYS: gl.constexpr = k_bufs.type.shape[1]
    D: gl.constexpr = k_bufs.type.shape[2]
    WARPS: gl.constexpr = gl.num_warps()
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, KEYS, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, D, 16]
    )
    operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    first_row = m0 + GROUP * _GROUP
    rows = first_row + gl.arange(0, _GROUP, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, KEYS, layout=gl.SliceLayout(0, s_layout))
    q_mine = q_smem.slice(GROUP * _GROUP, _GROUP)
    zero = gl.zeros([_GROUP, KEYS], gl.float32, s_layout)
    acc = gl.zeros([_GROUP, D], gl.float32, o_layout)
    # its steps: keys up to its last row (none for group 1 of a block whose rows all lie in group 0)
    mine = gl.where(first_row < seq_len, gl.cdiv(gl.minimum(first_row + _GROUP, seq_len), KEYS), 0)
    for step in range(gl.cdiv(gl.minimum(m0 + 2 * _GROUP, seq_len), KEYS)):
        stage = step % NUM_STAGES
        mbarrier.wait(ready.index(stage), (step // NUM_STAGES) & 1)
        if step < mine:
            n0 = step * KEYS
            s = warpgroup_mma(q_mine, k_bufs.index(stage).permute((1, 0)), zero, use_acc=False, is_async=True)
            half_bias = bias_bufs.index(stage).slice(GROUP * _GROUP, _GROUP).load(s_layout).to(gl.float32)
            s = warpgroup_mma_wait(0, deps=[s])
            hs = s * (0.5 * alpha) + half_bias
            p = hs * _tanh(hs) + hs  # SiLU(s), s = 2 hs
            if n0 + KEYS > first_row:  # the diagonal step: causal pairs only
                p = gl.where((n0 + cols)[None, :] <= rows[:, None], p, 0.0)
            p_op = gl.convert_layout(p.to(q_smem.dtype), operand)
            acc = warpgroup_mma(p_op, v_bufs.index(stage), acc, is_async=True)
            acc, _ = warpgroup_mma_wait(0, deps=[acc, p_op])
        mbarrier.arrive(empty.index(stage), count=1)
    if mine > 0:  # rows past the sequence's end are clipped by the store
        o_smem.store((acc * inv_den).to(o_smem.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [first_row, 0], o_smem)
        tma.store_wait(0)


@gluon.jit
def _hstu_fwd_gluon_kernel(
    Q, K, V, OUT, OFFSETS, RAB, RAB_BASE,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    alpha, inv_den_const,
    D: gl.constexpr, DEN_IS_LEN: gl.constexpr, NUM_STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """Grid (heads, row blocks of 128, sequences): out of one row block, from the query-major bias buffer,
    whose 64-row groups are rectangles too (each row of group G holds 64 (G + 1) keys)."""
    BLOCK_M: gl.constexpr = 2 * _GROUP
    h = gl.program_id(0)
    m0 = (gl.num_programs(1) - 1 - gl.program_id(1)) * BLOCK_M  # the last rows span the most keys: first
    b = gl.program_id(2)
    seq_start, seq_len, inv_den, rows = _sequence(OFFSETS, b, DEN_IS_LEN, inv_den_const)
    if m0 >= seq_len:
        return
    rab_base = gl.load(RAB_BASE + b)
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_GROUP, D], dtype)
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_GROUP, _GROUP], dtype)
    q_desc = _rows(Q, seq_start, seq_len, h, stride_qt, stride_qh, D, BLOCK_M, q_layout)
    k_desc = _rows(K, seq_start, seq_len, h, stride_kt, stride_kh, D, _GROUP, kv_layout)
    v_desc = _rows(V, seq_start, seq_len, h, stride_vt, stride_vh, D, _GROUP, kv_layout)
    out_desc = _rows(OUT, seq_start, seq_len, h, stride_ot, stride_oh, D, _GROUP, kv_layout)
    # A 64-row group G of the query-major buffer: rows 64 G .. (padded end), 64 (G + 1) keys each, from
    # offset 2048 G (G + 1). Group 1 of a sequence's last block may have no row: its descriptor then names
    # group 0's rectangle, and nothing reads it.
    has1 = m0 + _GROUP < seq_len
    group0 = m0 // _GROUP
    group1 = gl.where(has1, group0 + 1, group0)
    bias0 = _row_group_rectangle(RAB, rab_base, rows, group0, tile_layout)
    bias1 = _row_group_rectangle(RAB, rab_base, rows, group1, tile_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, _GROUP, D], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, _GROUP, D], kv_layout)
    bias_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, _GROUP], tile_layout)
    o_smem0 = gl.allocate_shared_memory(dtype, [_GROUP, D], kv_layout)
    o_smem1 = gl.allocate_shared_memory(dtype, [_GROUP, D], kv_layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
    mbarrier.init(q_bar, count=1)
    fence_async_shared()
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [m0, 0], q_bar, q_smem)
    mbarrier.wait(q_bar, 0)

    shared = (q_smem, k_bufs, v_bufs, bias_bufs, ready, empty)
    gl.warp_specialize(
        [
            (_fwd_consumer, (shared, out_desc, o_smem0, m0, seq_len, alpha, inv_den, 0)),
            (_fwd_consumer, (shared, out_desc, o_smem1, m0, seq_len, alpha, inv_den, 1)),
            (
                _fwd_loader,
                (k_desc, v_desc, bias0, bias1, k_bufs, v_bufs, bias_bufs, ready, empty, m0, seq_len, has1),
            ),
        ],
        [4, 1],
        [CONSUMER_REGS, LOADER_REGS],
    )


@gluon.jit
def _row_group_rectangle(buffer, rab_base, rows, group, tile_layout: gl.constexpr):
    """TMA descriptor of 64-row group `group` of a sequence's query-major bias part:
    [min(64, rows - 64 group) rows, 64 (group + 1) keys], rows back to back."""
    width = _GROUP * (group + 1)
    height = gl.minimum(rows - _GROUP * group, _GROUP)
    start = _row_group_start(rab_base, group.to(gl.int64))
    return tma.make_tensor_descriptor(
        buffer + start, [height, width], [width, 1], [_GROUP, _GROUP], tile_layout
    )


def usable(q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> str | None:
    """None when these kernels can take a call (x: its output, or the output's gradient); else why not (the
    Triton kernels then do)."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"needs bf16 or fp16 inputs, not {q.dtype}"
    if not q.shape[2] == v.shape[2] in HEAD_DIMS:
        return f"needs head dims q = k = v in {HEAD_DIMS}, not {q.shape[2]} and {v.shape[2]}"
    if not all(map(_tma_aligned, (q, k, v, x))):
        return "needs q, k, v and out (or its grad) rows on 16 bytes (TMA)"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "needs an sm_90 GPU (Hopper wgmma)"
    return None


def forward(q, k, v, out, offsets, rab, rab_base, *, alpha, inv_den_const, den_is_len, longest) -> None:
    """out of all heads from the query-major bias buffer `rab` (see `_hstu_fwd_gluon_kernel`); inside
    `hstu_attention_triton._descriptor_scratch` (the descriptors are made on the device)."""
    grid = (q.shape[1], triton.cdiv(longest, PROGRAM_ROWS), offsets.numel() - 1)
    _hstu_fwd_gluon_kernel[grid](
        q, k, v, out, offsets, rab, rab_base, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1), alpha, inv_den_const,
        D=q.shape[2], DEN_IS_LEN=den_is_len, NUM_STAGES=STAGES, CONSUMER_REGS=CONSUMER_REGS,
        LOADER_REGS=LOADER_REGS, num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip


def dkdv(
    q, k, v, do, dk, dv, offsets, rab_keys, rab_base, ds, *, alpha, inv_den_const, den_is_len,
    ds_head_stride, head0, group_heads, longest,
) -> None:  # fmt: skip
    """dk, dv of heads head0 .. head0 + group_heads - 1 and their ds into `ds` (see the module docstring);
    inside `hstu_attention_triton._descriptor_scratch` (the descriptors are made on the device)."""
    grid = (group_heads, triton.cdiv(longest, PROGRAM_ROWS), offsets.numel() - 1)
    _hstu_bwd_dkdv_gluon_kernel[grid](
        q, k, v, do, dk, dv, offsets, rab_keys, rab_base, ds,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
        do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        alpha, inv_den_const, ds_head_stride, head0,
        D=q.shape[2], DEN_IS_LEN=den_is_len, NUM_STAGES=STAGES,
        CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip
