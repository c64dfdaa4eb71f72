"""Guidance: the repulsive potential field, samplers with guidance and backtracking."""

from guidance.fields import (
    ClassifierField,
    CombinedField,
    Field,
    FieldOutput,
    RepulsiveField,
    safe_norm,
)
from guidance.sampler import METHODS, Backtrack, SampleOutput, sample, time_grid

__all__ = [
    "METHODS",
    "Backtrack",
    "ClassifierField",
    "CombinedField",
    "Field",
    "FieldOutput",
    "RepulsiveField",
    "SampleOutput",
    "safe_norm",
    "sample",
    "time_grid",
]
