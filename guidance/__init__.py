"""Guidance: the repulsive potential field, samplers with guidance and backtracking."""

from cspace.io.names import check_import_name

check_import_name("guidance", __file__)  # another distribution of that name: stop here

from guidance.fields import (
    ClassifierField,
    CombinedField,
    Field,
    FieldOutput,
    RepulsiveField,
    safe_norm,
)
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
    "Field",
    "FieldOutput",
    "Guided",
    "Prediction",
    "RepulsiveField",
    "SampleOutput",
    "safe_norm",
    "sample",
    "time_grid",
]
