"""Attention backends: `torch` (the reference) and `triton` (imported only when chosen: it imports
Triton, whose CPU interpreter mode must be set before that)."""
