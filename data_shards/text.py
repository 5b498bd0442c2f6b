"""Item text assembly, one recipe per source (BLaIR-style: whitespace collapsed, empty parts dropped).

Amazon: ``title | features | categories | description``; Steam: ``app_name | publisher | developer | genres |
tags | specs``; MovieLens: ``title | year | genres``.
"""

from __future__ import annotations

from typing import Any

from data_shards.io import text_of

SEP = " | "


def _list_text(value: Any, sep: str) -> str:
    if isinstance(value, list | tuple):
        return sep.join(t for t in (text_of(v) for v in value) if t)
    return text_of(value)


def join_parts(parts: list[str]) -> str:
    """Join non-empty parts with `` | ``."""
    return SEP.join(p for p in parts if p)


def amazon_text(rec: dict) -> str:
    """Amazon Reviews 2023 metadata record -> ``title | features | categories | description``."""
    return join_parts(
        [
            text_of(rec.get("title")),
            _list_text(rec.get("features"), " "),
            _list_text(rec.get("categories"), ", "),
            _list_text(rec.get("description"), " "),
        ]
    )


def steam_text(rec: dict) -> str:
    """Steam game record -> ``app_name | publisher | developer | genres | tags | specs``."""
    return join_parts(
        [
            text_of(rec.get("app_name") or rec.get("title")),
            text_of(rec.get("publisher")),
            text_of(rec.get("developer")),
            _list_text(rec.get("genres"), ", "),
            _list_text(rec.get("tags"), ", "),
            _list_text(rec.get("specs"), ", "),
        ]
    )


def movielens_text(title: str, year: str, genres: list[str]) -> str:
    """MovieLens movie -> ``title | year | genres``."""
    return join_parts([text_of(title), text_of(year), ", ".join(g for g in genres if g)])
