"""The fingerprint of a prepared directory: the pipeline and the settings it was made with, a
JSON mapping in the manifest's Parquet metadata; and, when it differs from the settings of a
new run, the one line that says which setting differs."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

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
    wanted, existing = _flat(wanted), _flat(existing)
    keys = [k for k in dict.fromkeys([*wanted, *existing])
            if (k in wanted, wanted.get(k)) != (k in existing, existing.get(k))]
    if not keys:
        return "none"
    first = keys[0]
    more = f" (and {len(keys) - 1} more: {', '.join(keys[1:])})" if len(keys) > 1 else ""
    return f"{first}: {_show(wanted, first)} here, {_show(existing, first)} in {out}{more}"


def _flat(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(settings: dict, key: str, limit: int = 80) -> str:
    """A setting as a user typed it: ``100`` for 100.0, paths unquoted, long lists shortened."""
    if key not in settings:
        return "unset"
    value = settings[key]
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    text = "none" if value is None else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
