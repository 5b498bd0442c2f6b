"""torchrun worker for tests/test_sharding.py: sharded item tables vs an unsharded copy, on gloo.

Writes rank-0 results to <out>/result.json; the parent test asserts on them.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

from modules.config import ModelConfig
from modules.item_embedding import ID_TABLE, TEXT_TABLE
from modules.losses import sampled_softmax_loss
from modules.model import GenerativeRecommender
from modules.retrieval import count_above_target, topk_block
from sharding.config import ShardingConfig
from sharding.model import local_item_vectors, local_rows, shard_model
from sharding.retrieval import distributed_target_ranks, distributed_topk

NUM_ITEMS, TEXT_DIM = 37, 12


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = ModelConfig(
        embedding_dim=16,
        num_blocks=1,
        num_heads=2,
        qk_dim=4,
        v_dim=4,
        max_seq_len=8,
        dropout=0.0,
        fusion="add",
        text_dim=TEXT_DIM,
        attention_backend="jagged",
    )
    model = GenerativeRecommender(num_items=NUM_ITEMS, config=config)
    text = torch.randn(NUM_ITEMS + 1, TEXT_DIM)
    text[0] = 0
    model.item_embedding.load_text_rows(0, text)
    reference = copy.deepcopy(model)
    sharding = ShardingConfig(optimizer="exact_sgd", learning_rate=0.1)
    dmp = shard_model(model, sharding, device=torch.device("cpu"))

    # Copy the reference's ID and text rows into this rank's shard (what the trainer does when loading).
    id_block, text_block = local_rows(dmp, ID_TABLE), local_rows(dmp, TEXT_TABLE)
    ref_id = reference.item_embedding.id_collection.embeddings[ID_TABLE].weight
    with torch.no_grad():
        n = id_block.weight.shape[0]
        id_block.weight.copy_(ref_id[id_block.start : id_block.start + n])
        text_block.weight.copy_(text[text_block.start : text_block.start + text_block.weight.shape[0]])
    blocks = torch.tensor([id_block.start, id_block.weight.shape[0]])
    all_blocks = [torch.zeros_like(blocks) for _ in range(world)]
    dist.all_gather(all_blocks, blocks)

    # 1. Sharded lookups equal unsharded ones (each rank asks for different ids).
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, NUM_ITEMS + 1, (23,), generator=gen)
    inner = dmp.module
    sharded_vecs = inner.item_embedding(ids)
    ref_vecs = reference.item_embedding(ids)
    lookup_err = float((sharded_vecs - ref_vecs).abs().max())

    # 2. Train a few steps through DMP; the text table must stay bit-identical, the projection must move.
    text_before = text_block.weight.clone()
    proj_before = inner.item_embedding.fusion.projection.weight.detach().clone()
    id_before = id_block.weight.clone()
    dense = torch.optim.Adam([p for n_, p in dmp.named_parameters() if "embeddings" not in n_], lr=1e-2)
    for step in range(3):
        g = torch.Generator().manual_seed(1000 * step + rank)
        lengths = torch.randint(1, 9, (4,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        hist = torch.randint(1, NUM_ITEMS + 1, (int(offsets[-1]),), generator=g)
        targets = torch.randint(1, NUM_ITEMS + 1, (int(offsets[-1]),), generator=g)
        ts = torch.arange(int(offsets[-1])) * 3600
        out = dmp(hist, offsets, ts, ts + 3600)  # query time: the next event, an hour later
        negs = torch.randint(1, NUM_ITEMS + 1, (10,), generator=g)
        loss = sampled_softmax_loss(
            out, targets, inner.item_vectors(targets), negs, inner.item_vectors(negs), temperature=0.05
        )
        dense.zero_grad()
        loss.backward()
        dense.step()
    text_identical = bool(torch.equal(text_before, local_rows(dmp, TEXT_TABLE).weight))
    proj_changed = float((inner.item_embedding.fusion.projection.weight - proj_before).abs().max())
    id_changed = float((local_rows(dmp, ID_TABLE).weight - id_before).abs().max())

    # 3. Sharded top-K and exact ranks equal the unsharded ones on the full catalog.
    start, vectors = local_item_vectors(dmp)
    queries = torch.nn.functional.normalize(
        torch.randn(6, 16, generator=torch.Generator().manual_seed(7)), dim=-1
    )
    hist_lengths = torch.tensor([0, 3, 1, 5, 2, 4])
    hist_offsets = torch.cat([torch.zeros(1, dtype=torch.long), hist_lengths.cumsum(0)])
    hist_ids = torch.randint(
        1, NUM_ITEMS + 1, (int(hist_offsets[-1]),), generator=torch.Generator().manual_seed(8)
    )
    targets = torch.tensor([1, 5, 17, 36, 37, 20])
    with torch.no_grad():
        top_s, top_i = distributed_topk(
            queries,
            vectors,
            row_start=start,
            k=7,
            history_offsets=hist_offsets,
            history_ids=hist_ids,
            chunk_size=5,
        )
        ranks = distributed_target_ranks(
            queries,
            targets,
            vectors,
            row_start=start,
            history_offsets=hist_offsets,
            history_ids=hist_ids,
            chunk_size=5,
        )
    # Unsharded: gather the full catalog once here, only to build the oracle in the test.
    full_vecs = [None] * world
    dist.all_gather_object(full_vecs, (start, vectors))
    full = torch.cat([v for _, v in sorted(full_vecs, key=lambda x: x[0])])
    ref_s, ref_i = topk_block(
        queries, full, row_start=0, k=7, history_offsets=hist_offsets, history_ids=hist_ids
    )
    ref_ranks = 1 + count_above_target(
        queries,
        targets,
        (queries * full[targets]).sum(-1),
        full,
        row_start=0,
        history_offsets=hist_offsets,
        history_ids=hist_ids,
    )
    if rank == 0:
        result = {
            "world": world,
            "blocks": [b.tolist() for b in all_blocks],
            "lookup_err": lookup_err,
            "text_identical": text_identical,
            "proj_changed": proj_changed,
            "id_changed": id_changed,
            "topk_ids": top_i.tolist(),
            "ref_topk_ids": ref_i.tolist(),
            "topk_score_err": float((top_s - ref_s).abs().max()),
            "ranks": ranks.tolist(),
            "ref_ranks": ref_ranks.tolist(),
            "local_rows": int(vectors.shape[0]),
            "num_rows": NUM_ITEMS + 1,
        }
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
