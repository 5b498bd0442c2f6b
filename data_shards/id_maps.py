"""The dataset's id maps: `user_ids.txt` / `item_ids.txt`, line i (1-based) = the original id of index i.

Read into one Arrow string array (not a Python list), so mapping a full catalog's indices back to original ids
costs tens of bytes per id, not an object each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pv

from data_shards.io import DataError

ID_MAP_FILES = {"user": "user_ids.txt", "item": "item_ids.txt"}


def read_id_map(dataset_dir: str | Path, kind: Literal["user", "item"], expected: int) -> pa.StringArray:
    """Original ids by index - 1 ([expected] strings); a missing file or a wrong line count is a DataError."""
    path = Path(dataset_dir) / ID_MAP_FILES[kind]
    if not path.is_file():
        raise DataError(f"{path} not found: the dataset folder lacks its {kind} id map; run prepare.py again")
    try:
        table = pv.read_csv(
            path,
            read_options=pv.ReadOptions(column_names=["id"]),
            parse_options=pv.ParseOptions(delimiter="\x1f", quote_char=False, ignore_empty_lines=False),
            convert_options=pv.ConvertOptions(
                column_types={"id": pa.string()}, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as err:  # a control character or bad UTF-8 in an id
        raise DataError(f"{path}: unreadable id map ({err}); run prepare.py again") from err
    ids = table.column("id").combine_chunks()
    if len(ids) != expected:
        raise DataError(
            f"{path}: {len(ids)} lines but the dataset manifest has {expected} {kind}s; "
            "the folder is inconsistent, run prepare.py again"
        )
    return ids
