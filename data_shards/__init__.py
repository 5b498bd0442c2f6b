"""data_shards: raw logs -> validated, k-cored, chronological sequence and item-text WebDataset shards."""

from data_shards.io import DataError, SkipStats

__all__ = ["DataError", "SkipStats"]
