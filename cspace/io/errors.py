"""Errors shared by every layer of cspace."""

from __future__ import annotations

__all__ = ["MissingWeightsError"]


class MissingWeightsError(FileNotFoundError):
    """Weights are not on disk (nothing is ever downloaded); the message says how to supply them."""
