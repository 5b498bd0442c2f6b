"""Hopper (sm_90) dk/dv of the fused HSTU attention in Gluon, warp-specialised as in FlashAttention-3.

`modules.hstu_attention_triton`'s dk/dv kernel, in its GPU default mode (bias from the key-major bias buffer,
ds written to the ds buffer for the bias-weight gradients and dq), rewritten in Gluon, Triton's
explicit-layout dialect, because Triton 3.6 cannot warp-specialise that loop itself
(`benchmarks/triton_ws_probe.py`). One program = one head, one sequence, 128 keys, in three partitions:
- a loader warp streams each step's 64 query rows of q and do and the step's two 64 x 64 bias tiles into a
  two-stage shared-memory ring through TMA (one copy instruction a tile), and waits for free stages;
- two consumer warpgroups, one per 64-key group, each compute their s^T = k q^T and dp^T = v do^T on
  wgmma, the SiLU work, dv += p^T do and dk += ds^T q with p and ds as register operands, and send their ds
  tile to the ds buffer through shared memory and a TMA store.
The consumers share each stage's tiles but never wait for each other (they only each release the stage),
so one's SiLU work runs while the other's products are on the tensor cores; in the Triton kernel the two
warpgroups of a 128-key program meet at block-wide barriers every step. The loader's registers (24) go to
the consumers (240 each).

Every 64-key group of a sequence's key-major bias and ds buffers is one rectangle (64 columns of
rows - first key queries, back to back; `_rab_key_start`), so each is one TMA descriptor made on the device:
tiles past its end, or before its first query, are read as zeros and not written. Likewise q, do, k and v
use descriptors of their sequence's rows, so rows past its end are zeros and need no mask.

Only a GPU can run it (Gluon has no interpreter); `usable` says when a call can, and the backward uses it
when `modules.hstu_attention_triton._DKDV_IMPL` is "gluon". The CPU tests compile it for sm_90.
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
BLOCK_N = 2 * _RAB_ALIGN
"""Keys per program: two 64-key groups, one per consumer warpgroup."""
BLOCK_M = 64
"""Query rows per step."""
STAGES = 2
"""Depth of the shared-memory ring: 2 x 48 KB next to k and v (64 KB) and the ds tiles (32 KB) at d = 128."""
CONSUMER_REGS, LOADER_REGS, MAXNREG = 240, 24, 168
"""Registers per thread: a consumer's dk and dv accumulators alone take 128. 12 warps at MAXNREG fill the
register file; the loader keeps 24 and each consumer gets 240 (fewer spilled 44-140 bytes more, sm_90)."""
HEAD_DIMS = (64, 128)
"""Head dims it is built for (q, k and v alike): one wgmma N and one TMA tile per row of q, do, k, v."""


@gluon.jit
def _key_start(rab_base, key, rows):
    """Buffer offset of key `key`'s column (its first query) in a sequence's key-major bias/ds part:
    `modules.hstu_attention_triton._rab_key_start` for one key."""
    j = key.to(gl.int64)
    full = j // _GROUP
    part = j % _GROUP
    return rab_base + j * rows - _GROUP * full * ((_GROUP // 2) * (full - 1) + part + 1)


@gluon.jit
def _tanh(x):
    return gl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1
    )


@gluon.jit
def _group_rectangle(buffer, rab_base, rows, first_key, tile_layout: gl.constexpr):
    """TMA descriptor of the 64-key group starting at first_key: [64 keys, rows - first_key queries]."""
    length = rows - first_key
    return tma.make_tensor_descriptor(
        buffer + _key_start(rab_base, first_key, rows), [_GROUP, length], [length, 1], [_GROUP, _GROUP],
        tile_layout,
    )  # fmt: skip


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
    done (dp^T may still run); dv += p^T do issued, then ds from dp^T, dk += ds^T q issued, and the ds tile
    stored (two staging buffers, so a TMA store may still read the previous step's). Steps wholly before
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
            ds_op = gl.convert_layout(ds, operand)
            dk = warpgroup_mma(ds_op, q_s, dk, is_async=True)
            ds_buf = ds_bufs.index(step % 2)
            tma.store_wait(1)  # the store that last read this staging buffer is done
            ds_buf.store(ds)
            fence_async_shared()
            tma.async_copy_shared_to_global(ds_desc, [0, m0 - first_key], ds_buf)
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
    D: gl.constexpr, DEN_IS_LEN: gl.constexpr, BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """Grid (heads of the ds buffer's group, key blocks of 128, sequences): dk and dv of one key block, and
    its ds (2 ds, key-major) into the ds buffer, with the same arguments' meaning as the Triton dk/dv."""
    BLOCK_N: gl.constexpr = 2 * _GROUP
    hh = gl.program_id(0)
    h = head0 + hh
    n0 = gl.program_id(1) * BLOCK_N  # the first key blocks have the most steps: longest work first
    b = gl.program_id(2)
    seq_start = gl.load(OFFSETS + b).to(gl.int64)
    seq_len = (gl.load(OFFSETS + b + 1) - seq_start).to(gl.int32)
    if n0 >= seq_len:
        return
    inv_den = 1.0 / seq_len.to(gl.float32) if DEN_IS_LEN else inv_den_const
    rows = (seq_len + _ROW_PAD - 1) // _ROW_PAD * _ROW_PAD
    rab_base = gl.load(RAB_BASE + b)
    dtype: gl.constexpr = Q.dtype.element_ty
    row_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], dtype)
    key_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], dtype)
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_GROUP, _GROUP], dtype)
    q_desc = tma.make_tensor_descriptor(
        Q + seq_start * stride_qt + h * stride_qh, [seq_len, D], [stride_qt, 1], [BLOCK_M, D], row_layout
    )
    do_desc = tma.make_tensor_descriptor(
        DO + seq_start * stride_dot + h * stride_doh, [seq_len, D], [stride_dot, 1], [BLOCK_M, D], row_layout
    )
    k_desc = tma.make_tensor_descriptor(
        K + seq_start * stride_kt + h * stride_kh, [seq_len, D], [stride_kt, 1], [BLOCK_N, D], key_layout
    )
    v_desc = tma.make_tensor_descriptor(
        V + seq_start * stride_vt + h * stride_vh, [seq_len, D], [stride_vt, 1], [BLOCK_N, D], key_layout
    )
    # Group 1 of a sequence's last key block may start past its last column: its descriptors then name
    # group 0's rectangle (real memory, finite values), which its idle consumer never uses.
    first1 = gl.where(n0 + _GROUP < seq_len, n0 + _GROUP, n0)
    ds_head = DS + hh.to(gl.int64) * ds_head_stride
    bias0 = _group_rectangle(RAB, rab_base, rows, n0, tile_layout)
    bias1 = _group_rectangle(RAB, rab_base, rows, first1, tile_layout)
    ds0 = _group_rectangle(ds_head, rab_base, rows, n0, tile_layout)
    ds1 = _group_rectangle(ds_head, rab_base, rows, first1, tile_layout)

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


def usable(q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> str | None:
    """None when this kernel can take the call's dk/dv; else why not (the Triton kernel then does)."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"needs bf16 or fp16 inputs, not {q.dtype}"
    if not q.shape[2] == v.shape[2] in HEAD_DIMS:
        return f"needs head dims q = k = v in {HEAD_DIMS}, not {q.shape[2]} and {v.shape[2]}"
    if not all(map(_tma_aligned, (q, k, v, do))):
        return "needs q, k, v and grad rows on 16 bytes (TMA)"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "needs an sm_90 GPU (Hopper wgmma)"
    return None


def dkdv(
    q, k, v, do, dk, dv, offsets, rab_keys, rab_base, ds, *, alpha, inv_den_const, den_is_len,
    ds_head_stride, head0, group_heads, longest,
) -> None:  # fmt: skip
    """dk, dv of heads head0 .. head0 + group_heads - 1 and their ds into `ds` (see the module docstring);
    inside `hstu_attention_triton._descriptor_scratch` (the descriptors are made on the device)."""
    grid = (group_heads, triton.cdiv(longest, BLOCK_N), offsets.numel() - 1)
    _hstu_bwd_dkdv_gluon_kernel[grid](
        q, k, v, do, dk, dv, offsets, rab_keys, rab_base, ds,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
        do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        alpha, inv_den_const, ds_head_stride, head0,
        D=q.shape[2], DEN_IS_LEN=den_is_len, BLOCK_M=BLOCK_M, NUM_STAGES=STAGES,
        CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip
