"""`SequenceBatch`: one jagged batch of user histories, movable by TorchRec's train pipelines."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class SequenceBatch:
    """A Pipelineable batch (`to`, `record_stream`, `pin_memory`), as TrainPipelineSparseDist expects.

    Rows are users; `item_ids`/`timestamps` are jagged (concatenated row by row, oldest first) with `lengths`.
    """

    users: torch.Tensor
    """[B] int64 user index (1..U)."""
    weights: torch.Tensor
    """[B] float32: 1 for real rows, 0 for padding rows that equalise batch counts across ranks."""
    lengths: torch.Tensor
    """[B] int64 input length per row, 1..max_seq_len."""
    item_ids: torch.Tensor
    """[sum(lengths)] int64 jagged input items (most recent last)."""
    timestamps: torch.Tensor
    """[sum(lengths)] int64 unix seconds."""
    query_times: torch.Tensor
    """[sum(lengths)] int64: the time of the event each input position predicts, its target's (all: the next
    input's, the last input's own at the end); HSTU's time bias measures gaps from it."""
    targets: torch.Tensor
    """train: [sum(lengths)] next item at each input position; valid/test: [B] held-out item; all: [0]."""

    def _map(self, fn) -> SequenceBatch:
        return SequenceBatch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SequenceBatch:
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> SequenceBatch:
        return self._map(lambda t: t.pin_memory())

    @property
    def batch_size(self) -> int:
        return int(self.users.shape[0])

    @property
    def offsets(self) -> torch.Tensor:
        """[B+1] int64 row offsets into the jagged tensors."""
        return torch.nn.functional.pad(torch.cumsum(self.lengths, 0), (1, 0))

    def most_recent(self, max_len: int) -> SequenceBatch:
        """The same rows keeping each history's last `max_len` items (per-position targets likewise)."""
        if self.lengths.numel() == 0 or int(self.lengths.max()) <= max_len:
            return self
        offsets = self.offsets
        ends = torch.repeat_interleave(offsets[1:], self.lengths)
        keep = torch.arange(int(offsets[-1])) >= ends - max_len
        per_position = self.targets.numel() == self.item_ids.numel()
        return SequenceBatch(
            users=self.users,
            weights=self.weights,
            lengths=self.lengths.clamp(max=max_len),
            item_ids=self.item_ids[keep],
            timestamps=self.timestamps[keep],
            query_times=self.query_times[keep],
            targets=self.targets[keep] if per_position else self.targets,
        )
