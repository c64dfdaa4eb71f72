"""Errors shared by every layer of cspace."""

from __future__ import annotations

from pathlib import Path

__all__ = ["FolderError", "MissingWeightsError"]


class MissingWeightsError(FileNotFoundError):
    """Weights are not on disk (nothing is ever downloaded); the message says how to supply them."""


class FolderError(ValueError):
    """A cspace folder (obstacle set, classifier, model weights) that cannot be used: corrupt,
    foreign, of a newer format, or mismatched; also bad input to the kinds that own such folders.

    Every kind raises its own subclass (``ObstacleSetError``, ``ClassifierError``,
    ``FlowWeightsError``, ``VAEWeightsError``, ``TeacherWeightsError``), so callers may catch
    the kind's error or this base class. The message names the file and what to do;
    :attr:`path` is the file or folder concerned (None for errors about values, not files).
    """

    def __init__(self, message: str = "", path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
