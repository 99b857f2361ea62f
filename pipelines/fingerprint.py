"""The fingerprint of a prepared directory: the pipeline and the settings it was made with, a
JSON mapping in the manifest's Parquet metadata; and, when it differs from the settings of a
new run, the one line that says which setting differs."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from paco_ray import schema

FINGERPRINT_KEY = b"paco_ray.fingerprint"


def read_fingerprint(out: Path) -> dict | None:
    """The fingerprint recorded in ``out``'s manifest; None when there is none to read."""
    manifest = out / "manifest.parquet"
    if not manifest.is_file():
        return None
    try:
        meta = pq.read_schema(manifest).metadata or {}
    except Exception:
        return None
    return json.loads(meta[FINGERPRINT_KEY]) if FINGERPRINT_KEY in meta else None


def differences(wanted: dict, existing: dict, out) -> str:
    """The first setting in which ``existing`` (the fingerprint recorded in ``out``) differs from
    ``wanted``, e.g. ``imbalance_factor: 100 here, 10 in data/x``, then the names of the others.
    Nested mappings are compared key by key (``lists.train``)."""
    found = schema.differences(wanted, existing)
    if not found:
        return "none"
    (first, mine, theirs), keys = found[0], [key for key, _, _ in found]
    more = f" (and {len(keys) - 1} more: {', '.join(keys[1:])})" if len(keys) > 1 else ""
    return f"{first}: {_show(mine)} here, {_show(theirs)} in {out}{more}"


def _show(value, limit: int = 80) -> str:
    """A setting as a user typed it: ``100`` for 100.0, paths unquoted, long lists shortened."""
    if value is schema.MISSING:
        return "unset"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    text = "none" if value is None else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
