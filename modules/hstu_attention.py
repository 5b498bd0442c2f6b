"""HSTU pointwise (SiLU) attention on jagged sequences, behind one interface with three backends.

out[i] = sum_{j <= i, same sequence} SiLU(alpha * <q_i, k_j> + rab(i, j)) / den * v_j
rab(i, j) = pos_weights[(j - i) + max_seq_len - 1] + time_weights[bucket(tq_i - t_j)]
tq_i is the timestamp of position i + 1 of the same sequence (t_i at its last position), the research
code's "next event time" convention; bucket(dt) = clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets).

Backends: `reference` pads the whole batch to its longest sequence with plain PyTorch (the test oracle);
`jagged` groups sequences of similar length, pads each group only to its own longest sequence with FBGEMM
jagged ops and skips key blocks above the causal diagonal, so it spends almost nothing on padding;
`triton` (GPU) lives in modules/hstu_attention_triton.py and is imported only when asked for.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.jagged import fbgemm_ops

Backend = Literal["reference", "jagged", "triton"]
TIME_BUCKET_DIVISOR = 0.301
"""ln(dt) / 0.301 (about log2 of the gap), as in the reference research code."""


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    timestamps: Tensor,
    pos_weights: Tensor,
    time_weights: Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    denominator: float | None,
    backend: Backend = "jagged",
) -> Tensor:
    """HSTU attention; q, k: [T, H, Dqk], v: [T, H, Dv], offsets: [B+1] int64 -> [T, H, Dv].

    Args:
        timestamps: [T] int64 seconds, chronological within each sequence.
        pos_weights: [2 * max_seq_len - 1] relative-position bias, shared by heads.
        time_weights: [num_time_buckets + 1] time-gap bias, shared by heads.
        denominator: divide SiLU scores by this constant (reference: max_seq_len), or None to divide
            by each sequence's own length.
    """
    if backend == "triton":
        from modules.hstu_attention_triton import triton_hstu_attention

        return triton_hstu_attention(
            q,
            k,
            v,
            offsets,
            timestamps,
            pos_weights,
            time_weights,
            max_seq_len=max_seq_len,
            alpha=alpha,
            denominator=denominator,
        )
    _check_inputs(q, k, v, offsets, timestamps, pos_weights, time_weights, max_seq_len)
    if backend == "reference":
        return _reference_attention(
            q, k, v, offsets, timestamps, pos_weights, time_weights, max_seq_len, alpha, denominator
        )
    if backend == "jagged":
        return _jagged_attention(
            q, k, v, offsets, timestamps, pos_weights, time_weights, max_seq_len, alpha, denominator
        )
    raise ValueError(f"hstu_attention: unknown backend {backend!r}; use 'reference', 'jagged' or 'triton'")


def time_bucket_formula(dt: Tensor, num_buckets: int) -> Tensor:
    """Log-bucketed time gap: clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets), int64."""
    x = torch.log(dt.abs().clamp(min=1).to(torch.float32)) / TIME_BUCKET_DIVISOR
    return x.long().clamp(0, num_buckets)


@functools.lru_cache(maxsize=8)
def _bucket_boundaries(num_buckets: int) -> Tensor:
    """boundaries[b - 1] = the smallest |dt| whose formula bucket is >= b (found by binary search)."""
    bounds = []
    for b in range(1, num_buckets + 1):
        lo, hi = 1, 1 << 62
        while lo < hi:
            mid = (lo + hi) // 2
            if int(time_bucket_formula(torch.tensor([mid]), num_buckets)) >= b:
                hi = mid
            else:
                lo = mid + 1
        bounds.append(lo)
    return torch.tensor(bounds, dtype=torch.int64)


def time_bucket(dt: Tensor, num_buckets: int) -> Tensor:
    """`time_bucket_formula` computed as one bucketize over exact integer boundaries (same result, faster)."""
    boundaries = _bucket_boundaries(num_buckets).to(dt.device)
    return torch.bucketize(dt.abs(), boundaries, right=True)


def query_timestamps(timestamps: Tensor, offsets: Tensor) -> Tensor:
    """tq: each position's next timestamp within its sequence, its own at the sequence's last position."""
    if timestamps.numel() == 0:
        return timestamps
    nxt = torch.cat([timestamps[1:], timestamps[-1:]])
    is_last = torch.zeros_like(timestamps, dtype=torch.bool)
    ends = offsets[1:] - 1
    is_last[ends[offsets[1:] > offsets[:-1]]] = True
    return torch.where(is_last, timestamps, nxt)


def _check_inputs(q, k, v, offsets, timestamps, pos_weights, time_weights, max_seq_len) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"hstu_attention: expected q, k [T, H, Dqk] and v [T, H, Dv], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[-1]) != q.shape[0]:
        raise ValueError(f"hstu_attention: offsets must be [B+1] ending at T={q.shape[0]}, got {offsets}")
    if timestamps.shape != (q.shape[0],):
        raise ValueError(
            f"hstu_attention: timestamps must be [T={q.shape[0]}], got {tuple(timestamps.shape)}"
        )
    if pos_weights.shape != (2 * max_seq_len - 1,):
        raise ValueError(
            f"hstu_attention: pos_weights must be [2*max_seq_len-1={2 * max_seq_len - 1}], "
            f"got {tuple(pos_weights.shape)}"
        )
    if time_weights.dim() != 1 or time_weights.numel() < 2:
        raise ValueError(
            f"hstu_attention: time_weights must be [num_buckets+1], got {tuple(time_weights.shape)}"
        )
    if offsets.numel() > 1:
        longest = int((offsets[1:] - offsets[:-1]).max())
        if longest > max_seq_len:
            raise ValueError(f"hstu_attention: a sequence has {longest} tokens > max_seq_len={max_seq_len}")


def _reference_attention(
    q, k, v, offsets, timestamps, pos_weights, time_weights, max_seq_len, alpha, denominator
) -> Tensor:
    """Plain-PyTorch oracle: pad every sequence to the batch's longest, full [B, H, N, N] scores."""
    num_seqs = offsets.numel() - 1
    total, heads, dv = v.shape
    if num_seqs == 0 or total == 0:
        return v.new_zeros(total, heads, dv)
    lengths = offsets[1:] - offsets[:-1]
    n = int(lengths.max())
    pos = torch.arange(n, device=q.device)
    valid = pos[None, :] < lengths[:, None]  # [B, N]
    index = torch.where(valid, offsets[:-1, None] + pos[None, :], 0)  # [B, N]
    vmask = valid[:, :, None, None].to(q.dtype)
    qp, kp, vp = q[index] * vmask, k[index] * vmask, v[index] * vmask  # [B, N, H, D]
    ts = torch.where(valid, timestamps[index], 0)
    tq = torch.where(valid, query_timestamps(timestamps, offsets)[index], 0)

    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) * alpha
    rel = pos[None, :] - pos[:, None] + (max_seq_len - 1)  # [N(i), N(j)] -> j - i
    bucket = time_bucket(tq[:, :, None] - ts[:, None, :], time_weights.numel() - 1)
    rab = pos_weights[rel][None] + time_weights[bucket]  # [B, N, N]
    scores = scores + rab[:, None]
    causal = pos[None, :] <= pos[:, None]
    mask = (causal[None] & valid[:, None, :] & valid[:, :, None])[:, None]  # [B, 1, N, N]
    den = lengths.to(q.dtype)[:, None, None, None] if denominator is None else float(denominator)
    attn = torch.where(mask, F.silu(scores), 0.0) / den
    out = torch.einsum("bhij,bjhd->bihd", attn, vp)  # [B, N, H, Dv]
    return out[valid]


def _length_groups(sorted_lengths: list[int], heads: int) -> list[tuple[int, int]]:
    """Split descending lengths into [start, end) groups padded to their first length.

    A new group starts when the remaining sequences would save enough padded score elements to pay
    for another round of kernel launches (about 2**17 elements) and the length dropped by 20%.
    """
    groups = []
    start = 0
    for i in range(1, len(sorted_lengths) + 1):
        if i == len(sorted_lengths):
            groups.append((start, i))
            break
        top, cur = sorted_lengths[start], sorted_lengths[i]
        saving = (len(sorted_lengths) - i) * (top * top - cur * cur) * heads
        if cur < 0.8 * top and saving > (1 << 17):
            groups.append((start, i))
            start = i
    return groups


class _GatherBias(torch.autograd.Function):
    """rab = pos_weights[rel] + time_weights[bucket]; backward by bincount (CPU index_put is slow)."""

    @staticmethod
    def forward(ctx, pos_weights: Tensor, time_weights: Tensor, rel: Tensor, bucket: Tensor) -> Tensor:
        ctx.save_for_backward(rel, bucket)
        ctx.sizes = (pos_weights.numel(), time_weights.numel())
        return pos_weights[rel][None] + time_weights[bucket]

    @staticmethod
    def backward(ctx, grad: Tensor):
        rel, bucket = ctx.saved_tensors
        num_pos, num_time = ctx.sizes
        grad_pos = torch.bincount(rel.reshape(-1), weights=grad.sum(0).reshape(-1), minlength=num_pos)
        grad_time = torch.bincount(bucket.reshape(-1), weights=grad.reshape(-1), minlength=num_time)
        return grad_pos.to(grad.dtype), grad_time.to(grad.dtype), None, None


QUERY_BLOCK = 256
"""Query rows per causal block in the jagged backend; keys beyond the block's last row are skipped."""


def _jagged_attention(
    q, k, v, offsets, timestamps, pos_weights, time_weights, max_seq_len, alpha, denominator
) -> Tensor:
    """Length-grouped attention: sort sequences by length, pad each group to its own longest one."""
    num_seqs = offsets.numel() - 1
    total, heads, dqk = q.shape
    dv = v.shape[2]
    if num_seqs == 0 or total == 0:
        return v.new_zeros(total, heads, dv)
    num_buckets = time_weights.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order]
    sorted_offsets = fbgemm_ops().asynchronous_complete_cumsum(sorted_lengths)
    # Token permutation that lays the sequences out in sorted order, and its inverse.
    starts = offsets[:-1][order]
    perm = torch.repeat_interleave(starts - sorted_offsets[:-1], sorted_lengths, output_size=total)
    perm = perm + torch.arange(total, device=q.device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(total, device=q.device)

    tq_all = query_timestamps(timestamps, offsets)
    qs = q.reshape(total, heads * dqk).index_select(0, perm)
    ks = k.reshape(total, heads * dqk).index_select(0, perm)
    vs = v.reshape(total, heads * dv).index_select(0, perm)
    ts, tqs = timestamps.index_select(0, perm), tq_all.index_select(0, perm)

    outs = []
    lens_list = sorted_lengths.tolist()
    offs_list = sorted_offsets.tolist()
    for g0, g1 in _length_groups(lens_list, heads):
        n_max = lens_list[g0]
        t0, t1 = offs_list[g0], offs_list[g1]
        g_offsets = sorted_offsets[g0 : g1 + 1] - t0
        g_lengths = sorted_lengths[g0:g1]
        n = g1 - g0

        def pad(x: Tensor, g_offsets=g_offsets, n_max=n_max, t0=t0, t1=t1) -> Tensor:
            return fbgemm_ops().jagged_to_padded_dense(x[t0:t1], [g_offsets], [n_max], 0.0)

        # alpha folded into q; K stored transposed so every block is a plain strided bmm.
        qg = (pad(qs) * alpha).view(n, n_max, heads, dqk).transpose(1, 2).contiguous()  # [n, H, L, Dqk]
        kt = pad(ks).view(n, n_max, heads, dqk).permute(0, 2, 3, 1).contiguous()  # [n, H, Dqk, L]
        vg = pad(vs).view(n, n_max, heads, dv).transpose(1, 2).contiguous()  # [n, H, L, Dv]
        pos = torch.arange(n_max, device=q.device)
        valid = pos[None, :] < g_lengths[:, None]
        index = torch.where(valid, g_offsets[:-1, None] + pos[None, :], 0) + t0
        tg = torch.where(valid, ts[index], 0)
        tqg = torch.where(valid, tqs[index], 0)
        if denominator is None:
            inv_den = 1.0 / g_lengths.to(q.dtype)[:, None, None, None]
        else:
            inv_den = 1.0 / float(denominator)
        blocks = []
        for a in range(0, n_max, QUERY_BLOCK):
            b = min(a + QUERY_BLOCK, n_max)
            scores = torch.matmul(qg[:, :, a:b], kt[:, :, :, :b])  # [n, H, bq, b]
            rel = pos[None, :b] - pos[a:b, None] + (max_seq_len - 1)
            bucket = time_bucket(tqg[:, a:b, None] - tg[:, None, :b], num_buckets)
            rab = _GatherBias.apply(pos_weights, time_weights, rel, bucket)  # [n, bq, b]
            scale = (pos[None, :b] <= pos[a:b, None]).to(q.dtype) * inv_den
            weights = F.silu(scores + rab[:, None]) * scale
            blocks.append(torch.matmul(weights, vg[:, :, :b]))  # [n, H, bq, Dv]
        og = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)
        og = og.transpose(1, 2).reshape(n, n_max, heads * dv)
        outs.append(fbgemm_ops().dense_to_jagged(og, [g_offsets], total_L=t1 - t0)[0])
    out_sorted = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out_sorted.index_select(0, inverse).view(total, heads, dv)
