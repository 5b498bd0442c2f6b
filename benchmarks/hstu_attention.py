"""GPU benchmark (and correctness check) of HSTU attention: fused Triton kernel vs SDPA vs padded PyTorch.

    python benchmarks/hstu_attention.py            # benchmark, ends with a RESULT line
    python benchmarks/hstu_attention.py --check    # triton vs padded reference, bf16 and fp32, on the GPU
    python benchmarks/hstu_attention.py --profile-once   # one tuned fwd+bwd for Nsight Compute

Shapes: H=4, d=128, bf16; (B=64, lengths uniform in [512, 1024]) and (B=16, lengths in [2048, 4096]).
Triton calls share one `plan_triton_attention` per batch, as the encoder's layers do (its time is printed
apart), and each Triton row also prints its kernels' GPU time (torch profiler), so host overhead shows.
`triton` reads rab(i, j) from the bias buffer that one fill kernel writes per call (the GPU default);
`triton_inline_bias` computes it per pair and head inside the kernels instead; `triton_frozen_bias` times
the backward without the bias-weight gradients (what their reduction costs); `triton` reduces those once
over all heads from a ds buffer that dk/dv writes, `triton_fused_bias_grad` per head inside dk/dv;
`triton` gets dq from that ds buffer, `triton_dq_recompute` from a kernel that recomputes ds, and
`triton_dq_atomic` has dk/dv add dq up with atomics instead; `triton_gluon_dkdv` and `triton_gluon_fwd`
run dk/dv or the forward as the warp-specialised Gluon kernels of `modules.hstu_attention_gluon` (their
kernels lists show whether they ran).
Useful FLOPs count causal pairs on real tokens only: fwd = 2 * pairs * H * (Dqk + Dv), fwd+bwd = 3.5 x fwd
(the FlashAttention convention, recomputation not counted). SDPA runs on the padded batch (causal softmax,
a speed yardstick, not the same math). Imports only torch/triton and the attention modules, so it
runs where fbgemm/torchrec are absent.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_NOTE = "H100/H200 SXM dense bf16 peak is about 989 TFLOP/s"
SHAPES = [("B16_L4096", 16, 2048, 4096), ("B64_L1024", 64, 512, 1024)]
"""(name, sequences, shortest, longest) of the benchmark batches; the target's shape (L <= 4096) first."""


class Stopped(BaseException):
    """SIGTERM arrived (gpu_check.sh's `timeout`): raised in the main thread between Python steps, and a
    BaseException so that the per-row `except Exception` handlers let it through to the RESULT line."""


@contextlib.contextmanager
def stop_on_sigterm():
    """Turn SIGTERM into `Stopped` while the check or benchmark runs, so that a stage cut short by its time
    limit still prints the results it has (and says where it stopped) instead of dying without a RESULT."""

    def stop(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Progress:
    """Where a check or benchmark is (`at`), for the RESULT line of a run that `Stopped` there."""

    at = "setup"


def require_cuda() -> None:
    if not torch.cuda.is_available():
        sys.exit(
            f"{Path(sys.argv[0]).name}: no CUDA device available (torch {torch.__version__})."
            " This benchmark needs a GPU;"
            " the kernel's CPU tests: `pytest tests/test_hstu_attention_triton.py`."
        )


def make_batch(num_seqs, min_len, max_len, *, heads, dqk, dv, max_seq_len, dtype, device, seed=0, log_gap=14):
    """Random jagged batch: q/k/v [T, H, D], offsets [B+1], chronological timestamps and their query times
    (`query_times`), bias weights.

        Gaps are exp(U(0, log_gap)) seconds: 14 gives 1 s to 14 days (about 1 day on average); 22 makes
        sequences span more than 2**31 s, so the kernels take their int64 timestamp path.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num_seqs,), generator=g)
    offsets = torch.zeros(num_seqs + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    total = int(offsets[-1])
    q = torch.randn(total, heads, dqk, generator=g) * 0.3
    k = torch.randn(total, heads, dqk, generator=g) * 0.3
    v = torch.randn(total, heads, dv, generator=g)
    gaps = torch.exp(torch.rand(total, generator=g) * log_gap).long()
    ts = 1_600_000_000 + gaps.cumsum(0)
    pos_w = torch.randn(2 * max_seq_len - 1, generator=g) * 0.1
    time_w = torch.randn(129, generator=g) * 0.1
    cast = [x.to(device=device, dtype=dtype) for x in (q, k, v)]
    tq = query_times(ts, offsets)
    return (
        *cast,
        offsets.to(device),
        ts.to(device),
        tq.to(device),
        pos_w.to(device),
        time_w.to(device),
        lengths,
    )


def query_times(ts, offsets):
    """Each position's next timestamp, and at a sequence's last position its target's, a day later."""
    from modules.hstu_attention import next_timestamps

    tq = next_timestamps(ts, offsets)
    tq[offsets[1:][offsets[1:] > offsets[:-1]] - 1] += 86_400
    return tq


def padded_reference(
    q, k, v, offsets, timestamps, query_times, pos_w, time_w, *, max_seq_len, alpha, denominator
):
    """Padded pure-PyTorch HSTU attention ([B, H, N, N] scores), same math as the `reference` backend."""
    lengths = offsets[1:] - offsets[:-1]
    n = int(lengths.max())
    pos = torch.arange(n, device=q.device)
    valid = pos[None, :] < lengths[:, None]
    index = torch.where(valid, offsets[:-1, None] + pos[None, :], 0)
    vmask = valid[:, :, None, None].to(q.dtype)
    qp, kp, vp = q[index] * vmask, k[index] * vmask, v[index] * vmask  # [B, N, H, D]
    ts = torch.where(valid, timestamps[index], 0)
    tq = torch.where(valid, query_times[index], 0)
    scores = torch.einsum("bihd,bjhd->bhij", qp, kp) * alpha
    rel = pos[None, :] - pos[:, None] + (max_seq_len - 1)
    dt = (tq[:, :, None] - ts[:, None, :]).abs().clamp(min=1).to(torch.float32)
    bucket = (torch.log(dt) / 0.301).long().clamp(0, time_w.numel() - 1)
    rab = pos_w[rel][None] + time_w[bucket]
    scores = scores + rab[:, None].to(scores.dtype)
    mask = ((pos[None, :] <= pos[:, None])[None] & valid[:, None, :] & valid[:, :, None])[:, None]
    den = lengths.to(q.dtype)[:, None, None, None] if denominator is None else float(denominator)
    attn = torch.where(mask, F.silu(scores), 0.0) / den
    out = torch.einsum("bhij,bjhd->bihd", attn.to(vp.dtype), vp)
    return out[valid]


def causal_flops(lengths, heads, dqk, dv) -> tuple[float, float]:
    """(fwd, fwd+bwd) useful FLOPs on real tokens."""
    pairs = float((lengths * (lengths + 1) // 2).sum())
    fwd = 2.0 * pairs * heads * (dqk + dv)
    return fwd, 3.5 * fwd


def bench(fn, *, warmup=3, iters=10) -> float:
    """Median milliseconds of fn() on the current CUDA stream (wall clock without a GPU: smoke runs)."""
    if not torch.cuda.is_available():  # one call: the harness's smoke run, not a timing
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Variant(NamedTuple):
    """One kernel path: the module's pins (`_RAB_TILES`, `_TABLE_GATHER`, `_DS_BUFFER`, `_DQ_SOURCE`,
    `_DKDV_IMPL`, `_FWD_IMPL`) and a transient-buffer budget in bytes (None: the module's)."""

    rab_tiles: bool | None
    table_gather: bool | None
    ds_buffer: bool | None
    dq_source: str = "ds_buffer"
    dkdv: str = "triton"
    fwd: str = "triton"
    budget: int | None = None


VARIANTS = {
    "rab_buffer": Variant(True, None, None),
    "rab_buffer_dq_recompute": Variant(True, None, None, dq_source="recompute"),
    "rab_buffer_dq_atomic": Variant(True, None, None, dq_source="atomic"),
    "rab_buffer_gluon_dkdv": Variant(True, None, None, dkdv="gluon"),
    "rab_buffer_gluon_fwd": Variant(True, None, None, fwd="gluon"),
    "rab_buffer_runs": Variant(None, None, None, budget=2**20),
    "rab_buffer_fused_grad": Variant(True, None, False),
    "inline_global": Variant(False, False, False),
    "inline_table_gather": Variant(False, True, False),
}
"""The GPU default reads rab(i, j) from the bias buffer, and dk/dv hands ds to one reduction over all heads
for the bias-weight gradients and to the dq kernel (ds buffer); `dq_recompute` runs a dq kernel that
recomputes ds instead, `dq_atomic` has dk/dv add dq up; `gluon_dkdv` and `gluon_fwd` run dk/dv or the
forward as the warp-specialised Gluon kernels of `modules.hstu_attention_gluon` (sm_90 and bf16/fp16 only:
elsewhere they are the default path);
`runs` gives the buffers 1 MiB, so the check's batches run as several runs of sequences with the ds of one
or two heads at a time; `fused_grad` reduces the bias gradients per head inside dk/dv; inline, each kernel
computes rab per pair and head, its time-table lookup a global or a table gather."""
PINS = (
    "_RAB_TILES",
    "_TABLE_GATHER",
    "_DS_BUFFER",
    "_DQ_SOURCE",
    "_DKDV_IMPL",
    "_FWD_IMPL",
    "_RAB_MEMORY_FRACTION",
)


@contextlib.contextmanager
def kernel_variant(name: str):
    """Pin the kernels to one path (the defaults pick per memory budget and shape)."""
    from modules import hstu_attention_triton as mod

    saved = [getattr(mod, pin) for pin in PINS]
    variant = VARIANTS[name]
    mod._RAB_TILES, mod._TABLE_GATHER, mod._DS_BUFFER, mod._DQ_SOURCE, mod._DKDV_IMPL, mod._FWD_IMPL = (
        variant[:6]
    )
    if variant.budget is not None and torch.cuda.is_available():
        mod._RAB_MEMORY_FRACTION = variant.budget / torch.cuda.get_device_properties(0).total_memory
    try:
        yield
    finally:
        for pin, value in zip(PINS, saved, strict=True):
            setattr(mod, pin, value)


CONFIG_LISTS = ("_FWD_CONFIGS", "_DKDV_CONFIGS", "_FILL_CONFIGS", "_RAB_GRAD_CONFIGS", "_DQ_DS_CONFIGS")
"""The autotuned config lists: forward/dq, dk/dv, bias fill, ds reduction, dq from ds."""


@contextlib.contextmanager
def pinned_configs(*configs):
    """Autotune over one config per kernel (one per CONFIG_LISTS entry): runs exactly those."""
    from modules import hstu_attention_triton as mod

    saved = [getattr(mod, name) for name in CONFIG_LISTS]
    for name, config in zip(CONFIG_LISTS, configs, strict=True):
        setattr(mod, name, [config])
    mod._autotuned_kernels.cache_clear()
    mod._autotuned_buffer_kernels.cache_clear()
    try:
        yield
    finally:
        for name, configs_before in zip(CONFIG_LISTS, saved, strict=True):
            setattr(mod, name, configs_before)
        mod._autotuned_kernels.cache_clear()
        mod._autotuned_buffer_kernels.cache_clear()


def config_sets(variant: str) -> list[tuple]:
    """Config sets (one per CONFIG_LISTS entry) that together cover every config the autotuner may run in
    a variant."""
    from modules import hstu_attention_triton as mod

    pins = VARIANTS[variant]
    flags = dict(RAB_TILES=pins.rab_tiles, RAB_GRAD=True, DS_STORE=pins.ds_buffer is not False)
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
    tma = None if hopper or mod._INTERPRET else False  # TMA configs only where the device has TMA

    def tuned(configs):
        return mod._prune_configs(mod._lookup_configs(configs, pins.table_gather, tma), {}, **flags)

    lists = (
        tuned(mod._FWD_CONFIGS), tuned(mod._DKDV_CONFIGS), mod._FILL_CONFIGS, mod._RAB_GRAD_CONFIGS,
        mod._DQ_DS_CONFIGS,
    )  # fmt: skip
    return [tuple(c[i % len(c)] for c in lists) for i in range(max(map(len, lists)))]


def run_check(
    device: str = "cuda", small: bool = False, all_configs: bool = False, variants: list[str] | None = None
) -> bool:
    """Triton vs the padded reference, forward and all five gradients, bf16 and fp32, in each kernel variant
    (VARIANTS); one case has timestamps spanning more than 2**31 s (the int64 path). The first bf16 case
    (the benchmark's head dims) also runs every autotune config of the GPU default (the bias buffer), not
    just the one the autotuner picks; `all_configs`: of every variant. `variants`: only these (default: all
    of VARIANTS). Ends with a RESULT line, also when `Stopped` (which fails the check)."""
    variants = list(VARIANTS) if variants is None else variants
    progress, stopped = Progress(), ""
    try:
        ok = check_cases(device, small, all_configs, variants, progress)
    except Stopped as why:  # the time limit: the cases checked so far are printed above
        ok, stopped = False, f"; INCOMPLETE: stopped by {why} during {progress.at}"
    print(
        f"RESULT check: {'PASS' if ok else 'FAIL'} (triton vs padded reference, bf16 and fp32, "
        f"variants {', '.join(variants)}, every autotune config of "
        f"{'each variant' if all_configs else 'rab_buffer'}, int32 and int64 timestamps){stopped}"
    )
    return ok


def check_cases(device: str, small: bool, all_configs: bool, variants: list[str], progress: Progress) -> bool:
    """`run_check`'s cases, each printed as it is checked; True when every one passes."""
    from modules.hstu_attention_triton import triton_hstu_attention

    ok = True
    cases = [
        # (dtype, num_seqs, min_len, max_len, heads, dqk, dv, denominator, rtol, log_gap, every config)
        (torch.float32, 7, 1, 300, 2, 32, 16, None, 2e-4, 14, False),
        (torch.float32, 5, 1, 200, 4, 16, 16, 200.0, 2e-4, 22, False),
        (torch.bfloat16, 6, 1, 700, 4, 128, 128, None, 3e-2, 14, True),
        (torch.bfloat16, 16, 1, 50, 4, 16, 16, 50.0, 3e-2, 22, False),
    ]
    if small:  # CPU smoke run under TRITON_INTERPRET=1, which ignores configs: the sweep runs the harness
        cases = [
            (torch.float32, 3, 1, 40, 2, 16, 16, None, 2e-4, 14, False),
            (torch.float16, 3, 1, 40, 2, 16, 16, 40.0, 3e-2, 22, True),
        ]
    names = ("out", "dq", "dk", "dv", "d_pos_weights", "d_time_weights")
    for dtype, b, lo, hi, heads, dqk, dv, den, rtol, log_gap, every_config in cases:
        n = hi
        q, k, v, offsets, ts, tq, pos_w, time_w, lengths = make_batch(
            b, lo, hi, heads=heads, dqk=dqk, dv=dv, max_seq_len=n, dtype=dtype, device=device, seed=b,
            log_gap=log_gap,
        )  # fmt: skip
        lengths[0] = 1  # always include a length-1 sequence
        offsets[1:] = lengths.to(device).cumsum(0)
        total = int(offsets[-1])
        q, k, v, ts = q[:total], k[:total], v[:total], ts[:total]
        tq = query_times(ts, offsets)
        kw = dict(max_seq_len=n, alpha=1.0 / math.sqrt(dqk), denominator=den)
        grad = torch.randn(total, heads, dv, device=device, dtype=torch.float64)
        ref = [x.detach().double().requires_grad_(True) for x in (q, k, v, pos_w, time_w)]
        expect = padded_reference(ref[0], ref[1], ref[2], offsets, ts, tq, ref[3], ref[4], **kw)
        expect.backward(grad)
        expected = [expect.detach()] + [r.grad for r in ref]
        runs = [(variant, None) for variant in variants]
        if every_config:
            swept = variants if all_configs else [v for v in variants if v == "rab_buffer"]
            # The interpreter ignores configs: there one config set runs the sweep's code, not each config.
            sets = {variant: config_sets(variant)[: 1 if small else None] for variant in swept}
            runs += [(variant, configs) for variant in swept for configs in sets[variant]]
        for variant, configs in runs:
            tri = [x.detach().clone().requires_grad_(True) for x in (q, k, v, pos_w, time_w)]
            pinned = pinned_configs(*configs) if configs else contextlib.nullcontext()
            label = "autotuned" if configs is None else " | ".join(config_label(c) for c in configs)
            progress.at = f"{variant} {label} {str(dtype).split('.')[-1]} L<={hi}"
            try:
                with kernel_variant(variant), pinned:
                    out = triton_hstu_attention(tri[0], tri[1], tri[2], offsets, ts, tq, tri[3], tri[4], **kw)
                    out.backward(grad.to(out.dtype))
            except Exception as err:  # one broken path must not hide the others' results from a GPU session
                ok = False
                print(f"check {variant:19s} {label:62s} {str(dtype).split('.')[-1]:8s} FAIL: {failure(err)}")
                continue
            for name, a, r in zip(names, [out] + [x.grad for x in tri], expected, strict=True):
                err = (a.double() - r).abs().max().item()
                scale = r.abs().max().item()
                good = math.isfinite(err) and err <= rtol * scale + 1e-6
                ok &= good
                print(
                    f"check {variant:19s} {label:62s} {str(dtype).split('.')[-1]:8s} B={b} L<={hi} H={heads} "
                    f"dqk={dqk} dv={dv} den={den} gaps<=e^{log_gap}: {name:15s} max err {err:.3e} "
                    f"(scale {scale:.3e}) {'ok' if good else 'FAIL'}",
                    flush=True,
                )
                if not good and a.dim() == 3:
                    print(f"  where {name} is wrong: {where_wrong(a, r, offsets, rtol * scale + 1e-6)}")
    return ok


def where_wrong(actual: torch.Tensor, expected: torch.Tensor, offsets: torch.Tensor, tol: float) -> str:
    """Where a per-token result ([T, H, D]) is off by more than tol, so that one GPU run localises a
    kernel's bug: how many (token, head) rows, by head, by 64-row half of their 128-row block (a Gluon
    program's two consumer warpgroups), in or before the sequence's last block, and the first such row."""
    err = (actual.double() - expected).abs().amax(dim=2).cpu()  # [T, H]
    bad = ~(err <= tol)  # NaN counts as wrong
    if not bad.any():
        return "no row over the tolerance"
    offsets = offsets.cpu()
    tokens, heads = bad.nonzero(as_tuple=True)
    seq = torch.searchsorted(offsets, tokens, right=True) - 1
    pos, length = tokens - offsets[seq], offsets[seq + 1] - offsets[seq]
    half = (pos % 128) // 64
    last = pos // 128 == (length - 1) // 128
    by_head = ", ".join(f"{h}: {int((heads == h).sum())}" for h in range(err.shape[1]))
    return (
        f"{int(bad.sum())} of {bad.numel()} (token, head) rows; by head {by_head}; in the first/second 64 "
        f"rows of a 128-row block {int((half == 0).sum())}/{int((half == 1).sum())}; in the sequence's last "
        f"128-row block {int(last.sum())}, before it {int((~last).sum())}; first: sequence {int(seq[0])} "
        f"position {int(pos[0])} of {int(length[0])}, head {int(heads[0])}"
    )


def config_label(config) -> str:
    from modules.hstu_attention_triton import _tile

    gather = " gather" if config.kwargs.get("TABLE_GATHER") else ""
    tma = " tma" if config.kwargs.get("TMA") else ""
    loop = f" loop{config.kwargs['LOOP_STAGES']}" if "LOOP_STAGES" in config.kwargs else ""
    tile = "x".join(map(str, _tile(config)))
    return f"{tile} w{config.num_warps} s{config.num_stages}{gather}{tma}{loop}"


@contextlib.contextmanager
def config_times():
    """Print every config's time whenever an autotuner tunes (Triton prints only the winner): which tiles,
    and whether TMA, come close is what the next tuning pass needs to know."""
    from triton.runtime.autotuner import Autotuner

    tune = Autotuner.run

    def run(self, *args, **kwargs):
        before = getattr(self, "configs_timings", None)
        out = tune(self, *args, **kwargs)
        timings = getattr(self, "configs_timings", None)
        if timings is not None and timings is not before:
            ranked = sorted(timings.items(), key=lambda item: item[1][0])
            listed = ", ".join(f"{config_label(c)} {t[0]:.3f}" for c, t in ranked)
            print(f"  tuned {self.base_fn.__name__} (ms, best first): {listed}", flush=True)
        return out

    Autotuner.run = run
    try:
        yield
    finally:
        Autotuner.run = tune


@contextlib.contextmanager
def parallel_compile(workers: int | None = None):
    """Compile all the configs an autotuner is about to time at once, on `workers` threads (default: one a
    CPU), before it launches them one by one. Triton compiles a config at its first launch, so autotuning
    otherwise compiles serially: a cold gpu_check.sh spent most of its minutes there. Its compiler releases
    the GIL: 16 sm_90 dk/dv configs took 15.7 s on one thread and 7.4-8.8 s on two (a 2-core machine). A
    config that fails to compile fails again, and is reported, at its own launch."""
    from concurrent.futures import ThreadPoolExecutor

    from triton import AsyncCompileMode
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs

    def prune_then_compile(self, kwargs):  # only called when a new key is about to be tuned
        configs = prune(self, kwargs)
        if len(configs) > 1:
            args = list(self.nargs.values())
            with (
                ThreadPoolExecutor(workers or os.cpu_count()) as pool,
                AsyncCompileMode(pool, ignore_errors=True),
            ):
                for config in configs:
                    self.fn.run(*args, **{**kwargs, "warmup": True}, **config.all_kwargs())
        return configs

    Autotuner.prune_configs = prune_then_compile
    try:
        yield
    finally:
        Autotuner.prune_configs = prune


def kernel_ms(fn, iters: int = 3) -> dict[str, float]:
    """GPU time per call of fn by kernel name (torch profiler), to separate kernel time from host overhead."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_time_total > 0:
            times[event.key] = times.get(event.key, 0.0) + event.device_time_total / 1000.0 / iters
    return times


def kernel_summary(times: dict[str, float]) -> str:
    """'total: fill a, fwd b, ...' for the Triton kernels of one call, in ms."""
    named = {
        "_hstu_rab_fill_kernel": "fill", "_hstu_fwd_kernel": "fwd", "_hstu_bwd_dkdv_kernel": "dkdv",
        "_hstu_bwd_dq_kernel": "dq", "_hstu_bwd_dq_ds_kernel": "dq_ds", "_hstu_rab_grad_kernel": "rab_grad",
    }  # fmt: skip
    parts = [f"{short} {times[name]:.3f}" for name, short in named.items() if name in times]
    return f"{sum(times.values()):.3f} ms on the GPU ({', '.join(parts)}; rest: memsets, casts)"


def failure(err: Exception) -> str:
    """One line naming an exception, for a row that failed."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first[:300]}"


def run_benchmark(skip_padded: bool, device: str = "cuda", shapes=SHAPES, leave_out=()) -> list[str]:
    """The benchmark table and RESULT line, and the rows that failed (each is reported and skipped, so one
    broken kernel path leaves the others' numbers; a run `Stopped` by its time limit ends with the rows it
    timed, and counts as failed); device="cpu" with tiny shapes is the smoke run; `leave_out`: row labels
    not to run."""
    summary, failed, progress, stopped = {}, [], Progress(), ""
    try:
        bench_shapes(skip_padded, device, shapes, summary, failed, progress, leave_out)
    except Stopped as why:  # the time limit: the rows timed so far still make the RESULT line
        failed.append(f"stopped during {progress.at}")
        stopped = f"; INCOMPLETE: stopped by {why} during {progress.at}, later rows not timed"

    def rates(row):  # fwd+bwd TFLOP/s at (B64, L<=1024) and (B16, L<=4096); 0 where not timed
        return [summary.get((shape, row), 0.0) for shape in ("B64_L1024", "B16_L4096")]

    tri, sdpa = rates("triton"), rates("sdpa_causal_padded")
    others = [
        ("gluon dk/dv", "triton_gluon_dkdv"), ("gluon fwd", "triton_gluon_fwd"),
        ("dq recompute", "triton_dq_recompute"),
        ("dq atomic", "triton_dq_atomic"), ("fused bias grad", "triton_fused_bias_grad"),
        ("inline bias", "triton_inline_bias"), ("sdpa", "sdpa_causal_padded"),
    ]  # fmt: skip
    beats = all(t > s for t, s in zip(tri, sdpa, strict=True))
    print(
        f"RESULT hstu_attention fwd+bwd TFLOP/s on "
        f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter smoke run)'}: "
        f"triton {tri[0]:.1f} (B64,L<=1024) {tri[1]:.1f} (B16,L<=4096); "
        + "".join(f"{label} {rates(row)[0]:.1f} / {rates(row)[1]:.1f}; " for label, row in others)
        + f"target 400 at L<=4096: {'met' if tri[1] >= 400 else 'not met'}; "
        f"beats sdpa at both shapes: {'yes' if beats else 'no'}; failed rows: {','.join(failed) or 'none'}"
        f"{stopped}"
    )
    return failed


def bench_shapes(
    skip_padded: bool, device: str, shapes, summary: dict, failed: list, progress: Progress, leave_out=()
):
    """`run_benchmark`'s table: fills summary[(shape, row)] with fwd+bwd TFLOP/s and failed with the rows
    that raised, printing each row as it is timed."""
    from modules.hstu_attention_triton import plan_triton_attention, triton_hstu_attention

    heads, d = 4, 128
    for name, b, lo, hi in shapes:
        q, k, v, offsets, ts, tq, pos_w, time_w, lengths = make_batch(
            b, lo, hi, heads=heads, dqk=d, dv=d, max_seq_len=hi, dtype=torch.bfloat16, device=device
        )
        fwd_flops, total_flops = causal_flops(lengths, heads, d, d)
        alpha = 1.0 / math.sqrt(d)
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, pos_w, time_w)]
        grad = torch.randn_like(v)
        # One plan per batch, as HSTUEncoder shares it by its layers; its cost is printed on its own.
        plan_ms = bench(lambda o=offsets, t=ts, u=tq, n=hi: plan_triton_attention(o, t, u, max_seq_len=n))
        plan = plan_triton_attention(offsets, ts, tq, max_seq_len=hi)
        kw = dict(max_seq_len=hi, alpha=alpha, denominator=float(hi), plan=plan)

        def tri_fwd(leaves=leaves, offsets=offsets, ts=ts, tq=tq, kw=kw):
            with torch.no_grad():
                return triton_hstu_attention(*leaves[:3], offsets, ts, tq, *leaves[3:], **kw)

        def tri_step(leaves=leaves, offsets=offsets, ts=ts, tq=tq, kw=kw, grad=grad):
            out = triton_hstu_attention(*leaves[:3], offsets, ts, tq, *leaves[3:], **kw)
            torch.autograd.grad(out, leaves, grad)

        # SDPA: padded dense [B, H, N, d] causal softmax attention on the same real lengths.
        n = int(lengths.max())
        qp = torch.randn(b, heads, n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        kp = torch.randn_like(qp, requires_grad=True)
        vp = torch.randn_like(qp, requires_grad=True)
        gp = torch.randn_like(qp)

        def sdpa_fwd(qp=qp, kp=kp, vp=vp):
            with torch.no_grad():
                return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)

        def sdpa_step(qp=qp, kp=kp, vp=vp, gp=gp):
            out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
            torch.autograd.grad(out, (qp, kp, vp), gp)

        def tri_step_frozen_bias(leaves=leaves, offsets=offsets, ts=ts, tq=tq, kw=kw, grad=grad):
            bias = [w.detach() for w in leaves[3:]]
            out = triton_hstu_attention(*leaves[:3], offsets, ts, tq, *bias, **kw)
            torch.autograd.grad(out, leaves[:3], grad)

        def pinned(variant, fn):
            def run():
                with kernel_variant(variant):
                    fn()

            return run

        rows = [  # the default and its yardstick first: a run cut short by its time limit keeps them
            ("triton", tri_fwd, tri_step),
            ("sdpa_causal_padded", sdpa_fwd, sdpa_step),
            ("triton_gluon_dkdv", tri_fwd, pinned("rab_buffer_gluon_dkdv", tri_step)),
            (
                "triton_gluon_fwd",
                pinned("rab_buffer_gluon_fwd", tri_fwd),
                pinned("rab_buffer_gluon_fwd", tri_step),
            ),
            ("triton_frozen_bias", tri_fwd, tri_step_frozen_bias),
            ("triton_dq_recompute", tri_fwd, pinned("rab_buffer_dq_recompute", tri_step)),
            ("triton_dq_atomic", tri_fwd, pinned("rab_buffer_dq_atomic", tri_step)),
            ("triton_fused_bias_grad", tri_fwd, pinned("rab_buffer_fused_grad", tri_step)),
            ("triton_inline_bias", pinned("inline_global", tri_fwd), pinned("inline_global", tri_step)),
        ]
        if not skip_padded:
            ref_kw = dict(max_seq_len=hi, alpha=alpha, denominator=float(hi))

            def ref_fwd(leaves=leaves, offsets=offsets, ts=ts, tq=tq, kw=ref_kw):
                with torch.no_grad():
                    return padded_reference(*leaves[:3], offsets, ts, tq, *leaves[3:], **kw)

            def ref_step(leaves=leaves, offsets=offsets, ts=ts, tq=tq, kw=ref_kw, grad=grad):
                out = padded_reference(*leaves[:3], offsets, ts, tq, *leaves[3:], **kw)
                torch.autograd.grad(out, leaves, grad)

            rows.append(("padded_reference", ref_fwd, ref_step))
        print(
            f"== {name}: B={b} lengths {lo}-{hi} (T={int(lengths.sum())}) H={heads} d={d} bf16; "
            f"useful GFLOP fwd {fwd_flops / 1e9:.1f}, fwd+bwd {total_flops / 1e9:.1f}; "
            f"triton plan (once per batch, shared by layers) {plan_ms:.3f} ms",
            flush=True,
        )
        for label, fwd, step in (row for row in rows if row[0] not in leave_out):
            progress.at = f"{name}/{label}"
            try:
                fwd_ms = bench(fwd, warmup=2 if label == "padded_reference" else 3)
                step_ms = bench(step, warmup=2 if label == "padded_reference" else 3, iters=5 if label ==
                                "padded_reference" else 10)  # fmt: skip
            except torch.OutOfMemoryError:
                print(f"  {label:22s} out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            except Exception as err:
                print(f"  {label:22s} FAILED: {failure(err)}", flush=True)
                failed.append(f"{name}/{label}")
                continue
            tf_fwd = fwd_flops / fwd_ms / 1e9
            tf_step = total_flops / step_ms / 1e9
            summary[(name, label)] = tf_step
            print(
                f"  {label:22s} fwd {fwd_ms:8.3f} ms {tf_fwd:7.1f} TFLOP/s | fwd+bwd {step_ms:8.3f} ms "
                f"{tf_step:7.1f} TFLOP/s",
                flush=True,
            )
            if label.startswith("triton") and device == "cuda":
                print(f"  {'':22s} fwd+bwd kernels: {kernel_summary(kernel_ms(step))}", flush=True)
            torch.cuda.empty_cache()
        del qp, kp, vp, leaves


def run_profile_once() -> None:
    """One fwd+bwd at (B=16, L<=4096) inside cudaProfilerStart/Stop, after an autotuning pass, for
    `ncu --profile-from-start off` (gpu_check.sh): only the three tuned kernels are profiled."""
    from modules.hstu_attention_triton import triton_hstu_attention

    q, k, v, offsets, ts, tq, pos_w, time_w, _ = make_batch(
        16, 2048, 4096, heads=4, dqk=128, dv=128, max_seq_len=4096, dtype=torch.bfloat16, device="cuda"
    )
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, pos_w, time_w)]
    kw = dict(max_seq_len=4096, alpha=1.0 / math.sqrt(128), denominator=4096.0)

    def step():
        out = triton_hstu_attention(*leaves[:3], offsets, ts, tq, *leaves[3:], **kw)
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="correctness check instead of the benchmark")
    parser.add_argument(
        "--all-configs", action="store_true", help="--check runs every autotune config of every variant"
    )
    parser.add_argument("--skip-padded", action="store_true", help="leave out the padded PyTorch reference")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny --check and benchmark on CPU (TRITON_INTERPRET=1)"
    )
    parser.add_argument("--profile-once", action="store_true", help="one tuned fwd+bwd, for ncu")
    parser.add_argument(
        "--variants", type=lambda names: names.split(","), help="--check only these variants (comma list)"
    )
    parser.add_argument(
        "--without-gluon", type=lambda names: set(names.split(",")), default=set(),
        help="leave these Gluon kernels (fwd, dkdv) out of the check and the benchmark (gpu_check.sh: those "
        "its first check failed)",
    )  # fmt: skip
    args = parser.parse_args()
    variants = args.variants or list(VARIANTS)
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if unknown := sorted(args.without_gluon - {"fwd", "dkdv"}):
        parser.error(f"--without-gluon: unknown {', '.join(unknown)}; known: fwd, dkdv")
    dropped = {
        name
        for name, pins in VARIANTS.items()
        if any(getattr(pins, k) == "gluon" for k in args.without_gluon)
    }
    variants = [v for v in variants if v not in dropped]
    if args.cpu_smoke:
        with stop_on_sigterm():
            ok = run_check("cpu", small=True)
            failed = run_benchmark(skip_padded=False, device="cpu", shapes=[("B64_L1024", 2, 1, 20)])
        sys.exit(0 if ok and not failed else 1)
    require_cuda()
    if args.profile_once:
        with parallel_compile():
            run_profile_once()
        return
    with stop_on_sigterm(), parallel_compile():
        if args.check:
            sys.exit(0 if run_check(all_configs=args.all_configs, variants=variants) else 1)
        with config_times():
            failed = run_benchmark(
                args.skip_padded, leave_out={f"triton_gluon_{k}" for k in args.without_gluon}
            )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
