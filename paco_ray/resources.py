"""A Ray resource bundle as people read it."""
from __future__ import annotations


def format_resources(resources: dict[str, float]) -> str:
    """``{GPU: 1, CPU: 8}``: accelerators first, then CPU, then the rest."""
    order = sorted((r for r in resources if not r.startswith("node:")), key=lambda r: (r != "GPU", r != "CPU", r))
    return "{" + ", ".join(f"{r}: {resources[r]:g}" for r in order) + "}"
