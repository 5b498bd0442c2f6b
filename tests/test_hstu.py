"""HSTU attention backends and layers: jagged vs the padded reference vs naive loops, forward and grads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.config import ModelConfig
from modules.hstu import HSTUEncoder
from modules.hstu_attention import hstu_attention, next_timestamps, plan_attention, time_bucket_

MAX_LEN = 300


def _batch(lengths: list[int], heads=2, dqk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths_t.cumsum(0)])
    total = int(offsets[-1])
    q = torch.randn(total, heads, dqk, generator=g).requires_grad_()
    k = torch.randn(total, heads, dqk, generator=g).requires_grad_()
    v = torch.randn(total, heads, dv, generator=g).requires_grad_()
    ts, tq = _times(lengths, g)
    pw = (0.1 * torch.randn(2 * MAX_LEN - 1, generator=g)).requires_grad_()
    tw = (0.1 * torch.randn(129, generator=g)).requires_grad_()
    return q, k, v, offsets, ts, tq, pw, tw


def _times(lengths: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted timestamps per sequence and its query times: each position's next one, and after the last
    a target's time up to 10^7 s later (as the loader gives them)."""
    ts, tq = [], []
    for n in lengths:
        times = torch.sort(torch.randint(0, 10**9, (n + 1,), generator=g))[0]
        times[-1] = times[-2 if n else -1] + torch.randint(0, 10**7, (1,), generator=g)
        ts.append(times[:n])
        tq.append(times[1:])
    return torch.cat(ts), torch.cat(tq)


def _naive(q, k, v, offsets, ts, tq, pw, tw, alpha, den, max_len=MAX_LEN):
    """Per-position loop straight from the contract's formula (differentiable, for gradient checks)."""
    rows = []
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        n = e - s
        d = float(n) if den is None else den
        for i in range(n):
            row = torch.zeros(q.shape[1], v.shape[2], dtype=q.dtype)
            for j in range(i + 1):
                dt = int(tq[s + i] - ts[s + j])
                bucket = min(max(int(math.log(max(abs(dt), 1)) / 0.301), 0), 128)
                rab = pw[j - i + max_len - 1] + tw[bucket]
                w = F.silu(alpha * (q[s + i] * k[s + j]).sum(-1) + rab) / d  # [H]
                row = row + w[:, None] * v[s + j]
            rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, q.shape[1], v.shape[2])


def test_time_bucket_matches_formula():
    dt = torch.tensor([0, 1, -1, 2, 60, -3600, 86400 * 365, 10**18])
    expected = [min(max(int(math.log(max(abs(int(x)), 1)) / 0.301), 0), 128) for x in dt]
    assert time_bucket_(dt.clone(), 128).tolist() == expected


def test_next_timestamps_shift_within_each_sequence():
    ts = torch.tensor([5, 7, 9, 100, 3, 4])
    assert next_timestamps(ts, torch.tensor([0, 3, 3, 4, 6])).tolist() == [7, 9, 9, 100, 4, 4]


@pytest.mark.parametrize("den", [float(MAX_LEN), None])
@pytest.mark.parametrize("backend", ["reference", "jagged"])
def test_backends_match_naive_loop_forward_and_grads(den, backend):
    inputs = _batch([1, 4, 7, 2], seed=3)
    q, k, v, offsets, ts, tq, pw, tw = inputs
    out = hstu_attention(
        q, k, v, offsets, ts, tq, pw, tw, max_seq_len=MAX_LEN, alpha=0.3, denominator=den, backend=backend
    )
    naive = _naive(q, k, v, offsets, ts, tq, pw, tw, 0.3, den)
    torch.testing.assert_close(out, naive, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    leaves = [q, k, v, pw, tw]
    for got, want in zip(
        torch.autograd.grad((out * grad_out).sum(), leaves),
        torch.autograd.grad((naive * grad_out).sum(), leaves),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("den", [float(MAX_LEN), None])
@pytest.mark.parametrize("seed", [0, 1])
def test_jagged_matches_reference_forward_and_grads(den, seed):
    g = torch.Generator().manual_seed(seed + 10)
    lengths = [1, MAX_LEN, 129, 128, 2, *torch.randint(1, MAX_LEN + 1, (9,), generator=g).tolist()]
    lengths += torch.randint(1, 40, (30,), generator=g).tolist()  # enough short rows for several groups
    inputs = _batch(lengths, seed=seed)
    q, k, v, offsets, ts, tq, pw, tw = inputs
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=g)
    results = {}
    for backend in ("reference", "jagged"):
        out = hstu_attention(
            q,
            k,
            v,
            offsets,
            ts,
            tq,
            pw,
            tw,
            max_seq_len=MAX_LEN,
            alpha=0.25,
            denominator=den,
            backend=backend,
        )
        grads = torch.autograd.grad((out * grad_out).sum(), [q, k, v, pw, tw])
        results[backend] = (out, grads)
    torch.testing.assert_close(results["jagged"][0], results["reference"][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(results["jagged"][1], results["reference"][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "jagged"])
def test_shared_plan_matches_per_call_plan(backend):
    """A plan built once and reused (as HSTUEncoder does for its layers) gives the same outputs and grads."""
    lengths = [5, 0, 280, 40, 1, 33, 260, 0, 2]
    q, k, v, offsets, ts, tq, pw, tw = _batch(lengths, heads=3, seed=7)
    kw = dict(max_seq_len=MAX_LEN, num_time_buckets=128, backend=backend)
    plan = plan_attention(offsets, ts, tq, num_heads=3, **kw)  # what hstu_attention builds for 3 heads
    other_heads = plan_attention(offsets, ts, tq, num_heads=1, **kw)  # derives its 3-head indices
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(q.shape[0], 3, v.shape[2], generator=g)
    results = []
    for shared in (None, plan, plan, other_heads):  # the second use of `plan` hits its per-head caches
        out = hstu_attention(
            q, k, v, offsets, ts, tq, pw, tw, max_seq_len=MAX_LEN, alpha=0.5, denominator=None,
            backend=backend, plan=shared,
        )  # fmt: skip
        results.append((out, torch.autograd.grad((out * grad_out).sum(), [q, k, v, pw, tw])))
    for index, (out, grads) in enumerate(results[1:], start=1):
        tol = dict(rtol=0, atol=0) if index < 3 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, results[0][0], **tol)
        for got, want in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(got, want, **tol)


def test_empty_sequences_match_naive_loop():
    """Zero-length rows own no tokens; both backends agree with the naive loop around them."""
    q, k, v, offsets, ts, tq, pw, tw = _batch([0, 3, 0, 6, 1, 0], seed=4)
    with torch.no_grad():
        naive = _naive(q, k, v, offsets, ts, tq, pw, tw, 0.7, None)
        for backend in ("reference", "jagged"):
            out = hstu_attention(
                q, k, v, offsets, ts, tq, pw, tw, max_seq_len=MAX_LEN, alpha=0.7, denominator=None,
                backend=backend,
            )  # fmt: skip
            torch.testing.assert_close(out, naive, rtol=1e-5, atol=1e-6)


def test_plan_for_other_inputs_is_rejected():
    q, k, v, offsets, ts, tq, pw, tw = _batch([3, 5])
    kw = dict(max_seq_len=MAX_LEN, alpha=1.0, denominator=None)
    plan = plan_attention(offsets, ts, tq, max_seq_len=MAX_LEN, num_time_buckets=128, backend="jagged")
    with pytest.raises(ValueError, match="backend"):
        hstu_attention(q, k, v, offsets, ts, tq, pw, tw, backend="reference", plan=plan, **kw)
    with pytest.raises(ValueError, match="offsets/times"):
        hstu_attention(q, k, v, offsets, ts + 1, tq, pw, tw, backend="jagged", plan=plan, **kw)
    with pytest.raises(ValueError, match="offsets/times"):
        hstu_attention(q, k, v, offsets, ts, tq + 1, pw, tw, backend="jagged", plan=plan, **kw)
    with pytest.raises(ValueError, match="offsets/times"):
        hstu_attention(q, k, v, torch.tensor([0, 4, 8]), ts, tq, pw, tw, backend="jagged", plan=plan, **kw)


@pytest.mark.parametrize("backend", ["reference", "jagged"])
@pytest.mark.parametrize(("offsets", "found"), [([2, 5, 8], "first offset 2, last 8"), ([0, 3, 7], "last 7")])
def test_rejects_offsets_that_leave_tokens_out(backend, offsets, found):
    """Every token must lie in a sequence (as the Triton plan requires too)."""
    q, k, v, _, ts, tq, pw, tw = _batch([3, 5])
    with pytest.raises(ValueError, match=f"start at 0 and end at T=8.*{found}"):
        hstu_attention(
            q, k, v, torch.tensor(offsets), ts, tq, pw, tw, max_seq_len=MAX_LEN, alpha=1.0, denominator=None,
            backend=backend,
        )  # fmt: skip


def test_rejects_sequence_longer_than_max_len():
    q, k, v, offsets, ts, tq, pw, tw = _batch([3, 5])
    with pytest.raises(ValueError, match="max_seq_len"):
        hstu_attention(q, k, v, offsets, ts, tq, pw[:7], tw, max_seq_len=4, alpha=1.0, denominator=None)
    with pytest.raises(ValueError, match="unknown backend"):
        hstu_attention(
            q, k, v, offsets, ts, tq, pw, tw, max_seq_len=MAX_LEN, alpha=1.0, denominator=None, backend="nope"
        )


def test_encoder_backends_agree_and_output_is_normalised():
    config = ModelConfig(
        embedding_dim=32, num_blocks=2, num_heads=2, qk_dim=8, v_dim=8, max_seq_len=200, dropout=0.0
    )
    torch.manual_seed(0)
    encoder = HSTUEncoder(config)
    lengths = torch.tensor([1, 200, 37, 150, 5])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    x = torch.randn(int(offsets[-1]), 32, requires_grad=True)
    ts, tq = _times(lengths.tolist(), torch.Generator().manual_seed(0))
    outs = {}
    for backend in ("reference", "jagged"):
        config.attention_backend = backend
        out = encoder(x, offsets, ts, tq)
        grads = torch.autograd.grad(out.pow(3).sum(), [x, *encoder.parameters()])
        outs[backend] = (out, grads)
    torch.testing.assert_close(outs["jagged"][0], outs["reference"][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(outs["jagged"][1], outs["reference"][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(outs["jagged"][0].norm(dim=-1), torch.ones(x.shape[0]))


def test_encoder_triton_backend_shares_one_plan_and_agrees_with_jagged(monkeypatch):
    """The Triton backend (interpreted on CPU) through the whole encoder: one plan (one host sync) per
    forward for all layers, and the jagged backend's outputs and gradients."""
    tri = pytest.importorskip("modules.hstu_attention_triton")
    config = ModelConfig(
        embedding_dim=16, num_blocks=3, num_heads=2, qk_dim=8, v_dim=8, max_seq_len=40, dropout=0.0
    )
    torch.manual_seed(0)
    encoder = HSTUEncoder(config)
    lengths = torch.tensor([1, 40, 17])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    x = torch.randn(int(offsets[-1]), 16, requires_grad=True)
    ts, tq = _times(lengths.tolist(), torch.Generator().manual_seed(1))
    plans = []
    build = tri.plan_triton_attention
    monkeypatch.setattr(tri, "plan_triton_attention", lambda *a, **k: plans.append(1) or build(*a, **k))
    outs = {}
    for backend in ("jagged", "triton"):
        config.attention_backend = backend
        out = encoder(x, offsets, ts, tq)
        outs[backend] = (out, torch.autograd.grad(out.pow(3).sum(), [x, *encoder.parameters()]))
    assert len(plans) == 1
    torch.testing.assert_close(outs["triton"][0], outs["jagged"][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(outs["triton"][1], outs["jagged"][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_encoder_matches_the_design_equations():
    """Each layer as DESIGN.md writes it, per sequence with the encoder's own weights: n = LayerNorm(x);
    U, V, Q, K = split(SiLU(n W_uvqk)); A = SiLU(alpha Q K^T + rab) / N, causal; y = x + (U * LayerNorm(A V))
    W_o; input emb * sqrt(d) + position; output L2-normalised."""
    config = ModelConfig(
        embedding_dim=16, num_blocks=2, num_heads=2, qk_dim=4, v_dim=3, max_seq_len=10, dropout=0.0, alpha=0.7
    )
    torch.manual_seed(0)
    encoder = HSTUEncoder(config).eval()
    lengths = [3, 7, 1]
    offsets = torch.tensor([0, 3, 10, 11])
    x = torch.randn(11, 16)
    ts, tq = _times(lengths, torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in encoder.layers:  # away from their near-zero initialisation, so each term counts
            layer.pos_weights.normal_(0, 0.5)
            layer.time_weights.normal_(0, 0.5)
        out = encoder(x, offsets, ts, tq)
        d, heads, n = 16, 2, config.max_seq_len
        want = []
        for b in range(len(lengths)):
            s, e = int(offsets[b]), int(offsets[b + 1])
            h = x[s:e] * math.sqrt(d) + encoder.position.weight[: e - s]
            for layer in encoder.layers:
                u, v, q, k = F.silu(F.layer_norm(h, [d], eps=1e-6) @ layer.uvqk).split([6, 6, 8, 8], dim=1)
                av = _naive(
                    q.view(-1, heads, 4), k.view(-1, heads, 4), v.view(-1, heads, 3),
                    torch.tensor([0, e - s]), ts[s:e], tq[s:e], layer.pos_weights, layer.time_weights, 0.7,
                    float(n), max_len=n,
                ).reshape(e - s, 6)  # fmt: skip
                h = h + (u * F.layer_norm(av, [6], eps=1e-6)) @ layer.output.weight.T + layer.output.bias
            want.append(F.normalize(h, dim=-1))
    torch.testing.assert_close(out, torch.cat(want), rtol=1e-5, atol=1e-5)


def test_causality_future_tokens_do_not_change_past_outputs():
    config = ModelConfig(
        embedding_dim=16, num_blocks=2, num_heads=2, qk_dim=4, v_dim=4, max_seq_len=20, dropout=0.0
    )
    encoder = HSTUEncoder(config).eval()
    for layer in encoder.layers:
        torch.nn.init.normal_(layer.time_weights, std=1.0)
    x = torch.randn(10, 16)
    ts, tq = _times([10], torch.Generator().manual_seed(3))
    full = encoder(x, torch.tensor([0, 10]), ts, tq)
    x2 = x.clone()
    x2[7:] = torch.randn(3, 16)
    changed = encoder(x2, torch.tensor([0, 10]), ts, tq)
    # Position i's time bias reads tq_i (the next event's time), never the item at i+1.
    torch.testing.assert_close(changed[:7], full[:7])
    assert not torch.allclose(changed[7:], full[7:])
    # the target's time moves only the last position's output
    later = tq.clone()
    later[-1] += 10**6
    moved = encoder(x, torch.tensor([0, 10]), ts, later)
    torch.testing.assert_close(moved[:9], full[:9])
    assert not torch.allclose(moved[9], full[9])
