"""HSTU pointwise (SiLU) attention on jagged sequences, behind one interface with three backends.

out[i] = sum_{j <= i, same sequence} SiLU(alpha * <q_i, k_j> + rab(i, j)) / den * v_j
rab(i, j) = pos_weights[(j - i) + max_seq_len - 1] + time_weights[bucket(tq_i - t_j)]
tq_i (`query_times`) is the time of the event position i predicts: the next position's timestamp, and at
a sequence's last position its target's (the research code writes the target's timestamp after the
history and reads each query's time one position on); bucket(dt) = clamp(floor(ln(max(|dt|, 1)) / 0.301),
0, num_buckets).

Backends: `reference` pads the whole batch to its longest sequence ([B, H, N, N] scores, the test oracle);
`jagged` groups sequences of similar length, pads each group only to its own longest sequence and skips
key blocks above the causal diagonal, so it spends little on padding; `triton` (GPU) lives in
modules/hstu_attention_triton.py and is imported only when asked for.

Both CPU backends run from an `AttentionPlan`: the padded layout and, for every causal (i, j) pair of every
sequence, its index into a [relative position, time bucket] bias table and its place in the padded scores;
`triton` from a `TritonPlan` (lengths, bias-buffer layout, rebased timestamps: one host sync).
A plan depends only on offsets and times, so `HSTUEncoder` builds one per forward and every layer
reuses it (`plan_attention`, then `hstu_attention(..., plan=plan)`); without one each call builds its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:  # the triton module imports triton: only when that backend is used
    from modules.hstu_attention_triton import TritonPlan

Backend = Literal["reference", "jagged", "triton"]
TIME_BUCKET_DIVISOR = 0.301
"""ln(dt) / 0.301 (about log2 of the gap), as in the reference research code."""
QUERY_BLOCK = 128
"""Query rows per causal block in the jagged backend; keys beyond the block's last row are skipped."""
GROUP_MIN_SAVING = 1 << 15
"""Padded score elements (times heads) a new jagged length group must save to pay for its extra kernels."""


def hstu_attention(
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
    backend: Backend = "jagged",
    plan: AttentionPlan | TritonPlan | None = None,
) -> Tensor:
    """HSTU attention; q, k: [T, H, Dqk], v: [T, H, Dv], offsets: [B+1] int64 -> [T, H, Dv].

    Args:
        timestamps: [T] int64 seconds, chronological within each sequence (the keys' times).
        query_times: [T] int64 seconds, the queries' times tq (`next_timestamps` when the time of each
            sequence's next event is unknown).
        pos_weights: [2 * max_seq_len - 1] relative-position bias, shared by heads.
        time_weights: [num_time_buckets + 1] time-gap bias, shared by heads.
        denominator: divide SiLU scores by this constant (reference: max_seq_len), or None to divide
            by each sequence's own length.
        plan: `plan_attention(offsets, timestamps, query_times, ...)` for this backend, to share its index
            work across layers; None builds one for this call.
    """
    if backend == "triton":
        from modules.hstu_attention_triton import triton_hstu_attention

        return triton_hstu_attention(
            q,
            k,
            v,
            offsets,
            timestamps,
            query_times,
            pos_weights,
            time_weights,
            max_seq_len=max_seq_len,
            alpha=alpha,
            denominator=denominator,
            plan=_plan_for(plan, "triton"),
        )
    if backend not in ("reference", "jagged"):
        raise ValueError(
            f"hstu_attention: unknown backend {backend!r}; use 'reference', 'jagged' or 'triton'"
        )
    _check_inputs(q, k, v, offsets, timestamps, query_times, pos_weights, time_weights, max_seq_len)
    num_buckets = time_weights.numel() - 1
    if plan is None:
        plan = plan_attention(
            offsets,
            timestamps,
            query_times,
            max_seq_len=max_seq_len,
            num_time_buckets=num_buckets,
            backend=backend,
            num_heads=q.shape[1],
        )
    else:
        _plan_for(plan, backend).check(
            offsets,
            timestamps,
            query_times,
            max_seq_len=max_seq_len,
            num_time_buckets=num_buckets,
            backend=backend,
        )
    return _planned_attention(q, k, v, pos_weights, time_weights, plan, max_seq_len, alpha, denominator)


def _plan_for(plan, backend: str):
    """`plan` if it was built for `backend` (None passes): the triton and padded plans are different kinds."""
    if plan is not None and isinstance(plan, AttentionPlan) != (backend != "triton"):
        raise ValueError(
            f"hstu_attention: plan was built for backend {getattr(plan, 'backend', 'triton')!r}, called with "
            f"{backend!r}; build it with plan_attention(..., backend={backend!r})"
        )
    return plan


def next_timestamps(timestamps: Tensor, offsets: Tensor) -> Tensor:
    """Query times when no target's time is known: each position's next timestamp within its sequence,
    its own at the sequence's last position."""
    if timestamps.numel() == 0:
        return timestamps
    nxt = torch.cat([timestamps[1:], timestamps[-1:]])
    is_last = torch.zeros_like(timestamps, dtype=torch.bool)
    ends = offsets[1:] - 1
    is_last[ends[offsets[1:] > offsets[:-1]]] = True
    return torch.where(is_last, timestamps, nxt)


def check_attention_shapes(
    q, k, v, offsets, timestamps, query_times, pos_weights, time_weights, max_seq_len, *, who: str
) -> None:
    """Shape checks shared by every backend (no host sync); `who` names the caller in the message."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"{who}: expected q, k [T, H, Dqk] and v [T, H, Dv], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{who}: offsets must be [B+1], got {tuple(offsets.shape)}")
    for name, times in (("timestamps", timestamps), ("query_times", query_times)):
        if times.shape != (q.shape[0],):
            raise ValueError(f"{who}: {name} must be [T={q.shape[0]}], got {tuple(times.shape)}")
    if pos_weights.shape != (2 * max_seq_len - 1,):
        raise ValueError(
            f"{who}: pos_weights must be [2*max_seq_len-1={2 * max_seq_len - 1}], "
            f"got {tuple(pos_weights.shape)}"
        )
    if time_weights.dim() != 1 or time_weights.numel() < 2:
        raise ValueError(f"{who}: time_weights must be [num_buckets+1], got {tuple(time_weights.shape)}")


def _check_inputs(q, k, v, offsets, timestamps, query_times, pos_weights, time_weights, max_seq_len) -> None:
    check_attention_shapes(
        q,
        k,
        v,
        offsets,
        timestamps,
        query_times,
        pos_weights,
        time_weights,
        max_seq_len,
        who="hstu_attention",
    )
    first, last = offsets[[0, -1]].tolist()  # one sync
    if first != 0 or last != q.shape[0]:
        raise ValueError(
            f"hstu_attention: offsets must start at 0 and end at T={q.shape[0]} (every token in one "
            f"sequence), got first offset {first}, last {last}"
        )


@dataclass(eq=False)
class _Block:
    """Query rows [start, stop) of a padded group against keys [0, stop), and the bias of its causal pairs."""

    start: int
    stop: int
    bias_index: Tensor
    """[P] per causal pair: (i - j) * (num_buckets + 1) + bucket, into the [n_max, buckets+1] bias table."""
    bias_dest: Tensor
    """[P] per causal pair: flat position in this block's one-head [n, stop - start, stop] scores."""
    _dest_by_heads: dict[int, Tensor] = field(default_factory=dict)

    def dest(self, heads: int) -> Tensor:
        """bias_dest for [n * heads, stop - start, stop] scores: [P * heads], pair-major."""
        if heads == 1:
            return self.bias_dest
        if heads not in self._dest_by_heads:  # not planned for this many heads: derive it
            area = (self.stop - self.start) * self.stop
            row, cell = self.bias_dest // area, self.bias_dest % area
            head = torch.arange(heads, device=row.device) * area
            self._dest_by_heads[heads] = ((row * (heads * area) + cell)[:, None] + head).reshape(-1)
        return self._dest_by_heads[heads]


@dataclass(eq=False)
class _Group:
    """Sequences padded together to n_max: rows[s, p] = token index of position p, T at padding."""

    n_max: int
    rows: Tensor
    blocks: list[_Block]
    _rows_by_heads: dict[int, Tensor] = field(default_factory=dict)

    def head_rows(self, heads: int) -> Tensor:
        """Rows into a [(T + 1) * heads, D] head-major token table, laid out [n, heads, n_max]."""
        if heads == 1:
            return self.rows.reshape(-1)
        if heads not in self._rows_by_heads:
            head = torch.arange(heads, device=self.rows.device)[None, :, None]
            self._rows_by_heads[heads] = (self.rows[:, None, :] * heads + head).reshape(-1)
        return self._rows_by_heads[heads]


@dataclass(eq=False)
class AttentionPlan:
    """Index work of one batch for the reference or jagged backend, shared by every layer's attention."""

    backend: str
    max_seq_len: int
    num_time_buckets: int
    offsets: Tensor
    timestamps: Tensor
    query_times: Tensor
    max_len: int
    """Longest sequence in the batch (rows of the bias table)."""
    groups: list[_Group]
    out_rows: Tensor
    """[T] each token's row in the concatenated [sum(n * n_max), ...] padded group outputs."""
    inv_lengths: Tensor
    """[T, 1] float32: 1 / the token's own sequence length (denominator=None)."""
    _rows_by_heads: dict[int, tuple[Tensor, list[int]]] = field(default_factory=dict)

    def head_rows(self, heads: int) -> tuple[Tensor, list[int]]:
        """All groups' rows into a [(T + 1) * heads, D] head-major token table, and each group's count."""
        if heads not in self._rows_by_heads:
            rows = [g.head_rows(heads) for g in self.groups]
            self._rows_by_heads[heads] = (torch.cat(rows), [r.numel() for r in rows])
        return self._rows_by_heads[heads]

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
        """Raise ValueError unless this plan was built for exactly these inputs and settings."""
        want = (backend, max_seq_len, num_time_buckets)
        have = (self.backend, self.max_seq_len, self.num_time_buckets)
        if want != have:
            raise ValueError(
                f"hstu_attention: plan was built for (backend, max_seq_len, num_time_buckets)={have}, "
                f"called with {want}; build it with plan_attention(...) for this call"
            )
        planned = (self.offsets, self.timestamps, self.query_times)
        if not all(map(same_tensor, (offsets, timestamps, query_times), planned)):
            raise ValueError(
                "hstu_attention: plan was built for other offsets/times; build one per batch with "
                "plan_attention(offsets, timestamps, query_times, ...)"
            )


def same_tensor(given: Tensor, planned: Tensor) -> bool:
    """`given` is the tensor a plan was built for, or equal to it."""
    return given is planned or (given.shape == planned.shape and torch.equal(given, planned))


def plan_attention(
    offsets: Tensor,
    timestamps: Tensor,
    query_times: Tensor,
    *,
    max_seq_len: int,
    num_time_buckets: int,
    backend: Backend,
    num_heads: int = 1,
) -> AttentionPlan | TritonPlan:
    """Padded layout and causal-pair bias indices for one batch (offsets [B+1], timestamps and query times
    [T]); for
    `triton`, the batch measured for its kernels (`modules.hstu_attention_triton.TritonPlan`).

    num_heads weighs the jagged grouping (a group saves heads x its padded elements) and pre-builds the
    per-head bias positions; the plan still serves calls with any number of heads.
    """
    if backend == "triton":
        from modules.hstu_attention_triton import plan_triton_attention

        return plan_triton_attention(offsets, timestamps, query_times, max_seq_len=max_seq_len)
    if backend not in ("reference", "jagged"):
        raise ValueError(
            f"plan_attention: backend must be 'reference', 'jagged' or 'triton', got {backend!r}"
        )
    device = offsets.device
    lengths = offsets[1:] - offsets[:-1]
    num_seqs, total = lengths.numel(), int(offsets[-1])
    max_len = int(lengths.max()) if num_seqs else 0
    if max_len > max_seq_len:
        raise ValueError(f"hstu_attention: a sequence has {max_len} tokens > max_seq_len={max_seq_len}")
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths, output_size=total)
    positions = torch.arange(total, device=device) - offsets[:-1][seq_of_token]
    inv_lengths = (1.0 / lengths.clamp(min=1).to(torch.float32))[seq_of_token][:, None]

    if backend == "reference":
        seqs = torch.nonzero(lengths).view(-1)
        splits = [(0, seqs.numel())] if seqs.numel() else []
        block = max(max_len, 1)
    else:
        order = torch.argsort(lengths, descending=True, stable=True)
        sorted_lengths = lengths[order].tolist()
        nonzero = sum(1 for n in sorted_lengths if n > 0)
        seqs = order[:nonzero]
        splits = _length_groups(sorted_lengths[:nonzero], num_heads)
        block = QUERY_BLOCK
    seq_lengths, seq_starts = lengths[seqs], offsets[:-1][seqs]
    first_row = torch.zeros(num_seqs, dtype=torch.int64, device=device)
    groups, base = [], 0
    for g0, g1 in splits:
        g_lengths, g_starts = seq_lengths[g0:g1], seq_starts[g0:g1]
        n, n_max = g1 - g0, int(g_lengths[0]) if backend == "jagged" else max_len
        first_row[seqs[g0:g1]] = base + torch.arange(n, device=device) * n_max
        base += n * n_max
        pos = torch.arange(n_max, device=device)
        rows = torch.where(pos[None, :] < g_lengths[:, None], g_starts[:, None] + pos[None, :], total)
        blocks = [
            _causal_pairs(
                g_lengths,
                g_starts,
                a,
                min(a + block, n_max),
                query_times,
                timestamps,
                num_time_buckets,
                num_heads,
            )
            for a in range(0, n_max, block)
        ]
        groups.append(_Group(n_max=n_max, rows=rows, blocks=blocks))
    out_rows = first_row[seq_of_token] + positions
    return AttentionPlan(
        backend=backend,
        max_seq_len=max_seq_len,
        num_time_buckets=num_time_buckets,
        offsets=offsets,
        timestamps=timestamps,
        query_times=query_times,
        max_len=max_len,
        groups=groups,
        out_rows=out_rows,
        inv_lengths=inv_lengths,
    )


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return F.pad(torch.cumsum(x, 0), (1, 0))[:-1]


def _causal_pairs(
    lengths: Tensor,
    starts: Tensor,
    start: int,
    stop: int,
    tq: Tensor,
    ts: Tensor,
    num_buckets: int,
    heads: int,
) -> _Block:
    """Every (i, j <= i) pair with query row i in [start, stop) of each sequence: bias index and place.

    Pairs are laid out query-major, so each per-pair value is a per-query value (gathered) plus or minus
    the pair's running index p; 1-D gathers (faster than index_select for int64 on CPU) and in-place
    ops keep the P-sized passes few and cheap.
    """
    device = lengths.device
    rows_per_seq = (lengths - start).clamp(0, stop - start)
    num_queries = int(rows_per_seq.sum())
    seq = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=device), rows_per_seq, output_size=num_queries
    )
    i = torch.arange(num_queries, device=device).sub_(
        _exclusive_cumsum(rows_per_seq).sub_(start).index_select(0, seq)
    )
    keys = i + 1  # keys j = 0..i per query
    first = _exclusive_cumsum(keys)  # index p of each query's pair j = 0
    num_pairs = int(first[-1] + keys[-1]) if num_queries else 0
    pair_query = torch.repeat_interleave(
        torch.arange(num_queries, device=device), keys, output_size=num_pairs
    )
    p = torch.arange(num_pairs, device=device)
    seq_start = starts.index_select(0, seq)
    # j = p - first; dest = (seq * rows + i - start) * stop + j; key token = seq_start + j; r = i - j.
    dest = ((seq * (stop - start) + i - start) * stop - first).gather(0, pair_query).add_(p)
    key_token = (seq_start - first).gather(0, pair_query).add_(p)
    r = (i + first).gather(0, pair_query).sub_(p)
    query_time = tq.index_select(0, seq_start + i)
    dt = query_time.gather(0, pair_query).sub_(ts.gather(0, key_token))
    bias_index = r.mul_(num_buckets + 1).add_(time_bucket_(dt, num_buckets))
    block = _Block(start=start, stop=stop, bias_index=bias_index, bias_dest=dest)
    if heads > 1:  # scores [n * heads, rows, stop]: the same pairs, one matrix further per head
        area = (stop - start) * stop
        base = (seq * ((heads - 1) * area)).gather(0, pair_query).add_(dest)
        block._dest_by_heads[heads] = (base[:, None] + torch.arange(heads, device=device) * area).view(-1)
    return block


def time_bucket_(dt: Tensor, num_buckets: int) -> Tensor:
    """Log-bucketed time gap, clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets) as int64, computed in
    place where possible (overwrites dt)."""
    x = dt.abs_().clamp_(min=1).to(torch.float32).log_().div_(TIME_BUCKET_DIVISOR)
    return x.long().clamp_(0, num_buckets)


def _length_groups(sorted_lengths: list[int], heads: int) -> list[tuple[int, int]]:
    """Split descending lengths into [start, end) groups padded to their first length.

    A new group starts when the remaining sequences would save enough padded score elements to pay
    for another group's kernels (GROUP_MIN_SAVING) and the length dropped by 20%.
    """
    count = len(sorted_lengths)
    if count == 0:
        return []
    groups, start = [], 0
    for i in range(1, count):
        top, cur = sorted_lengths[start], sorted_lengths[i]
        if cur < 0.8 * top and (count - i) * (top * top - cur * cur) * heads > GROUP_MIN_SAVING:
            groups.append((start, i))
            start = i
    groups.append((start, count))
    return groups


class _GroupAttention(torch.autograd.Function):
    """One padded group, query block by query block: O[a:b] = tril(SiLU(Q[a:b] K[:b]^T + bias), a) V[:b].

    q, k: [G, L, Dqk], v: [G, L, Dv] with G = sequences * heads. The bias is scattered straight into each
    block's scores and its gradient gathered back from them (no [G, L, L] bias or mask tensors); blocks
    write into and accumulate from one set of buffers, and the backward works on them in place.
    """

    @staticmethod
    def forward(ctx, q, k, v, table, blocks: list[_Block], heads: int):
        with torch.autocast(q.device.type, enabled=False):  # out= buffers need q's dtype throughout
            return _GroupAttention._forward(ctx, q, k.to(q.dtype), v.to(q.dtype), table, blocks, heads)

    @staticmethod
    def _forward(ctx, q, k, v, table, blocks: list[_Block], heads: int):
        outs, saved = [], []
        for block in blocks:
            a, b = block.start, block.stop
            scores = torch.bmm(q[:, a:b], k[:, :b].transpose(1, 2))
            if block.bias_index.numel():
                values = table.index_select(0, block.bias_index).to(scores.dtype)
                if heads > 1:
                    values = values[:, None].expand(-1, heads).reshape(-1)
                scores.view(-1).scatter_add_(0, block.dest(heads), values)
            weights = F.silu(scores).tril_(a)
            outs.append(torch.bmm(weights, v[:, :b]))
            saved += [scores, weights]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.blocks, ctx.heads, ctx.table_shape = blocks, heads, (table.numel(), table.dtype)
        # Contiguous results joined by cat: bmm(out=) or baddbmm_ into strided views falls back to a
        # per-matrix loop that is very slow with several threads.
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, *saved = ctx.saved_tensors
        single = len(ctx.blocks) == 1
        grad_qs, grad_k, grad_v = [], None, None
        if not single:
            grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        grad_table = None
        if ctx.needs_input_grad[3]:
            numel, dtype = ctx.table_shape
            acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            grad_table = torch.zeros(numel, dtype=acc, device=grad_out.device)
        for index, block in enumerate(ctx.blocks):
            a, b = block.start, block.stop
            scores, weights = saved[2 * index], saved[2 * index + 1]
            go = grad_out[:, a:b]
            gv = torch.bmm(weights.transpose(1, 2), go)
            grad_s = torch.bmm(go, v[:, :b].transpose(1, 2)).tril_(a)
            torch.ops.aten.silu_backward.grad_input(grad_s, scores, grad_input=grad_s)
            grad_qs.append(torch.bmm(grad_s, k[:, :b]))
            gk = torch.bmm(grad_s.transpose(1, 2), q[:, a:b])
            if single:
                grad_k, grad_v = gk, gv
            else:
                grad_k[:, :b] += gk
                grad_v[:, :b] += gv
            if grad_table is not None and block.bias_index.numel():
                grad_bias = grad_s.view(-1).index_select(0, block.dest(ctx.heads))
                if ctx.heads > 1:
                    grad_bias = grad_bias.view(-1, ctx.heads).sum(1)
                grad_table.scatter_add_(0, block.bias_index, grad_bias.to(grad_table.dtype))
        if grad_table is not None:
            grad_table = grad_table.to(ctx.table_shape[1])
        grad_q = grad_qs[0] if single else torch.cat(grad_qs, dim=1)
        return grad_q, grad_k, grad_v, grad_table, None, None


def _planned_attention(
    q, k, v, pos_weights, time_weights, plan: AttentionPlan, max_seq_len, alpha, denominator
) -> Tensor:
    """Gather every group's padded q/k/v at once, run its causal blocks, scatter back, divide by den."""
    total, heads, dqk = q.shape
    dv = v.shape[2]
    if total == 0 or not plan.groups:
        return v.new_zeros(total, heads, dv)
    n = plan.max_len
    # table[r, b] = pos_weights[max_seq_len - 1 - r] + time_weights[b], r = i - j in [0, n).
    table = (pos_weights[max_seq_len - n : max_seq_len].flip(0)[:, None] + time_weights[None, :]).reshape(-1)
    # Token tables with one zero row at index T for the padding; head-major rows [(T + 1) * H, D].
    rows, sizes = plan.head_rows(heads)
    padded = []
    for x, scale in ((q, alpha), (k, None), (v, None)):
        x = x * scale if scale is not None else x
        x = F.pad(x, (0, 0, 0, 0, 0, 1)).view(-1, x.shape[2]).index_select(0, rows)
        padded.append(x.split(sizes) if len(sizes) > 1 else (x,))
    outs = []
    for group, qg, kg, vg in zip(plan.groups, *padded, strict=True):
        shape = (-1, group.n_max)
        og = _GroupAttention.apply(
            qg.view(*shape, dqk), kg.view(*shape, dqk), vg.view(*shape, dv), table, group.blocks, heads
        )  # [n * H, n_max, Dv]
        if heads > 1:
            og = og.view(-1, heads, group.n_max, dv).transpose(1, 2)
        outs.append(og.reshape(-1, heads * dv))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)).index_select(0, plan.out_rows)
    scale = plan.inv_lengths.to(out.dtype) if denominator is None else 1.0 / float(denominator)
    out = out * scale
    return out.view(total, heads, dv)
