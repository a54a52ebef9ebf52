"""Store URLs as people write them, and as SQLAlchemy wants them."""

from __future__ import annotations


def normalise(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3 (`postgresql+psycopg://`); anything else as given."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url
