"""ORT fused-op rewrites for the cpu target (placeholder: no fusions yet)."""

from __future__ import annotations


def apply_fusions(graph, config) -> list[str]:
    """Apply the fusions that pay on CPU; returns their names (none yet)."""
    return []
