"""Compile the fused Triton HSTU kernels ahead of time for an NVIDIA GPU, on any machine (no GPU needed).

    python benchmarks/triton_compile.py                       # every autotune config, sm_90 (H100/H200)
    python benchmarks/triton_compile.py --dtypes bf16 --kernels fwd --first-config-only   # a quick check

Runs Triton's own NVIDIA backend and its bundled ptxas on every config the autotuner would try, and prints
the compile time, registers per thread, spill bytes and shared memory of each. This catches what the CPU
interpreter cannot (layouts, tensor-core shapes, resource limits) and shows which configs spill before any
GPU time is spent. For the attention kernels with the GPU's one-instruction SiLU (16-bit inputs) it also
counts the SiLUs per (i, j) pair and fails a config that computes them more than once: Triton replicates
a product's tile across warps when the tile has fewer than 16 rows per warp. And it counts the SASS
instructions of one step of each kernel's main loop on its shortest path (the tiles off the diagonal, which
skip the causal mask), per (i, j) pair of the thread's share of the tile: the work besides the products,
which bounds these kernels, and the block-wide barriers on that path (`bar/step`: layout conversions
through shared memory, each of which stalls every warp of the program).
Compiles into a private, temporary Triton cache, so the times are real.
Ends with `RESULT compiled=N failed=M ...`; exits 1 if any config failed to compile or fit.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_compile.py: unset TRITON_INTERPRET; ahead-of-time compilation needs the real compiler")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from modules import hstu_attention_gluon as gluon
from modules import hstu_attention_triton as hstu

SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
"""Largest dynamic shared memory per block (bytes) by compute capability."""
SCALARS = {
    "alpha": "fp32",
    "inv_den_const": "fp32",
    "max_seq_len": "i32",
    "num_buckets": "i32",
    "len_key": "i32",
    "ds_head_stride": "i64",
    "head0": "i32",
}
DIVISIBLE_SCALARS = {"ds_head_stride"}
"""Integer arguments always a multiple of 16 (the ds buffer's head stride: a multiple of 64 elements)."""
INDEX_POINTERS = {"OFFSETS": "*i64", "TS": "*i32", "TQ": "*i32", "RAB_BASE": "*i64"}
"""Timestamps travel as int32 offsets from each sequence's first one (int64 only for spans past 2**31)."""
FP32_POINTERS = {"POS_W", "TIME_W", "DPOS", "DTIME"}
"""Bias weights stay fp32 under autocast; their gradients accumulate in fp32 buffers."""
FP32_ACCUMULATORS = {"_hstu_bwd_dkdv_kernel": {"DQ"}}
"""Per kernel, the outputs it adds up in fp32 (dk/dv's dq, with DQ_ATOMIC); elsewhere outputs have the
inputs' dtype."""
BUFFER_KERNELS = ("fill", "fill:keys", "fill+keys", "rab_grad")
"""Specs that are not attention kernels: every config compiled, no head-dimension constants."""
GLUON_CONFIG = triton.Config(
    {"BLOCK_M": gluon.PROGRAM_ROWS // 2, "BLOCK_N": gluon.PROGRAM_ROWS // 2, "NUM_STAGES": gluon.STAGES,
     "CONSUMER_REGS": gluon.CONSUMER_REGS, "LOADER_REGS": gluon.LOADER_REGS},
    num_warps=4, maxnreg=gluon.MAXNREG,
)  # fmt: skip
"""The Gluon kernels' one launch configuration; BLOCK_M x BLOCK_N: the tile of one of their two consumer
warpgroups per step (64 keys x 64 query rows), which the loop statistics are per."""


def kernel_specs(kernels: list[str]) -> list[tuple[str, triton.JITFunction, list[triton.Config], dict]]:
    """(name, kernel, autotune configs, extra constexprs) of each requested kernel.

    Each attention kernel comes twice: computing the bias per pair, and reading it from the precomputed
    buffer (`+rab`, with the fill kernel that writes it: `fill`, query-major, for the forward; `fill:keys`,
    key-major, for the backward that takes dq from the ds buffer; `fill+keys`, both layouts, for one that
    recomputes dq); dk/dv with the buffer also hands ds over in the ds buffer (`+ds`, with the `rab_grad`
    kernel that reduces it into the bias gradients and the `dq_ds` kernel that multiplies it by k), and
    comes a third time adding dq up with atomics as well (`+dqa`, "atomic" `_DQ_SOURCE`).
    """
    table = {
        "fwd": (hstu._hstu_fwd_kernel, hstu._FWD_CONFIGS, {}),
        "dq": (hstu._hstu_bwd_dq_kernel, hstu._FWD_CONFIGS, {}),
        "dkdv": (hstu._hstu_bwd_dkdv_kernel, hstu._DKDV_CONFIGS, {"RAB_GRAD": True}),
        "gluon_dkdv": (gluon._hstu_bwd_dkdv_gluon_kernel, [GLUON_CONFIG], {}),
        "gluon_fwd": (gluon._hstu_fwd_gluon_kernel, [GLUON_CONFIG], {}),
    }
    specs = []
    for name in kernels:
        if name == "fill":  # the forward's (query-major) and the backward's (both layouts, dq kernel on)
            fill = hstu._hstu_rab_fill_kernel
            forward = {"TABLE_GATHER": True, "QUERY_MAJOR": True, "KEY_MAJOR": False}
            specs.append(("fill", fill, hstu._FILL_CONFIGS, forward))
            specs.append(
                ("fill:keys", fill, hstu._FILL_CONFIGS, {**forward, "QUERY_MAJOR": False, "KEY_MAJOR": True})
            )
            specs.append(("fill+keys", fill, hstu._FILL_CONFIGS, {**forward, "KEY_MAJOR": True}))
            rab_grad = hstu._hstu_rab_grad_kernel
            specs.append(("rab_grad", rab_grad, hstu._RAB_GRAD_CONFIGS, {"DEN_IS_LEN": True, "HEADS": 4}))
            specs.append(("dq_ds", hstu._hstu_bwd_dq_ds_kernel, hstu._DQ_DS_CONFIGS, {}))
            continue
        fn, configs, extra = table[name]
        if name == "dkdv":  # inline bias: bias gradients reduced in-loop; buffer: handed over as ds
            extra = {**extra, "DQ_ATOMIC": False}
            specs.append((name, fn, configs, {**extra, "RAB_TILES": False, "DS_STORE": False}))
            specs.append((f"{name}+rab+ds", fn, configs, {**extra, "RAB_TILES": True, "DS_STORE": True}))
            dq_atomic = {**extra, "RAB_TILES": True, "DS_STORE": True, "DQ_ATOMIC": True}
            specs.append((f"{name}+rab+ds+dqa", fn, configs, dq_atomic))
            continue
        if name.startswith("gluon_"):  # the bias buffer (and ds buffer) path only
            specs.append((name, fn, configs, extra))
            continue
        specs.append((name, fn, configs, {**extra, "RAB_TILES": False}))
        specs.append((f"{name}+rab", fn, configs, {**extra, "RAB_TILES": True}))
    return specs


def signature(fn: triton.JITFunction, dtype: str) -> tuple[dict[str, str], dict]:
    """Argument types as the launcher passes them, with 16-byte divisibility on pointers and strides (and
    on the integers that are always multiples of 16, as Triton's launcher specialises them at run time)."""
    sig, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
            continue
        if name in SCALARS:
            sig[name] = SCALARS[name]
        elif name.startswith("stride_"):
            sig[name] = "i32"
        elif name.isupper():
            fp32 = name in FP32_POINTERS or name in FP32_ACCUMULATORS.get(fn.__name__, ())
            sig[name] = INDEX_POINTERS.get(name, "*fp32" if fp32 else f"*{dtype}")
        else:
            raise SystemExit(f"triton_compile.py: no type known for argument {name!r} of {fn.__name__}")
        if name.isupper() or name.startswith("stride_") or name in DIVISIBLE_SCALARS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill bytes and static shared memory that ptxas reports for one kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [
            get_ptxas(arch).path,
            f"-arch={sm_arch_from_capability(arch)}",
            "-v",
            str(src),
            "-o",
            os.devnull,
        ]
        info = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, info)) else 0  # noqa: E731
    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*(?:/\*.*)?$")
_BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA\s+(?:`\()?\.?(L_x_\d+)")


_TENSOR_CORE = re.compile(r"^(@!?U?P\w+\s+)?(HGMMA|HMMA)\b")


def main_loop_instructions(cubin: bytes) -> tuple[int, int] | None:
    """(SASS instructions per thread, block-wide barriers) in one step of the kernel's main loop, on the loop
    body's shortest path through its conditional blocks that passes its first tensor-core product; None if
    it has no loop. The main loop: the first innermost loop holding a product (in a warp-specialised kernel,
    a consumer's, not the partitions' dispatch loop around them); in a kernel without products, the
    outermost loop that starts first. Barriers mostly come from layout conversions through shared memory:
    each one stalls every warp until the slowest arrives."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run(
            [knobs.nvidia.nvdisasm.path, "-c", str(path)], capture_output=True, text=True, check=True
        ).stdout
    instrs, labels = [], {}
    for line in sass.splitlines():
        if (label := re.match(r"^\.(L_x_\d+):", line.strip())) is not None:
            labels[label.group(1)] = len(instrs)
        elif (m := _SASS_LINE.search(line)) is not None and not line.strip().startswith("//"):
            instrs.append(m.group(2))
    loops = [
        (labels[m.group(2)], i)
        for i, ins in enumerate(instrs)
        if (m := _BRANCH.match(ins)) and labels.get(m.group(2), i + 1) <= i
    ]
    if not loops:
        return None
    products = [i for i, ins in enumerate(instrs) if _TENSOR_CORE.match(ins)]
    with_products = [(a, b) for a, b in loops if any(a <= i <= b for i in products)]
    innermost = [
        (a, b)
        for a, b in with_products
        if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in with_products)
    ]
    if innermost:
        first, last = min(innermost)
        stops = [first, next(i for i in products if first <= i <= last), last]
    else:  # the outermost loop, which starts first (the longest span can be a cold block placed after the
        # main loop that branches back into it)
        first, last = min(loops, key=lambda span: (span[0], span[0] - span[1]))
        stops = [first, last]

    def successors(i: int) -> list[int]:
        if re.match(r"(EXIT|RET)\b", instrs[i]):
            return []
        if (m := _BRANCH.match(instrs[i])) is None or m.group(2) not in labels:
            return [i + 1]
        target = labels[m.group(2)]
        return [target] if m.group(1) is None else [i + 1, target]  # unconditional, or it may fall through

    def shortest(start: int, goal: int) -> list[int] | None:
        """Breadth-first through the whole function (the compiler may place a conditional block's code
        after the loop, with a branch back): the instructions from start to goal, goal excluded."""
        previous, frontier = {start: None}, [start]
        while frontier and goal not in previous:
            following = []
            for i in frontier:
                for j in successors(i):
                    if j < len(instrs) and j not in previous:
                        previous[j] = i
                        following.append(j)
            frontier = following
        if goal not in previous:
            return None
        path, i = [], previous[goal]
        while i is not None:
            path.append(i)
            i = previous[i]
        return path

    legs = [shortest(a, b) for a, b in itertools.pairwise(stops)]
    if any(leg is None for leg in legs):
        return None
    path = [instrs[i] for leg in legs for i in leg] + [instrs[last]]
    return len(path), sum(ins.startswith("BAR.SYNC") for ins in path)


def silu_per_pair(ptx: str, config: triton.Config) -> float | None:
    """How many times each thread's (i, j) pairs get their SiLU (tanh.approx sites per thread, times the
    threads, over the tile's pairs): 1 unless warps replicate the tile; None without FAST_MATH's tanh."""
    sites = ptx.count("tanh.approx.f32")
    if not sites:
        return None
    return sites * 32 * config.num_warps / (config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--dqk", type=int, default=128, help="query/key head dimension")
    parser.add_argument("--dv", type=int, default=128, help="value head dimension")
    parser.add_argument(
        "--num-buckets", type=int, default=128, help="time buckets (time_weights has one more)"
    )
    parser.add_argument("--dtypes", default="bf16,fp32", help="input dtypes: bf16, fp16, fp32")
    parser.add_argument(
        "--kernels",
        default="fwd,dq,dkdv,fill,gluon_fwd,gluon_dkdv",
        help="kernels to compile: fwd, dq, dkdv, fill (the kernels that fill or read the bias/ds buffers), "
        "gluon_fwd, gluon_dkdv (the warp-specialised Gluon forward and dk/dv)",
    )
    parser.add_argument("--first-config-only", action="store_true", help="one config per kernel (quick)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="triton_compile_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        failed = compile_all(args)
    sys.exit(1 if failed else 0)


def compile_all(args: argparse.Namespace) -> int:
    """Compile and report every requested (dtype, kernel, config); returns the number that failed."""

    target = GPUTarget("cuda", args.arch, 32)
    block_dqk, block_dv = hstu._dims(args.dqk, args.dv)
    limit = SMEM_LIMIT.get(args.arch)
    header = (
        f"{'kernel':15s} {'dtype':5s} {'config':58s} {'compile_s':>9s} {'regs':>5s} "
        f"{'spill_B':>8s} {'smem_KiB':>8s} {'silu/pair':>9s} {'loop/pair':>9s} {'bar/step':>8s}  status"
    )
    print(f"target sm_{args.arch}, Dqk={args.dqk}, Dv={args.dv}, triton {triton.__version__}\n{header}")
    compiled = failed = 0
    worst_spill, slowest = 0, 0.0
    for dtype in args.dtypes.split(","):
        precision = hstu._dot_precision({"fp32": hstu.torch.float32}.get(dtype, hstu.torch.bfloat16))
        for name, fn, configs, extra in kernel_specs(args.kernels.split(",")):
            is_gluon = name.startswith("gluon_")
            if is_gluon and (dtype == "fp32" or not args.dqk == args.dv in gluon.HEAD_DIMS):
                continue  # 16-bit inputs and their head dims only: the Triton kernels take the rest
            pruned = (
                configs
                if name in BUFFER_KERNELS or is_gluon
                else hstu._prune_configs(configs, {}, DOT_PREC=precision, **extra)
            )
            for config in pruned[:1] if args.first_config_only else pruned:
                constants = dict(
                    FAST_MATH=dtype != "fp32", BLOCK_BUCKETS=triton.next_power_of_2(args.num_buckets + 1),
                    **extra, **config.kwargs,
                )  # fmt: skip
                if name not in BUFFER_KERNELS:
                    constants |= dict(
                        DQK=args.dqk, DV=args.dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv, DEN_IS_LEN=True,
                        DOT_PREC=precision, D=args.dqk,
                    )  # fmt: skip
                sig, attrs = signature(fn, dtype)
                index = {p.name: i for i, p in enumerate(fn.params)}
                constants = {k: v for k, v in constants.items() if k in index}  # dq_ds takes fewer
                src = (GluonASTSource if is_gluon else ASTSource)(
                    fn, sig, constexprs={(index[k],): v for k, v in constants.items()}, attrs=attrs
                )
                label = f"{config.kwargs} w{config.num_warps} s{config.num_stages}"
                start = time.perf_counter()
                try:
                    kernel = triton.compile(
                        src,
                        target=target,
                        options={
                            "num_warps": config.num_warps,
                            "num_stages": config.num_stages,
                            "maxnreg": config.maxnreg,
                        },
                    )
                except Exception as err:  # report every failing config, then fail the run
                    failed += 1
                    print(f"{name:15s} {dtype:5s} {label:58s} {'-':>9s} FAILED: {type(err).__name__}: {err}")
                    continue
                seconds = time.perf_counter() - start
                report = ptxas_report(kernel.asm["ptx"], args.arch)
                smem = int(kernel.metadata.shared)
                spill = report["spill_stores"] + report["spill_loads"]
                silu = silu_per_pair(kernel.asm["ptx"], config)
                if is_gluon and silu is not None:
                    silu /= 2  # its two consumer warpgroups' loops each hold their own tile's tanh sites
                loop = main_loop_instructions(kernel.asm["cubin"])
                tile = hstu._tile(config)
                rows, cols = tile[0], tile[-1]  # square tiles name one size
                per_pair = "-" if loop is None else f"{loop[0] * 32 * config.num_warps / (rows * cols):.1f}"
                barriers = "-" if loop is None else str(loop[1])
                status = "ok"
                if limit is not None and smem > limit:
                    status = f"FAILS: shared memory over {limit} B"
                elif silu is not None and silu > 1:
                    status = "FAILS: warps replicate the tile (fewer than 16 rows per warp)"
                elif (
                    is_gluon
                    and f"setmaxnreg.inc.sync.aligned.u32 \t{gluon.CONSUMER_REGS};" not in kernel.asm["ptx"]
                ):
                    status = "FAILS: not warp-specialised (no consumer register increase)"
                compiled += 1
                failed += status != "ok"
                worst_spill, slowest = max(worst_spill, spill), max(slowest, seconds)
                print(
                    f"{name:15s} {dtype:5s} {label:58s} {seconds:9.1f} {report['registers']:5d} "
                    f"{spill:8d} {smem / 1024:8.1f} {'-' if silu is None else f'{silu:g}':>9s} {per_pair:>9s}"
                    f" {barriers:>8s}  {status}",
                    flush=True,
                )
    print(
        f"RESULT arch=sm_{args.arch} compiled={compiled} failed={failed} "
        f"max_spill_bytes={worst_spill} slowest_compile_s={slowest:.1f}"
    )
    return failed


if __name__ == "__main__":
    main()
