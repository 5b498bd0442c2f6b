"""Does Triton's automatic warp specialisation serve an HSTU dk/dv loop? Compiled for sm_90, no GPU needed.

    python benchmarks/triton_ws_probe.py

FlashAttention-3 reaches its speed on Hopper by warp specialisation: a producer warpgroup issues the TMA
loads while two consumer warpgroups multiply. Triton offers it as `tl.range(..., warp_specialize=True)`.
This compiles a dk/dv-shaped loop (key-major s^T = k q^T, the SiLU backward, dv += p^T do, dk += ds^T q,
ds stored; every tile through TMA, no branch in the loop, as the compiler requires) with it, and reads the
TTGIR: how many partitions the loop became, how many products each runs per step, and where each consumer
stores its dk and dv. A correct split gives each consumer its own key rows (row offsets 0 and 64, column
offset 0); consumers storing to the same place ran the same work twice. Rerun it when the pinned Triton
changes; the README's GPU status says what Triton 3.6 does. Ends with a RESULT line.
"""

from __future__ import annotations

import os
import re
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_ws_probe.py: unset TRITON_INTERPRET; the probe needs the real compiler")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HEAD_DIM = 128


@triton.jit
def _dkdv_loop(Q, K, V, DO, DK, DV, RAB, DS, N, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    """One key block's dk/dv over the query blocks after it, every tile through TMA descriptors."""
    n0 = tl.program_id(0) * BN
    k = tl.make_tensor_descriptor(K, shape=[N, D], strides=[D, 1], block_shape=[BN, D]).load([n0, 0])
    v = tl.make_tensor_descriptor(V, shape=[N, D], strides=[D, 1], block_shape=[BN, D]).load([n0, 0])
    q_desc = tl.make_tensor_descriptor(Q, shape=[N, D], strides=[D, 1], block_shape=[BM, D])
    do_desc = tl.make_tensor_descriptor(DO, shape=[N, D], strides=[D, 1], block_shape=[BM, D])
    bias_desc = tl.make_tensor_descriptor(RAB + n0 * N, shape=[BN, N], strides=[N, 1], block_shape=[BN, BM])
    ds_desc = tl.make_tensor_descriptor(DS + n0 * N, shape=[BN, N], strides=[N, 1], block_shape=[BN, BM])
    dk = tl.zeros((BN, D), tl.float32)
    dv = tl.zeros((BN, D), tl.float32)
    for m0 in tl.range(n0 + BN, N, BM, warp_specialize=True):
        q = q_desc.load([m0, 0])
        do = do_desc.load([m0, 0])
        hs = tl.dot(k, q.T) * 0.5 + bias_desc.load([0, m0]).to(tl.float32)
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [hs], dtype=tl.float32, is_pure=True, pack=1
        )
        dv = tl.dot((hs * t + hs).to(tl.bfloat16), do, dv)
        ds = (tl.dot(v, do.T) * ((1.0 + hs) + t * (1.0 - hs * t))).to(tl.bfloat16)
        dk = tl.dot(ds, q, dk)
        ds_desc.store([0, m0], ds)
    tl.make_tensor_descriptor(DK, shape=[N, D], strides=[D, 1], block_shape=[BN, D]).store(
        [n0, 0], dk.to(tl.bfloat16)
    )
    tl.make_tensor_descriptor(DV, shape=[N, D], strides=[D, 1], block_shape=[BN, D]).store(
        [n0, 0], dv.to(tl.bfloat16)
    )


def compile_ttgir(block_n: int, head_dim: int = HEAD_DIM) -> tuple[str, int]:
    """(TTGIR, total warps) of the loop with 64 query rows per step and block_n keys per program."""
    pointers = ["Q", "K", "V", "DO", "DK", "DV", "RAB", "DS"]
    sig = {name: "*bf16" for name in pointers} | {
        "N": "i32",
        "BM": "constexpr",
        "BN": "constexpr",
        "D": "constexpr",
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + 1)}
    src = ASTSource(_dkdv_loop, sig, constexprs={(9,): 64, (10,): block_n, (11,): head_dim}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    return kernel.asm["ttgir"], kernel.metadata.num_warps


def partitions(ttgir: str) -> list[str]:
    """The consumer partitions' bodies (the default region, the producer, comes first and is left out)."""
    return re.split(r"\n\s*partition\d+\(", ttgir)[1:]


def output_stores(body: str) -> list[str]:
    """Coordinates of a partition's TMA stores of dk and dv (every store but the loop's ds tiles), with SSA
    suffixes dropped: e.g. '%n0, %c0_i32'."""
    stores = re.findall(r"async_tma_copy_local_to_global (%\w+)\[([^\]]*)\]", body)
    return [re.sub(r"_\d+\b", "", where) for desc, where in stores if not desc.startswith("%ds_desc")]


def probe(block_n: int, head_dim: int = HEAD_DIM) -> dict:
    """How the compiler split the loop at block_n keys per program, and a verdict."""
    ttgir, warps = compile_ttgir(block_n, head_dim)
    consumers = partitions(ttgir)
    stores = [output_stores(body) for body in consumers]
    if len(consumers) < 2:
        verdict = "not specialised"
    elif any(s == stores[0] for s in stores[1:]):
        verdict = "every product done twice"  # two consumers writing the same dk/dv rows did the same work
    elif not all(re.fullmatch(r"%\w+, %c0_i32", where) for s in stores for where in s):
        verdict = "wrong tile coordinates"  # a consumer's dk/dv tile starts past column 0
    else:
        verdict = "ok"
    products = [body.count("ttng.warp_group_dot ") for body in consumers]
    return {"warps": warps, "products": products, "stores": stores, "verdict": verdict}


def main() -> None:
    print(
        f"triton {triton.__version__}, sm_90, head dim {HEAD_DIM}, 64 query rows per step, 4 warps requested"
    )
    print(
        f"{'keys':>5s} {'warps':>5s} {'consumers':>9s} {'products/consumer':>17s} {'dk/dv stores at':44s} "
        "verdict"
    )
    verdicts = []
    for block_n in (64, 128):
        r = probe(block_n)
        verdicts.append(r["verdict"])
        where = " | ".join("; ".join(s) for s in r["stores"])
        products = ",".join(map(str, r["products"]))
        print(
            f"{block_n:5d} {r['warps']:5d} {len(r['products']):9d} {products:>17s} {where:44s} {r['verdict']}"
        )
    usable = any(v == "ok" for v in verdicts)
    print(
        f"RESULT triton={triton.__version__} keys64={verdicts[0].replace(' ', '_')} "
        f"keys128={verdicts[1].replace(' ', '_')} usable={'yes' if usable else 'no'}"
    )


if __name__ == "__main__":
    main()
