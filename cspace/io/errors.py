"""Errors shared by every layer of cspace."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DataFileError", "FolderError", "MissingDataError", "MissingWeightsError"]


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


class MissingDataError(FileNotFoundError):
    """A data set's files are not on disk (nothing is ever downloaded); the message names every
    place looked in and how to supply them."""


class DataFileError(ValueError):
    """A data-set file that cannot be used: truncated, of the wrong magic number or size, or
    not matching its companion (labels that do not fit the images). The message names the file
    and what is wrong; :attr:`path` is the file."""

    def __init__(self, message: str = "", path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
