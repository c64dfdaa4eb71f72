"""Guidance: the repulsive potential field, samplers with guidance and backtracking."""

from guidance.field import FieldOutput, RepulsiveField, safe_norm
from guidance.halfspace import ClassifierField, CombinedField
from guidance.sampling import (
    METHODS,
    Backtrack,
    Guided,
    Prediction,
    SampleOutput,
    sample,
    time_grid,
)

__all__ = [
    "METHODS",
    "Backtrack",
    "ClassifierField",
    "CombinedField",
    "FieldOutput",
    "Guided",
    "Prediction",
    "RepulsiveField",
    "SampleOutput",
    "safe_norm",
    "sample",
    "time_grid",
]
