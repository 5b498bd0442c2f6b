"""Dry run of the item-table sharding plan for a cluster: no GPU, nothing allocated (meta tables).

Example (Amazon Reviews 2023, 32 GPUs):
  python launch/plan.py --nodes 4 --gpus-per-node 8 --hbm-gb 80 --items 48200000 --dim 256 \\
      --text-dim 768 --text-dtype fp16
"""

from __future__ import annotations

import argparse
import sys

from modules.config import ModelConfig
from modules.item_embedding import ItemEmbedding
from sharding.config import ShardingConfig
from sharding.memory import row_wise_rank_memory
from sharding.planner import make_plan, make_topology

GIB = 1024**3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--hbm-gb", type=float, required=True, help="memory per GPU the tables may use")
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--text-dim", type=int, default=768)
    parser.add_argument("--text-dtype", choices=["fp16", "fp32"], default="fp16")
    parser.add_argument("--optimizer", default="exact_rowwise_adagrad")
    parser.add_argument("--batch-tokens", type=int, default=128 * 50, help="lookups per rank per step")
    args = parser.parse_args(argv)
    world = args.nodes * args.gpus_per_node
    sharding = ShardingConfig(optimizer=args.optimizer, text_dtype=args.text_dtype, hbm_gb=args.hbm_gb)
    model_cfg = ModelConfig(embedding_dim=args.dim, text_dim=args.text_dim, fusion="add")
    items = ItemEmbedding(
        num_items=args.items, config=model_cfg, device="meta", text_fp16=args.text_dtype == "fp16"
    )
    topology = make_topology(
        world_size=world, local_world_size=args.gpus_per_node, compute_device="cuda", hbm_gb=args.hbm_gb
    )
    plan = make_plan(items, sharding, topology=topology, batch_tokens=args.batch_tokens)
    print(
        f"cluster: {args.nodes} nodes x {args.gpus_per_node} GPUs = {world} ranks, {args.hbm_gb:g} GiB each"
    )
    print(
        f"catalog: {args.items:,} items, id dim {args.dim} fp32, text dim {args.text_dim} {args.text_dtype}"
    )
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            ranks = sorted({int(str(s.placement).split("rank:")[1].split("/")[0]) for s in shards})
            print(
                f"  {module_path or '.'}.{table}: {ps.sharding_type} / {ps.compute_kernel}, "
                f"{len(shards)} shards on ranks {ranks[0]}..{ranks[-1]}"
            )
    mem = row_wise_rank_memory(
        num_items=args.items,
        world_size=world,
        dim=args.dim,
        text_dim=args.text_dim,
        text_bytes=2 if args.text_dtype == "fp16" else 4,
        optimizer=args.optimizer,
    )
    fits = mem.total <= args.hbm_gb * GIB
    print(f"per rank (largest): {mem.rows:,} rows")
    print(f"  id table      {mem.id_table / GIB:8.3f} GiB")
    print(f"  id optimizer  {mem.id_optimizer / GIB:8.3f} GiB ({args.optimizer})")
    print(f"  text table    {mem.text_table / GIB:8.3f} GiB (frozen, no optimizer state)")
    print(
        f"  total         {mem.total / GIB:8.3f} GiB of {args.hbm_gb:g} GiB -> "
        + ("FITS" if fits else "DOES NOT FIT")
    )
    print(
        f"RESULT world={world} rows_per_rank={mem.rows} rank_bytes={mem.total} "
        f"rank_gib={mem.total / GIB:.3f} hbm_gib={args.hbm_gb:g} fits={int(fits)}"
    )
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
