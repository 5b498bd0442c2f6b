"""A full dense HSTU training step on one GPU: tokens/s and MFU, ending with a RESULT line.

    python benchmarks/hstu_step_gpu.py [--configs paper,large] [--attention triton,padded] [--steps 10]
    TRITON_INTERPRET=1 python benchmarks/hstu_step_gpu.py --cpu-smoke   # the harness on a tiny CPU config

paper: d=64, 4 blocks, 4 heads, d_qk=d_v=16, length 50, batch 128, 512 shared uniform negatives,
sampled softmax (temperature 0.05), AdamW lr 1e-3 betas (0.9, 0.98), dropout 0.5, bf16 autocast.
large: d=512, 8 blocks, 4 heads x 128, lengths uniform in [2048, 4096], batch 8, same loss/optimizer.
The item table is a plain nn.Embedding trained densely by AdamW (TorchRec's CUDA build cannot travel to
the GPU machine); the encoder and loss are the project's own `modules.hstu.HSTUEncoder` and
`modules.losses.sampled_softmax_loss`, which import without fbgemm_gpu or TorchRec.
MFU = model FLOPs (3 x forward matmul FLOPs, causal attention pairs on real tokens) / time / peak.
A configuration that fails (a kernel that does not compile, say) is reported and the others still run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hstu_attention import (  # noqa: E402
    Progress,
    Stopped,
    failure,
    parallel_compile,
    require_cuda,
    stop_on_sigterm,
)

from modules.config import ModelConfig  # noqa: E402
from modules.hstu import HSTUEncoder  # noqa: E402
from modules.losses import sampled_softmax_loss  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass(kw_only=True)
class StepConfig:
    name: str
    d: int
    blocks: int
    heads: int
    dqk: int
    dv: int
    min_len: int
    max_len: int
    batch: int
    negatives: int = 512
    temperature: float = 0.05
    num_items: int = 200_000
    dropout: float = 0.5


CONFIGS = {
    "paper": StepConfig(
        name="paper", d=64, blocks=4, heads=4, dqk=16, dv=16, min_len=50, max_len=50, batch=128
    ),
    "large": StepConfig(
        name="large",
        d=512,
        blocks=8,
        heads=4,
        dqk=128,
        dv=128,
        min_len=2048,
        max_len=4096,
        batch=8,
        dropout=0.0,
    ),
    "tiny": StepConfig(
        name="tiny",
        d=16,
        blocks=2,
        heads=2,
        dqk=8,
        dv=8,
        min_len=1,
        max_len=20,
        batch=3,
        negatives=8,
        num_items=50,
    ),
}
"""paper and large run on the GPU; tiny is the CPU smoke run's (the Triton backend in the interpreter)."""


def _encoder(cfg: StepConfig, attention: str) -> nn.Module:
    """modules.hstu.HSTUEncoder at this config; `padded` runs the padded `reference` attention backend."""
    mc = ModelConfig(
        embedding_dim=cfg.d, num_blocks=cfg.blocks, num_heads=cfg.heads, qk_dim=cfg.dqk, v_dim=cfg.dv,
        max_seq_len=cfg.max_len, dropout=cfg.dropout,
        attention_backend="triton" if attention == "triton" else "reference",
    )  # fmt: skip
    return HSTUEncoder(mc)


def model_flops(cfg: StepConfig, lengths: Tensor) -> float:
    """Forward matmul FLOPs of encoder + loss for one batch; a training step is 3x this."""
    tokens = float(lengths.sum())
    pairs = float((lengths * (lengths + 1) // 2).sum())
    h = cfg.heads
    per_layer = 2 * tokens * cfg.d * (2 * h * cfg.dv + 2 * h * cfg.dqk) + 2 * tokens * h * cfg.dv * cfg.d
    per_layer += 2 * pairs * h * (cfg.dqk + cfg.dv)
    loss = 2 * tokens * cfg.d * (cfg.negatives + 1)
    return cfg.blocks * per_layer + loss


def run(cfg: StepConfig, attention: str, steps: int, device: str = "cuda") -> dict:
    """Time `steps` training steps after 3 warm-up ones; prints and returns ms, tokens/s, MFU, peak memory."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    torch.manual_seed(0)
    encoder = _encoder(cfg, attention)
    table = nn.Embedding(cfg.num_items + 1, cfg.d, padding_idx=0)
    nn.init.normal_(table.weight, std=0.02)
    model = nn.ModuleDict({"encoder": encoder, "table": table}).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(cfg.min_len, cfg.max_len + 1, (cfg.batch,), generator=g)
    offsets = torch.zeros(cfg.batch + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    total = int(offsets[-1])
    items = torch.randint(1, cfg.num_items + 1, (total,), generator=g).to(device)
    targets = torch.randint(1, cfg.num_items + 1, (total,), generator=g).to(device)
    timestamps = 1_600_000_000 + torch.exp(torch.rand(total + 1, generator=g) * 14).long().cumsum(0)
    query_times = timestamps[1:].to(device)  # each position's target's time: the next event's
    timestamps = timestamps[:-1].to(device)
    offsets = offsets.to(device)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            x = model["encoder"](model["table"](items), offsets, timestamps, query_times)
            negatives = torch.randint(1, cfg.num_items + 1, (cfg.negatives,), device=device)
            loss = sampled_softmax_loss(
                x, targets, model["table"](targets), negatives, model["table"](negatives),
                temperature=cfg.temperature,
            )  # fmt: skip
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        loss = step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = 3 * model_flops(cfg, lengths)
    mfu = flops / sec / peak if peak else float("nan")
    mem_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    res = dict(ms=sec * 1e3, tokens_per_s=total / sec, mfu=mfu, loss=float(loss.detach()), mem_gib=mem_gib)
    of_peak = f"{peak / 1e12:.0f} TFLOP/s" if peak else "an unknown peak"
    print(
        f"[{cfg.name}/{attention}] T={total} tokens/step, {res['ms']:.2f} ms/step, "
        f"{res['tokens_per_s'] / 1e6:.3f} M tokens/s, MFU {100 * mfu:.2f}% (of {of_peak}), "
        f"peak mem {res['mem_gib']:.1f} GiB, loss {res['loss']:.4f}",
        flush=True,
    )
    return res


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="paper,large")
    parser.add_argument("--attention", default="triton,padded", help="comma list of triton, padded")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="the tiny config for 2 steps on CPU (TRITON_INTERPRET=1)"
    )
    args = parser.parse_args()
    device = "cpu" if args.cpu_smoke else "cuda"
    configs, steps = (["tiny"], 2) if args.cpu_smoke else (args.configs.split(","), args.steps)
    if not args.cpu_smoke:
        require_cuda()
    results, failed, stopped, progress = {}, [], None, Progress()
    with stop_on_sigterm(), parallel_compile():
        try:
            for name in configs:
                for attention in args.attention.split(","):
                    progress.at = f"{name}/{attention}"
                    try:
                        results[(name, attention)] = run(CONFIGS[name], attention, steps, device)
                    except torch.OutOfMemoryError:
                        print(f"[{name}/{attention}] out of memory", flush=True)
                    except Exception as err:  # one broken path must not cost a GPU session the other numbers
                        print(f"[{name}/{attention}] FAILED: {failure(err)}", flush=True)
                        failed.append(f"{name}/{attention}")
                    if device == "cuda":
                        torch.cuda.empty_cache()
        except Stopped as why:  # the time limit: the configurations that finished still make the RESULT
            stopped = f"{why} during {progress.at}"
    parts = [
        f"{n}/{a} {r['tokens_per_s'] / 1e6:.3f} Mtok/s MFU {100 * r['mfu']:.2f}% ({r['ms']:.1f} ms)"
        for (n, a), r in results.items()
    ]
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter smoke run)"
    print(
        f"RESULT hstu_step on {where}: " + "; ".join(parts) + f"; failed: {','.join(failed) or 'none'}"
        + (f"; INCOMPLETE: stopped by {stopped}" if stopped else "")
    )  # fmt: skip
    sys.exit(1 if failed or stopped else 0)


if __name__ == "__main__":
    main()
