"""Config sections of the BLaIR jobs: `[blair]` (contrastive pretraining), `[embed]` (item vectors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_shards.pairs import PairsConfig
from trainer.config_io import ConfigError


@dataclass(kw_only=True)
class BlairConfig:
    """BLaIR pretraining with DeepSpeed: InfoNCE (cross-rank in-batch negatives) + 0.1 x masked-LM."""

    encoder_path: str = ""
    """Local Hugging Face model folder to start from (`pkg:<package>/<dir>` finds one inside a package)."""
    pooling: Literal["cls", "mean"] = "cls"
    """Sentence embedding: [CLS] (BLaIR) or mean over tokens (sentence-transformers' MiniLM)."""
    max_length: int = 64
    """Token limit of both texts in training (BLaIR: 64)."""
    temperature: float = 0.05
    """InfoNCE temperature on cosine similarities."""
    mlm_weight: float = 0.1
    """Weight of the masked-LM loss (0 disables it and the MLM head)."""
    mlm_probability: float = 0.15
    """Fraction of review tokens masked for the MLM loss."""
    mask_same_item: bool = True
    """Drop in-batch 'negatives' that are the query's own item (two reviews of one item in a batch)."""
    batch_size: int = 32
    """Pairs per rank per step; the InfoNCE logits are batch_size x (batch_size * world_size)."""
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    """Linear warm-up over this fraction of the steps, then linear decay to 0."""
    epochs: int = 1
    max_steps: int = 0
    """Stop after this many steps (0 = `epochs` full passes)."""
    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on GPUs that support it (else fp16), fp32 on CPU."""
    grad_clip: float = 1.0
    log_every: int = 10
    eval_batch_size: int = 64
    """Texts per rank per forward in the Recall@K evaluation."""
    eval_before: bool = True
    """Also measure Recall@K of the initial encoder (the 'before' number)."""
    recall_k: int = 10
    checkpoint_every: int = 0
    """Save a DeepSpeed checkpoint every N steps (0 = only at the end)."""
    resume: bool = True
    """Continue from the latest checkpoint in the run dir if there is one."""
    num_threads: int = 0
    """torch intra-op threads per rank on CPU (0 = leave torch's default)."""
    pairs: PairsConfig = field(default_factory=PairsConfig)

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "epochs", "log_every", "eval_batch_size", "recall_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"blair.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.checkpoint_every < 0 or self.num_threads < 0:
            raise ConfigError("blair.max_steps, blair.checkpoint_every and blair.num_threads must be >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"blair.temperature must be > 0, got {self.temperature}")
        if self.mlm_weight < 0 or not 0 < self.mlm_probability < 1:
            raise ConfigError("blair.mlm_weight must be >= 0 and blair.mlm_probability in (0, 1)")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("blair.lr must be > 0 and blair.warmup_ratio in [0, 1)")


@dataclass(kw_only=True)
class EmbedConfig:
    """Emission of one frozen fp16 vector per item into embedding shards (data_shards/embedding_shards.py)."""

    source: Literal["encoder", "vectors"] = "encoder"
    """encoder: run a local HF / sentence-transformers model; vectors: import precomputed vectors."""
    dataset_dir: str = ""
    """Prepared dataset dir (manifest.json, items/items-*.tar, item_ids.txt)."""
    output_dir: str = ""
    """Where the embedding shards go (empty = <run.output_root>/<run.name>/embeddings)."""
    encoder_path: str = ""
    """Local model folder: a BLaIR run's `encoder/`, roberta-base, MiniLM (`pkg:` allowed)."""
    pooling: Literal["auto", "cls", "mean"] = "auto"
    """auto = what a sentence-transformers folder declares (modules.json), else [CLS]."""
    normalize: Literal["auto", "yes", "no"] = "auto"
    """L2-normalise vectors: auto = if the folder declares a Normalize module."""
    max_length: int = 512
    """Token limit per item text (BLaIR emission: 512)."""
    batch_size: int = 64
    items_per_shard: int = 100_000
    """Items per output tar; shards are the unit of work spread over ranks."""
    block_size: int = 1024
    """Items per tar sample (one ids.npy + emb.npy block)."""
    vectors_path: str = ""
    """vectors: .parquet (id + vector columns), .npz (arrays `ids`, `vectors`) or .npy [n, dim] + ids_path."""
    ids_path: str = ""
    """vectors + .npy: text file of original item ids, one per line, in the .npy's row order."""
    id_column: str = "item_id"
    vector_column: str = "embedding"
    missing: Literal["error", "zero"] = "error"
    """vectors: catalog items absent from the file are an error, or get a zero vector (counted)."""
    name: str = ""
    """Encoder name recorded in the manifest (empty = the folder or file name)."""
    num_threads: int = 0

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "items_per_shard", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"embed.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_threads < 0:
            raise ConfigError("embed.num_threads must be >= 0")
