"""HSTU attention backends and layers: jagged vs the padded reference vs a naive loop, forward and grads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.config import ModelConfig
from modules.hstu import HSTUEncoder
from modules.hstu_attention import hstu_attention, plan_attention, time_bucket

MAX_LEN = 300


def _batch(lengths: list[int], heads=2, dqk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths_t.cumsum(0)])
    total = int(offsets[-1])
    q = torch.randn(total, heads, dqk, generator=g).requires_grad_()
    k = torch.randn(total, heads, dqk, generator=g).requires_grad_()
    v = torch.randn(total, heads, dv, generator=g).requires_grad_()
    ts = torch.cat([torch.sort(torch.randint(0, 10**9, (n,), generator=g))[0] for n in lengths])
    pw = (0.1 * torch.randn(2 * MAX_LEN - 1, generator=g)).requires_grad_()
    tw = (0.1 * torch.randn(129, generator=g)).requires_grad_()
    return q, k, v, offsets, ts, pw, tw


def _naive(q, k, v, offsets, ts, pw, tw, alpha, den):
    """Per-position loop straight from the contract's formula."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2])
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        n = e - s
        d = float(n) if den is None else den
        for i in range(n):
            tq = ts[s + i + 1] if i + 1 < n else ts[s + i]
            for j in range(i + 1):
                dt = int(tq - ts[s + j])
                bucket = min(max(int(math.log(max(abs(dt), 1)) / 0.301), 0), 128)
                rab = pw[j - i + MAX_LEN - 1] + tw[bucket]
                w = F.silu(alpha * (q[s + i] * k[s + j]).sum(-1) + rab) / d  # [H]
                out[s + i] += w[:, None] * v[s + j]
    return out


def test_time_bucket_matches_formula():
    dt = torch.tensor([0, 1, -1, 2, 60, -3600, 86400 * 365, 10**18])
    expected = [min(max(int(math.log(max(abs(int(x)), 1)) / 0.301), 0), 128) for x in dt]
    assert time_bucket(dt, 128).tolist() == expected


@pytest.mark.parametrize("den", [float(MAX_LEN), None])
def test_reference_matches_naive_loop(den):
    q, k, v, offsets, ts, pw, tw = _batch([1, 4, 7, 2], seed=3)
    with torch.no_grad():
        ref = hstu_attention(
            q, k, v, offsets, ts, pw, tw, max_seq_len=MAX_LEN, alpha=0.3, denominator=den, backend="reference"
        )
        naive = _naive(q, k, v, offsets, ts, pw, tw, 0.3, den)
    torch.testing.assert_close(ref, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("den", [float(MAX_LEN), None])
@pytest.mark.parametrize("seed", [0, 1])
def test_jagged_matches_reference_forward_and_grads(den, seed):
    g = torch.Generator().manual_seed(seed + 10)
    lengths = [1, MAX_LEN, 129, 128, 2, *torch.randint(1, MAX_LEN + 1, (9,), generator=g).tolist()]
    lengths += torch.randint(1, 40, (30,), generator=g).tolist()  # enough short rows for several groups
    inputs = _batch(lengths, seed=seed)
    q, k, v, offsets, ts, pw, tw = inputs
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=g)
    results = {}
    for backend in ("reference", "jagged"):
        out = hstu_attention(
            q, k, v, offsets, ts, pw, tw, max_seq_len=MAX_LEN, alpha=0.25, denominator=den, backend=backend
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
    q, k, v, offsets, ts, pw, tw = _batch(lengths, heads=3, seed=7)
    kw = dict(max_seq_len=MAX_LEN, num_time_buckets=128, backend=backend)
    plan = plan_attention(offsets, ts, num_heads=3, **kw)  # what hstu_attention builds for 3 heads
    other_heads = plan_attention(offsets, ts, num_heads=1, **kw)  # derives its 3-head indices
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(q.shape[0], 3, v.shape[2], generator=g)
    results = []
    for shared in (None, plan, plan, other_heads):  # the second use of `plan` hits its per-head caches
        out = hstu_attention(
            q, k, v, offsets, ts, pw, tw, max_seq_len=MAX_LEN, alpha=0.5, denominator=None, backend=backend,
            plan=shared,
        )  # fmt: skip
        results.append((out, torch.autograd.grad((out * grad_out).sum(), [q, k, v, pw, tw])))
    for index, (out, grads) in enumerate(results[1:], start=1):
        tol = dict(rtol=0, atol=0) if index < 3 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, results[0][0], **tol)
        for got, want in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(got, want, **tol)


def test_empty_sequences_match_naive_loop():
    """Zero-length rows own no tokens; both backends agree with the naive loop around them."""
    q, k, v, offsets, ts, pw, tw = _batch([0, 3, 0, 6, 1, 0], seed=4)
    with torch.no_grad():
        naive = _naive(q, k, v, offsets, ts, pw, tw, 0.7, None)
        for backend in ("reference", "jagged"):
            out = hstu_attention(
                q,
                k,
                v,
                offsets,
                ts,
                pw,
                tw,
                max_seq_len=MAX_LEN,
                alpha=0.7,
                denominator=None,
                backend=backend,
            )
            torch.testing.assert_close(out, naive, rtol=1e-5, atol=1e-6)


def test_plan_for_other_inputs_is_rejected():
    q, k, v, offsets, ts, pw, tw = _batch([3, 5])
    kw = dict(max_seq_len=MAX_LEN, alpha=1.0, denominator=None)
    plan = plan_attention(offsets, ts, max_seq_len=MAX_LEN, num_time_buckets=128, backend="jagged")
    with pytest.raises(ValueError, match="backend"):
        hstu_attention(q, k, v, offsets, ts, pw, tw, backend="reference", plan=plan, **kw)
    with pytest.raises(ValueError, match="offsets/timestamps"):
        hstu_attention(q, k, v, offsets, ts + 1, pw, tw, backend="jagged", plan=plan, **kw)
    with pytest.raises(ValueError, match="offsets/timestamps"):
        hstu_attention(q, k, v, torch.tensor([0, 4, 8]), ts, pw, tw, backend="jagged", plan=plan, **kw)


@pytest.mark.parametrize("backend", ["reference", "jagged"])
@pytest.mark.parametrize(("offsets", "found"), [([2, 5, 8], "first offset 2, last 8"), ([0, 3, 7], "last 7")])
def test_rejects_offsets_that_leave_tokens_out(backend, offsets, found):
    """Every token must lie in a sequence (as the Triton plan requires too)."""
    q, k, v, _, ts, pw, tw = _batch([3, 5])
    with pytest.raises(ValueError, match=f"start at 0 and end at T=8.*{found}"):
        hstu_attention(
            q, k, v, torch.tensor(offsets), ts, pw, tw, max_seq_len=MAX_LEN, alpha=1.0, denominator=None,
            backend=backend,
        )  # fmt: skip


def test_rejects_sequence_longer_than_max_len():
    q, k, v, offsets, ts, pw, tw = _batch([3, 5])
    with pytest.raises(ValueError, match="max_seq_len"):
        hstu_attention(q, k, v, offsets, ts, pw[:7], tw, max_seq_len=4, alpha=1.0, denominator=None)
    with pytest.raises(ValueError, match="unknown backend"):
        hstu_attention(
            q, k, v, offsets, ts, pw, tw, max_seq_len=MAX_LEN, alpha=1.0, denominator=None, backend="nope"
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
    ts = torch.arange(int(offsets[-1])) * 977
    outs = {}
    for backend in ("reference", "jagged"):
        config.attention_backend = backend
        out = encoder(x, offsets, ts)
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
    ts = torch.arange(int(offsets[-1])) * 3571
    plans = []
    build = tri.plan_triton_attention
    monkeypatch.setattr(tri, "plan_triton_attention", lambda *a, **k: plans.append(1) or build(*a, **k))
    outs = {}
    for backend in ("jagged", "triton"):
        config.attention_backend = backend
        out = encoder(x, offsets, ts)
        outs[backend] = (out, torch.autograd.grad(out.pow(3).sum(), [x, *encoder.parameters()]))
    assert len(plans) == 1
    torch.testing.assert_close(outs["triton"][0], outs["jagged"][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(outs["triton"][1], outs["jagged"][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_causality_future_tokens_do_not_change_past_outputs():
    config = ModelConfig(
        embedding_dim=16, num_blocks=2, num_heads=2, qk_dim=4, v_dim=4, max_seq_len=20, dropout=0.0
    )
    encoder = HSTUEncoder(config).eval()
    x = torch.randn(10, 16)
    ts = torch.arange(10) * 60
    full = encoder(x, torch.tensor([0, 10]), ts)
    x2 = x.clone()
    x2[7:] = torch.randn(3, 16)
    changed = encoder(x2, torch.tensor([0, 10]), ts)
    # Position i's time bias reads t_{i+1} (next event time), never the item at i+1.
    torch.testing.assert_close(changed[:7], full[:7])
    assert not torch.allclose(changed[7:], full[7:])
