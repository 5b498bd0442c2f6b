"""BLaIR contrastive pretraining with DeepSpeed ZeRO: `train_blair(config) -> results`.

Order of set-up: environment (DeepSpeed accelerator, extension cache) -> process group -> seeds -> pairs ->
encoder (+ MLM head) -> optimizer/scheduler -> DeepSpeed engine -> resume -> Recall@K before -> loop ->
Recall@K after -> checkpoint, HF encoder folder, results.json. Logs and TensorBoard come from rank 0 only.
Batches, MLM masks and dropout are functions of (seed, rank, step), so a resumed run retraces the steps an
uninterrupted one takes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_shards.pair_shards import (
    Pair,
    PairStream,
    iter_pairs,
    load_pair_manifest,
    read_candidates,
    sample_candidates,
)
from data_shards.pairs import load_pairs, resolve_path
from modules.blair import BlairEncoder, EncoderError, info_nce_loss, load_encoder, mask_tokens, mlm_loss
from trainer.config_io import ConfigError, save_config
from trainer.distributed import World, init_distributed, logger, maybe_inject_fault
from trainer.run_dir import claim_run_dir

FAULT_INJECTION_ENV = "BLAIR_KILL_RANK_AT_STEP"
"""Testing aid: "RANK:STEP" makes that rank SIGKILL itself after STEP on a run's first attempt."""

# --------------------------------------------------------------------------- environment


def prepare_environment() -> None:
    """Env vars DeepSpeed reads at import: its accelerator and where JIT-compiled extensions are cached."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------- cross-rank gather


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (works on gloo and NCCL)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` [B, ...] from all ranks along dim 0, keeping the gradient path to every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def rank_mean(values: torch.Tensor, world: World) -> list[float]:
    """The mean over ranks of `values` (on this rank's device: NCCL has no CPU collectives), as floats."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= world.world_size
    return values.tolist()


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed_texts(
    model: BlairEncoder, tokenizer, texts: list[str], *, world: World, batch_size: int, max_length: int
) -> torch.Tensor:
    """L2-normalised embeddings of `texts` on every rank; each rank encodes an equal-size slice.

    Every rank runs the same number of forwards (slices are padded), which ZeRO-3 requires.
    """
    n = len(texts)
    per_rank = math.ceil(n / world.world_size)
    per_rank = math.ceil(per_rank / batch_size) * batch_size
    padded = texts + [texts[0]] * (per_rank * world.world_size - n)
    mine = padded[world.rank * per_rank : (world.rank + 1) * per_rank]
    outs = []
    for lo in range(0, per_rank, batch_size):
        enc = tokenizer(
            mine[lo : lo + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(world.device)
        emb = model.encode(enc["input_ids"], enc["attention_mask"])
        outs.append(torch.nn.functional.normalize(emb.float(), dim=-1))
    local = torch.cat(outs) if outs else torch.zeros(0, 1, device=world.device)
    return gather_no_grad(local)[:n]


def recall_at_k(
    query_emb: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor, k: int
) -> dict[str, float]:
    """Recall@k and MRR of each query's own item among all items (cosine on normalised vectors)."""
    scores = query_emb @ item_emb.T
    target_score = scores.gather(1, targets[:, None])
    rank = (scores > target_score).sum(1)  # 0-based; ties count in the query's favour
    return {f"recall@{k}": float((rank < k).float().mean()), "mrr": float((1.0 / (rank + 1).float()).mean())}


def evaluate(
    model: BlairEncoder, tokenizer, data: PairData, *, world: World, cfg, max_length: int
) -> dict[str, float]:
    """Held-out review -> item retrieval over the candidate catalog (every query's item + sampled others)."""
    was_training = model.training
    model.eval()
    items = embed_texts(
        model,
        tokenizer,
        data.candidate_texts,
        world=world,
        batch_size=cfg.eval_batch_size,
        max_length=max_length,
    )
    queries = embed_texts(
        model, tokenizer, data.query_texts, world=world, batch_size=cfg.eval_batch_size, max_length=max_length
    )
    targets = torch.from_numpy(np.searchsorted(data.candidates, data.query_items)).to(items.device)
    model.train(was_training)
    return recall_at_k(queries, items, targets, cfg.recall_k)


# --------------------------------------------------------------------------- pair data


@dataclass
class PairData:
    """What training needs from the pairs, in memory or streamed: batches by (epoch, step), the eval set."""

    steps_per_epoch: int
    epoch_batches: Callable[[int, int], Iterator[list[Pair]]]
    """(epoch, first batch) -> this rank's batches of that epoch from that one on."""
    query_items: np.ndarray
    query_texts: list[str]
    candidates: np.ndarray
    """Sorted item indices of the evaluation catalog."""
    candidate_texts: list[str]
    counts: dict[str, int]
    summary: dict[str, Any]


def in_memory_pairs(cfg, *, world: World, seed: int) -> PairData:
    """Every rank reads the whole corpus (deterministic) and takes its slice of each global batch."""
    corpus = load_pairs(cfg.pairs)
    logger.info("blair pairs: %s", json.dumps(corpus.counts))
    if corpus.stats.total:
        logger.info("%s", corpus.stats.summary())
    global_batch = cfg.batch_size * world.world_size
    steps_per_epoch = len(corpus.train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"blair: {len(corpus.train)} training pairs cannot fill one global batch of {global_batch} "
            f"(batch_size {cfg.batch_size} x {world.world_size} ranks); lower blair.batch_size"
        )

    def epoch_batches(epoch: int, start: int) -> Iterator[list[Pair]]:
        order = np.random.default_rng(seed + epoch).permutation(len(corpus.train))
        for offset in range(start, steps_per_epoch):
            lo = offset * global_batch + world.rank * cfg.batch_size
            batch = []
            for i in order[lo : lo + cfg.batch_size]:
                item, review = corpus.train[i]
                batch.append(Pair(item, review, corpus.item_texts[item], int(i)))
            yield batch

    query_items = np.asarray([i for i, _ in corpus.eval], dtype=np.int64)
    candidates = sample_candidates(
        query_items, len(corpus.item_keys), cfg.pairs.eval_max_items, cfg.pairs.seed
    )
    counts = dict(corpus.counts, eval_candidates=len(candidates))
    return PairData(
        steps_per_epoch=steps_per_epoch,
        epoch_batches=epoch_batches,
        query_items=query_items,
        query_texts=[t for _, t in corpus.eval],
        candidates=candidates,
        candidate_texts=[corpus.item_texts[i] for i in candidates],
        counts=counts,
        summary=corpus.summary(),
    )


def streamed_pairs(cfg, *, world: World, seed: int) -> PairData:
    """Each rank streams its own train shards of the prepared folder `blair.pairs.dataset_dir`."""
    root = cfg.pairs.dataset_dir
    manifest = load_pair_manifest(root, cfg.pairs)
    stream = PairStream(
        root, rank=world.rank, world_size=world.world_size, batch_size=cfg.batch_size, seed=seed,
        shuffle_buffer=cfg.pairs.shuffle_buffer,
    )  # fmt: skip
    logger.info("blair pairs (streamed from %s): %s", root, json.dumps(manifest["counts"]))
    queries = list(iter_pairs(root, "eval"))
    candidates, texts = read_candidates(root)
    return PairData(
        steps_per_epoch=stream.steps_per_epoch,
        epoch_batches=stream.epoch,
        query_items=np.asarray([q.item for q in queries], dtype=np.int64),
        query_texts=[q.review for q in queries],
        candidates=candidates,
        candidate_texts=texts,
        counts=manifest["counts"],
        summary={
            "dataset_dir": str(root),
            "counts": manifest["counts"],
            "skipped": {"counts": manifest["skipped"], "examples": manifest["skipped_examples"]},
        },
    )


def _fingerprint(batch: list[Pair]) -> int:
    """A 60-bit digest of the pairs (and their order) in a batch: what resume tests compare."""
    digest = hashlib.sha256(b"".join(p.line.to_bytes(8, "little", signed=True) for p in batch)).digest()
    return int.from_bytes(digest[:8], "little") >> 4


# --------------------------------------------------------------------------- DeepSpeed


def resolve_precision(precision: str, world: World) -> str:
    """The precision DeepSpeed runs in on this world's device (the CPU path is fp32 only)."""
    if world.device.type != "cuda":
        if precision in ("bf16", "fp16") and world.is_main:
            logger.warning(
                "precision %s requested on CPU: using fp32 (DeepSpeed's CPU path is fp32)", precision
            )
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def deepspeed_config(cfg, *, precision: str) -> dict[str, Any]:
    """The DeepSpeed config dict: ZeRO stage, precision, clipping; the optimizer is a torch one passed in."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return ds


def step_seeds(seed: int, rank: int, step: int) -> tuple[int, int]:
    """(MLM-mask seed, torch seed for dropout) of one rank's step: a pure function, so resume is exact."""
    mask, dropout = np.random.SeedSequence([seed, rank, step]).generate_state(2, np.uint64)
    return int(mask), int(dropout)


def linear_schedule(total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


# --------------------------------------------------------------------------- saving


def save_hf_encoder(
    engine, hf_model, tokenizer, out_dir: Path, *, pooling: str, world: World, zero_stage: int
) -> None:
    """Write the trained encoder as a plain HF folder (+ sentence-transformers pooling files) for embed.py."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if world.is_main:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        if state is None:
            state = {k: v.detach().float().cpu() for k, v in engine.module.model.state_dict().items()}
        else:
            prefix = "model."
            state = {
                k[len(prefix) :] if k.startswith(prefix) else k: v.float().cpu() for k, v in state.items()
            }
        hf_model.save_pretrained(str(out_dir), state_dict=state)
        tokenizer.save_pretrained(str(out_dir))
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (out_dir / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
        (out_dir / "1_Pooling").mkdir()
        (out_dir / "2_Normalize").mkdir()
        pool_cfg = {
            "word_embedding_dimension": int(hf_model.config.hidden_size),
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
        }
        (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg, indent=2), encoding="utf-8")
    if dist.is_initialized():
        dist.barrier()


def _purge_checkpoints(ckpt_dir: Path, keep: str) -> None:
    for child in ckpt_dir.iterdir():
        if child.is_dir() and child.name.startswith("step") and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------- training


def train_blair(config) -> dict[str, Any]:
    """Pretrain a BLaIR encoder from `config.blair` (a JobConfig); returns (and writes) the results dict."""
    prepare_environment()
    import deepspeed

    cfg = config.blair
    world = init_distributed()
    deepspeed.init_distributed(dist_backend=world.backend)
    if not world.is_main:
        import transformers

        transformers.logging.set_verbosity_error()  # one load report (rank 0's), not one per rank
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    run_dir = Path(config.run.output_root) / config.run.name
    ckpt_dir = run_dir / "checkpoints"
    claim_run_dir(run_dir, "blair", is_main=world.is_main)
    if world.is_main:
        save_config(config, run_dir / "config.json")
    seed = config.run.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the MLM head's initialisation; each step reseeds dropout (`step_seeds`)
    started = time.perf_counter()

    # Pairs: streamed from a prepared folder (each rank its own shards), or the whole corpus in memory.
    pair_fn = streamed_pairs if cfg.pairs.dataset_dir else in_memory_pairs
    data = pair_fn(cfg, world=world, seed=seed)

    # Encoder (+ MLM head when the MLM loss is on).
    encoder_path = resolve_path(cfg.encoder_path)
    use_mlm = cfg.mlm_weight > 0
    loaded = _load_encoder_or_config_error(encoder_path, with_mlm_head=use_mlm)
    if use_mlm and loaded.missing_keys:
        logger.info(
            "MLM head: %d weight(s) not in %s were newly initialised (%s%s)",
            len(loaded.missing_keys),
            encoder_path,
            ", ".join(loaded.missing_keys[:4]),
            ", ..." if len(loaded.missing_keys) > 4 else "",
        )
    tokenizer = loaded.tokenizer
    model = BlairEncoder(loaded.model, pooling=cfg.pooling)

    global_batch = cfg.batch_size * world.world_size
    steps_per_epoch = data.steps_per_epoch
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = cfg.max_steps  # may run past one epoch: the data order is reshuffled per epoch
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, cfg.warmup_ratio))
    precision = resolve_precision(cfg.precision, world)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, precision=precision),
    )
    logger.info(
        "blair: %s, ZeRO-%d, %s, %d ranks x %d pairs, %d steps (%d per epoch), pooling %s",
        Path(encoder_path).name,
        cfg.zero_stage,
        precision,
        world.world_size,
        cfg.batch_size,
        total_steps,
        steps_per_epoch,
        cfg.pooling,
    )

    # Resume.
    step, state = 0, {}
    if cfg.resume and (ckpt_dir / "latest").is_file():
        _, state = engine.load_checkpoint(str(ckpt_dir))
        state = state or {}
        step = int(state.get("step", 0))
        logger.info("resumed from %s at step %d", ckpt_dir, step)

    writer = None
    if world.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    max_length = cfg.max_length
    k = cfg.recall_k
    results: dict[str, Any] = {"before": state.get("before"), "history": state.get("history", [])}
    if cfg.eval_before and results["before"] is None:
        t0 = time.perf_counter()
        results["before"] = evaluate(
            engine.module, tokenizer, data, world=world, cfg=cfg, max_length=max_length
        )
        logger.info("before pretraining: %s (%.1fs)", _fmt(results["before"]), time.perf_counter() - t0)
        if writer:
            writer.add_scalar(f"eval/recall@{k}", results["before"][f"recall@{k}"], 0)
            writer.add_scalar("eval/mrr", results["before"]["mrr"], 0)

    special_ids = list(tokenizer.all_special_ids)
    gen = torch.Generator()
    engine.train()
    logits_shape = None
    t_loop = time.perf_counter()
    steps_done = 0
    batches: Iterator[list[Pair]] | None = None
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        if batches is None or offset == 0:  # a new epoch, or the resumed one from its next batch
            batches = data.epoch_batches(epoch, offset)
        batch = next(batches)
        # MLM masks and dropout depend on (seed, rank, step) only, so a resumed run (DeepSpeed saves no RNG
        # state) masks and drops out as an uninterrupted one would
        mask_seed, dropout_seed = step_seeds(seed, world.rank, step)
        gen.manual_seed(mask_seed)
        torch.manual_seed(dropout_seed)
        items = torch.tensor([p.item for p in batch], device=engine.device)
        q = tokenizer(
            [p.review for p in batch],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        d = tokenizer(
            [p.item_text for p in batch],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        mlm_ids = mlm_labels = None
        if use_mlm:
            mlm_ids, mlm_labels = mask_tokens(
                q["input_ids"],
                q["attention_mask"],
                mask_token_id=tokenizer.mask_token_id,
                vocab_size=len(tokenizer),
                special_ids=special_ids,
                probability=cfg.mlm_probability,
                generator=gen,
            )
            mlm_ids, mlm_labels = mlm_ids.to(engine.device), mlm_labels.to(engine.device)
        q, d = q.to(engine.device), d.to(engine.device)
        q_emb, d_emb, mlm_out = engine(
            q["input_ids"], q["attention_mask"], d["input_ids"], d["attention_mask"], mlm_ids, mlm_labels
        )
        keys = gather_with_grad(d_emb)
        key_items = gather_no_grad(items)
        labels = torch.arange(len(batch), device=engine.device) + world.rank * cfg.batch_size
        nce, logits = info_nce_loss(
            q_emb,
            keys,
            labels,
            temperature=cfg.temperature,
            query_groups=items if cfg.mask_same_item else None,
            key_groups=key_items if cfg.mask_same_item else None,
        )
        mlm = mlm_loss(*mlm_out) if use_mlm else torch.zeros((), device=engine.device)
        loss = nce + cfg.mlm_weight * mlm
        engine.backward(loss)
        engine.step()
        step += 1
        steps_done += 1
        logits_shape = list(logits.shape)
        # Rank-averaged numbers for logging (cheap: 4 scalars).
        acc = (logits.argmax(1) == labels).float().mean()
        stats = torch.stack([loss.detach().float(), nce.detach().float(), mlm.detach().float(), acc])
        stats = rank_mean(stats, world)
        lr = engine.get_lr()[0]
        fingerprints = gather_no_grad(torch.tensor([_fingerprint(batch)], device=engine.device))
        results["history"].append(
            {
                "step": step,
                "loss": float(stats[0]),
                "infonce": float(stats[1]),
                "batches": fingerprints.tolist(),
            }
        )
        if writer and (step % cfg.log_every == 0 or step == total_steps or step == 1):
            writer.add_scalar("loss/total", float(stats[0]), step)
            writer.add_scalar("loss/infonce", float(stats[1]), step)
            writer.add_scalar("loss/mlm", float(stats[2]), step)
            writer.add_scalar("train/inbatch_acc", float(stats[3]), step)
            writer.add_scalar("lr", lr, step)
            rate = steps_done * global_batch / (time.perf_counter() - t_loop)
            writer.add_scalar("train/pairs_per_s", rate, step)
            logger.info(
                "step %d/%d loss %.4f (infonce %.4f, mlm %.4f) acc %.3f lr %.2e logits %s, %.1f pairs/s",
                step, total_steps, stats[0], stats[1], stats[2], stats[3], lr, logits_shape, rate,
            )  # fmt: skip
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
            _save_checkpoint(engine, ckpt_dir, step, results, world)
        maybe_inject_fault(FAULT_INJECTION_ENV, world.rank, step)
    train_seconds = time.perf_counter() - t_loop

    t0 = time.perf_counter()
    after = evaluate(engine.module, tokenizer, data, world=world, cfg=cfg, max_length=max_length)
    logger.info("after pretraining: %s (%.1fs)", _fmt(after), time.perf_counter() - t0)
    if writer:
        writer.add_scalar(f"eval/recall@{k}", after[f"recall@{k}"], step)
        writer.add_scalar("eval/mrr", after["mrr"], step)
    _save_checkpoint(engine, ckpt_dir, step, results, world)
    encoder_dir = run_dir / "encoder"
    save_hf_encoder(
        engine,
        loaded.model,
        tokenizer,
        encoder_dir,
        pooling=cfg.pooling,
        world=world,
        zero_stage=cfg.zero_stage,
    )

    out = {
        f"recall@{k}_before": results["before"][f"recall@{k}"] if results["before"] else None,
        f"recall@{k}_after": after[f"recall@{k}"],
        "before": results["before"],
        "after": after,
        "steps": step,
        "steps_this_run": steps_done,
        "world_size": world.world_size,
        "global_batch": global_batch,
        "logits_shape": logits_shape,
        "zero_stage": cfg.zero_stage,
        "precision": precision,
        "encoder": encoder_path,
        "encoder_dir": str(encoder_dir),
        "mlm_head_initialised": loaded.missing_keys if use_mlm else [],
        "corpus": data.summary,
        "eval": {
            "queries": len(data.query_texts),
            "candidates": len(data.candidates),
            "catalog_items": int(data.counts["items"]),
        },
        "batch_fingerprints": [h.get("batches") for h in results["history"]],
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "losses": [h["loss"] for h in results["history"]],
    }
    if world.is_main:
        (run_dir / "results.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        logger.info(
            "Recall@%d on %d held-out reviews over %d candidate items: before %s -> after %.4f (results: %s)",
            k,
            len(data.query_texts),
            len(data.candidates),
            f"{out[f'recall@{k}_before']:.4f}" if results["before"] else "n/a",
            after[f"recall@{k}"],
            run_dir / "results.json",
        )
        writer.close()
    return out


def _save_checkpoint(engine, ckpt_dir: Path, step: int, results: dict[str, Any], world: World) -> None:
    tag = f"step{step:08d}"
    state = {"step": step, "before": results["before"], "history": results["history"]}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state)
    if dist.is_initialized():
        dist.barrier()
    if world.is_main:
        _purge_checkpoints(ckpt_dir, keep=tag)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _load_encoder_or_config_error(path: str, *, with_mlm_head: bool):
    """load_encoder, with its errors reported as config errors (the path came from the config)."""
    try:
        return load_encoder(path, with_mlm_head=with_mlm_head)
    except EncoderError as err:
        raise ConfigError(f"{err} (check {path!r} in the config)") from err
