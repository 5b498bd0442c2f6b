"""BLaIR text encoder: a Hugging Face encoder with pooling, plus the contrastive and masked-LM losses.

Plain torch: no process groups here. The trainer gathers keys across ranks and passes them to
`info_nce_loss`; this module only sees tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

Pooling = Literal["cls", "mean"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


class EncoderError(ValueError):
    """An encoder folder that cannot be used as is; the message says which file and what to do."""


def check_encoder_path(path: str | Path) -> Path:
    """Return `path` as a folder holding a Hugging Face model, or raise a clear EncoderError."""
    folder = Path(path)
    if not str(path):
        raise EncoderError("encoder path is empty: set it to a local Hugging Face model folder")
    if not folder.is_dir():
        raise EncoderError(
            f"encoder path {folder} does not exist or is not a folder: pass a local Hugging Face model "
            "folder (config.json + weights + tokenizer files); hub names are not fetched offline"
        )
    if not (folder / "config.json").is_file():
        raise EncoderError(f"{folder}/config.json is missing: {folder} is not a Hugging Face model folder")
    return folder


def weights_sha256(path: str | Path) -> dict[str, str]:
    """sha256 of each weights file in an encoder folder (the encoder's identity in manifests)."""
    folder = Path(path)
    digests = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.name.endswith(WEIGHT_SUFFIXES):
            h = hashlib.sha256()
            with file.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            digests[file.name] = h.hexdigest()
    return digests


def default_pooling(path: str | Path) -> tuple[Pooling, bool]:
    """Pooling and normalisation a sentence-transformers folder declares; ([CLS], no norm) otherwise.

    sentence-transformers stores them in `modules.json` (+ `1_Pooling/config.json`, a Normalize module);
    reading them lets us reproduce e.g. all-MiniLM-L6-v2 with plain transformers.
    """
    folder = Path(path)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "cls", False
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    pooling: Pooling = "cls"
    normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            cfg_file = folder / module.get("path", "") / "config.json"
            cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
            if cfg.get("pooling_mode_mean_tokens", False):
                pooling = "mean"
            elif cfg.get("pooling_mode_cls_token", False):
                pooling = "cls"
            else:
                raise EncoderError(
                    f"{cfg_file}: only cls or mean-token pooling is supported, got {cfg}; "
                    "set pooling explicitly in the config"
                )
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def declared_max_length(path: str | Path) -> int | None:
    """The token limit a sentence-transformers folder was trained/used with (sentence_bert_config.json)."""
    file = Path(path) / "sentence_bert_config.json"
    if not file.is_file():
        return None
    value = json.loads(file.read_text(encoding="utf-8")).get("max_seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def pool(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """[B, L, D] hidden states -> [B, D]: the first token, or the mean over real (unmasked) tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    raise ValueError(f"unknown pooling {pooling!r}; use 'cls' or 'mean'")


def check_tokenizer_matches(tokenizer, model: nn.Module, *, path: str | Path) -> None:
    """Raise if the tokenizer can emit ids the model has no embedding row for (mismatched folders)."""
    rows = model.get_input_embeddings().num_embeddings
    vocab = len(tokenizer)
    if vocab > rows:
        raise EncoderError(
            f"{path}: tokenizer has {vocab} tokens but the model's input embedding has only {rows} rows; "
            "the tokenizer files do not belong to these weights (use the tokenizer saved with the model)"
        )


@dataclass
class LoadedEncoder:
    """What `load_encoder` returns: the module to train/run, its tokenizer and how it was initialised."""

    model: nn.Module
    tokenizer: object
    missing_keys: list[str]


def load_encoder(
    path: str | Path, *, with_mlm_head: bool, dtype: torch.dtype = torch.float32
) -> LoadedEncoder:
    """Load a local HF encoder (AutoModelForMaskedLM when the MLM loss is needed, else AutoModel)."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    folder = check_encoder_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise EncoderError(
            f"{folder}: cannot load a tokenizer ({err}); the folder needs tokenizer files"
        ) from err
    cls = AutoModelForMaskedLM if with_mlm_head else AutoModel
    try:
        model, info = cls.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, dtype=dtype
        )
    except (OSError, ValueError) as err:
        raise EncoderError(f"{folder}: cannot load model weights with {cls.__name__} ({err})") from err
    check_tokenizer_matches(tokenizer, model, path=folder)
    return LoadedEncoder(model=model, tokenizer=tokenizer, missing_keys=sorted(info.get("missing_keys", [])))


class BlairEncoder(nn.Module):
    """Text encoder for BLaIR: `encode` pools the backbone's last hidden state; `mlm_logits` runs the head.

    Wraps an `AutoModelForMaskedLM` (training, needs the MLM head) or a bare `AutoModel` (emission).
    """

    def __init__(self, model: nn.Module, *, pooling: Pooling = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {pooling!r}; use 'cls' or 'mean'")
        self.model = model
        self.pooling: Pooling = pooling
        prefix = getattr(model, "base_model_prefix", "")
        self._has_head = prefix and hasattr(model, prefix) and getattr(model, prefix) is not model

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.model, self.model.base_model_prefix) if self._has_head else self.model

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Pooled, un-normalised sentence embeddings [B, D]."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    @property
    def mlm_head(self) -> nn.Module:
        """The wrapped model's one child that is not the backbone (BERT `cls`, RoBERTa `lm_head`)."""
        if not self._has_head:
            raise RuntimeError("this encoder was loaded without an MLM head (load with with_mlm_head=True)")
        heads = [m for m in self.model.children() if m is not self.backbone]
        if len(heads) != 1:
            raise RuntimeError(
                f"cannot tell the MLM head of {type(self.model).__name__} apart ({len(heads)} candidates)"
            )
        return heads[0]

    def mlm_logits(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Vocabulary logits [M, V] at the M positions with a label (!= -100), and those labels [M].

        The head runs only where a prediction is asked: about 7x less work than full [B, L, V] logits.
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        picked = labels != -100
        return self.mlm_head(hidden[picked]), labels[picked]

    def forward(
        self,
        query_ids: Tensor,
        query_mask: Tensor,
        key_ids: Tensor,
        key_mask: Tensor,
        mlm_ids: Tensor | None = None,
        mlm_labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """One training forward: (query embeddings, key embeddings, (MLM logits, labels) or None).

        The MLM input is the masked query text; it shares the query's attention mask.
        """
        q = self.encode(query_ids, query_mask)
        k = self.encode(key_ids, key_mask)
        mlm = self.mlm_logits(mlm_ids, query_mask, mlm_labels) if mlm_ids is not None else None
        return q, k, mlm


def info_nce_loss(
    queries: Tensor,
    keys: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.05,
    query_groups: Tensor | None = None,
    key_groups: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """InfoNCE on cosine similarity: each query's positive is `keys[labels[i]]`, every other key a negative.

    `keys` may be the gathered keys of all ranks (so logits are [B_local, B_global]). If group ids are given
    (the item of each pair), other keys of the query's own item are masked out: they are not negatives.
    Returns (loss, logits).
    """
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    logits = q @ k.T / temperature
    if query_groups is not None and key_groups is not None:
        same = query_groups[:, None] == key_groups[None, :]
        same[torch.arange(len(labels), device=labels.device), labels] = False
        logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, labels), logits


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: pick p of the real non-special tokens; 80% -> [MASK], 10% random, 10% kept.

    Returns (masked input ids, labels with -100 where no prediction is asked).
    """
    labels = input_ids.clone()
    special = torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype)) | (attention_mask == 0)
    probs = torch.full(input_ids.shape, probability)
    probs.masked_fill_(special, 0.0)
    picked = torch.bernoulli(probs, generator=generator).bool()
    labels[~picked] = -100
    masked = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & picked
    masked[to_mask] = mask_token_id
    to_random = (
        torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & picked & ~to_mask
    )
    masked[to_random] = torch.randint(vocab_size, input_ids.shape, generator=generator)[to_random]
    return masked, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the masked positions only (0 if nothing was masked, keeping the graph)."""
    if (labels != -100).sum() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
